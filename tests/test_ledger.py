"""The ledger's low-water mark and runs, as a pure unit against a plain model."""

from __future__ import annotations

import random
import threading
import time
import tracemalloc

from produl_server._ledger import Ledger


def test_events_finished_in_any_order_are_counted_once_and_release_the_mark():
    rng = random.Random(7)
    for _round in range(50):
        ledger = Ledger()
        total = rng.randint(1, 300)
        for _ in range(total):
            ledger.accept()
        order = list(range(1, total + 1))
        rng.shuffle(order)
        handled: set[int] = set()
        for seq in order + order[: total // 3]:  # some twice: the second is refused
            assert ledger.finish(seq) is (seq not in handled)
            handled.add(seq)
            expected_low = 0
            while expected_low + 1 in handled:
                expected_low += 1
            assert ledger.done_through(expected_low)
            assert not ledger.done_through(expected_low + 1) or expected_low == total
            assert ledger.pending == total - len(handled)
            probe = rng.randint(1, total)
            assert ledger.is_handled(probe) is (probe in handled)
        assert ledger.stats().sent == total


def test_200000_refused_behind_a_full_queue_hold_no_memory_per_event():
    # A full queue: the first 100 events wait; everything after is refused
    # at the door and handled at once, far above the low-water mark.
    ledger = Ledger()
    for _ in range(100):
        ledger.accept()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(200_000):
            ledger.refuse("queue_full")
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 10_000  # one run, not 200,000 set entries (about 16 MB)
    stats = ledger.stats()
    assert (stats.pending, stats.dropped) == (100, {"queue_full": 200_000})
    for seq in range(1, 101):
        ledger.finish(seq)
    assert ledger.done_through(200_100)
    assert ledger.pending == 0


def test_abandon_drops_exactly_what_is_not_handled():
    ledger = Ledger()
    for _ in range(10):
        ledger.accept()
    for seq in (2, 3, 7):
        ledger.finish(seq)
    assert ledger.abandon("shutdown") == 7
    assert ledger.stats().dropped == {"shutdown": 7}
    assert ledger.pending == 0
    assert not ledger.finish(5)


class _CountingCondition(threading.Condition):
    """A condition that counts its wake-ups (a pure unit: nothing else is faked)."""

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__(lock)
        self.wakeups = 0

    def notify_all(self) -> None:
        self.wakeups += 1
        super().notify_all()


def test_a_waiting_flush_is_woken_once_its_target_is_reached_not_at_every_event():
    # issue #19, P2: a flush() waiting on 3,000 events was woken 3,000 times,
    # a thread switch each, which cost the sender a fifth of its CPU.
    ledger = Ledger()
    cond = ledger._cond = _CountingCondition(ledger._lock)
    for _ in range(300):
        ledger.accept()
    results: dict[int, bool] = {}
    waiters = [
        threading.Thread(target=lambda t=target: results.update({t: ledger.wait(t, 30)}))
        for target in (100, 300)
    ]
    for waiter in waiters:
        waiter.start()
    deadline = time.monotonic() + 30
    while len(ledger._targets) < 2:
        assert time.monotonic() < deadline, "the waiters never waited"
        time.sleep(0.001)
    for seq in range(1, 100):
        ledger.finish(seq)
    assert cond.wakeups == 0
    assert results == {}
    ledger.finish(100)
    waiters[0].join(30)
    assert results == {100: True}
    woken = cond.wakeups
    for seq in range(101, 300):
        ledger.finish(seq)
    assert cond.wakeups == woken  # the other waiter wants 300: nobody is woken
    ledger.finish(300)
    waiters[1].join(30)
    assert results == {100: True, 300: True}
    assert not ledger._targets


def test_a_wait_that_times_out_leaves_no_target_behind():
    ledger = Ledger()
    ledger.accept()
    assert not ledger.wait(1, 0.01)
    assert not ledger._targets
    ledger.finish(1)
    assert ledger.wait(1, 0)
