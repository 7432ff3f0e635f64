"""The sender thread's steps, driven one by one on a fake clock with a fake transport.

No thread runs and no time passes: the test calls :meth:`ThreadSender.step`
as the thread would, reads the wait it asks for, and moves the clock
itself. Each request moves the clock by the transport's latency (1 ms,
below the lanes' threshold, so every request is sent within the step).
The real-HTTP tests prove the wiring; these prove the rules, in
milliseconds.
"""

from __future__ import annotations

import json

import pytest

from produl_server import Config
from produl_server._accounts import Accounts
from produl_server._event import encode_event
from produl_server._quota import QUOTA_WINDOW, RollingQuota
from produl_server._sender import ThreadSender
from produl_server._spool import SpooledEvent
from produl_server._transport import Outcome, Verdict

DELIVERED = Outcome(Verdict.DELIVERED, 204)
UNAVAILABLE = Outcome(Verdict.RETRY, 503, None, "server_error", "HTTP 503")


def slow_down(seconds):
    return Outcome(Verdict.RETRY, 429, seconds, "rate_limited", "HTTP 429")


class FakeSpool:
    """An outbox in memory: claims, acks and give-backs, 50 per claim."""

    directory = "the fake spool"
    lease = 60.0
    quarantined = 0
    exit_only = False

    def __init__(self, numbers=()):
        self.rows = {}
        self.claimed = set()
        self.looks = 0
        self.keep(
            (json.dumps({"t": "ev", "n": "e", "vi": "s", "pr": {"i": i}}).encode(), "s")
            for i in numbers
        )

    def keep(self, items, *, caller=False):
        kept = 0
        for body, visitor in items:
            self.rows[len(self.rows) + len(self.claimed) + 10_000 + kept] = (body, visitor)
            kept += 1
        return kept

    def take(self):
        self.looks += 1
        free = [row for row in sorted(self.rows) if row not in self.claimed][:50]
        self.claimed.update(free)
        return [SpooledEvent(row, *self.rows[row]) for row in free]

    def done(self, ids):
        for row in ids:
            self.claimed.discard(row)
            del self.rows[row]

    def give_back(self, ids):
        self.claimed.difference_update(ids)

    def count(self):
        return len(self.rows)

    def worth_a_look(self):
        return bool(self.rows)

    def problem(self):
        return None

    def census(self):
        return None

    def adopt_unowned(self):
        return 0

    def after_fork_in_child(self):
        pass

    def close(self):
        pass


class Rig:
    """A sender, its accounts, a fake clock and a scripted transport."""

    def __init__(self, latency=0.001, outbox=None, **options):
        options.setdefault("server_key", "sk_test_key_0000")
        options.setdefault("api_url", "http://127.0.0.1:9")
        options.setdefault("max_requests_per_minute", None)
        self.now = 1000.0
        self.latency = latency
        self.answers: list[Outcome] = []
        self.sent: list[tuple[float, int]] = []  # (when, event number)
        self.attempts: list[float] = []
        #: Called with the event number while it is being sent.
        self.during_send = None
        self.config = Config(**options)
        quota = RollingQuota(self.config.max_requests_per_minute)
        self.accounts = Accounts(self.config, lambda config: self, self.clock, quota, outbox)
        self.sender = ThreadSender(self.accounts)

    # -- the transport ---------------------------------------------------------

    def send(self, body, timeout=None):
        number = json.loads(body)["pr"]["i"]
        self.attempts.append(self.now)
        if self.during_send is not None:
            self.during_send(number)
        if timeout is not None and timeout < self.latency:
            self.now += max(timeout, 0.0)  # the transport's deadline ends the exchange
            return Outcome(Verdict.RETRY, None, None, "timeout", "timed out")
        self.now += self.latency
        answer = self.answers.pop(0) if self.answers else DELIVERED
        if answer.verdict is Verdict.DELIVERED:
            self.sent.append((self.now, number))
        return answer

    def close(self):
        pass

    # -- the test's hands ------------------------------------------------------

    def clock(self):
        return self.now

    def track(self, number, visitor="v"):
        """What Worker.put does: accept, queue, wake."""
        body = encode_event("e", {"i": number}, visitor, None, None, None)
        waiting = self.accounts.inbox.put(body, self.accounts.ledger.accept, self.now)
        assert waiting

    def step(self):
        return self.sender.step()

    def wait(self, seconds):
        self.now += seconds
        return self.step()

    def numbers(self):
        return [number for _, number in self.sent]


def test_a_lone_event_waits_flush_interval_after_its_enqueue():
    rig = Rig(flush_interval=5.0)
    rig.track(0)
    assert rig.step() == pytest.approx(5.0)
    assert rig.sent == []
    assert rig.wait(4.999) == pytest.approx(0.001)
    assert rig.sent == []
    rig.wait(0.001)
    assert rig.numbers() == [0]


def test_each_enqueue_moves_the_trigger_up_to_max_delay_after_the_first():
    rig = Rig(flush_interval=5.0, max_delay=12.0)
    rig.track(0)
    assert rig.step() == pytest.approx(5.0)
    rig.now += 4.0
    rig.track(1)
    assert rig.step() == pytest.approx(5.0)  # 5 s after the last enqueue
    rig.now += 4.0
    rig.track(2)
    # 5 s after this one would be 1013; the cap, 12 s after the first, is 1012.
    assert rig.step() == pytest.approx(4.0)
    assert rig.sent == []
    rig.wait(4.0)
    assert rig.numbers() == [0, 1, 2]


def test_flush_at_events_go_at_once():
    rig = Rig(flush_at=10, flush_interval=5.0)
    for number in range(9):
        rig.track(number)
    assert rig.step() == pytest.approx(5.0)
    rig.track(9)
    rig.step()
    assert rig.numbers() == list(range(10))


def test_an_event_tracked_during_a_send_waits_for_its_own_trigger():
    # Issue #19: it left with the request after the previous one, at once.
    rig = Rig(flush_interval=5.0)
    tracked_at = {0: rig.now}

    def track_next(number):
        if number < 2:
            tracked_at[number + 1] = rig.now
            rig.track(number + 1)

    rig.during_send = track_next
    rig.track(0)
    for _ in range(20):
        wait = rig.step()
        if len(rig.sent) == 3:
            break
        rig.now += wait if wait else 0.0
    assert rig.numbers() == [0, 1, 2]
    for when, number in rig.sent:
        assert when - tracked_at[number] >= 5.0


def test_a_flush_sends_now_whatever_the_triggers_say():
    rig = Rig(flush_interval=5.0)
    for number in range(3):
        rig.track(number)
    rig.sender.request_flush(rig.accounts.ledger.accepted)
    rig.step()
    assert rig.numbers() == [0, 1, 2]


def test_the_quota_holds_the_request_after_the_last_one_it_allows():
    rig = Rig(flush_at=1, max_requests_per_minute=2)
    for number in range(3):
        rig.track(number)
    wait = rig.step()
    assert rig.numbers() == [0, 1]
    # The third waits until the first leaves the window.
    assert wait == pytest.approx(QUOTA_WINDOW - 0.002, abs=1e-6)
    assert rig.wait(wait - 0.01) == pytest.approx(0.01, abs=1e-6)
    assert rig.numbers() == [0, 1]
    rig.wait(0.01)
    assert rig.numbers() == [0, 1, 2]


def test_a_failure_backs_off_with_jitter_under_a_ceiling_that_doubles():
    rig = Rig(flush_at=1, retry_initial_delay=1.0, retry_max_delay=4.0)
    rig.answers = [UNAVAILABLE] * 4
    rig.track(0)
    ceilings = [1.0, 2.0, 4.0, 4.0]
    for ceiling in ceilings:
        pause = rig.step()
        assert 0.0 <= pause <= ceiling
        rig.now += pause
    rig.step()
    assert rig.numbers() == [0]
    stats = rig.accounts.ledger.stats()
    assert (stats.sent, stats.retried) == (1, 4)


def test_retry_after_is_the_pause_and_uses_no_retry_time():
    rig = Rig(flush_at=1, max_retry_time=5.0)
    rig.answers = [slow_down(7.0), slow_down(7.0)]
    rig.track(0)
    assert rig.step() == pytest.approx(7.0)
    assert rig.wait(7.0) == pytest.approx(7.0)
    # 14 s of 429s, more than max_retry_time: still not given up.
    rig.wait(7.0)
    assert rig.numbers() == [0]
    assert rig.accounts.schedule.outage_since is None


def test_the_outage_clock_gives_up_after_max_retry_time():
    rig = Rig(flush_at=1, max_retry_time=10.0, retry_initial_delay=1.0, retry_max_delay=1.0)
    rig.answers = [UNAVAILABLE] * 1000
    rig.track(0)
    started = rig.now
    for _ in range(1000):
        pause = rig.step()
        if rig.accounts.ledger.stats().dropped:
            break
        rig.now += pause if pause else 0.0
    stats = rig.accounts.ledger.stats()
    assert stats.dropped == {"retries_exhausted": 1}
    assert rig.attempts[-1] - started >= 10.0
    # An event that fails later in the same outage gets one attempt.
    rig.track(1)
    rig.sender.request_flush(rig.accounts.ledger.accepted)
    rig.step()
    assert rig.accounts.ledger.stats().dropped == {"retries_exhausted": 2}


def test_the_exit_deadline_ends_the_delivery_and_counts_what_is_left():
    rig = Rig(latency=0.3, flush_interval=600, max_in_flight=1)
    for number in range(10):
        rig.track(number)
    rig.sender.set_deadline(rig.now + 1.0)
    for _ in range(20):
        wait = rig.step()
        if rig.accounts.finished:
            break
        rig.now += wait if wait else 0.0
    assert rig.accounts.finished
    # Tried at 1000.0, 1000.3, 1000.6 and 1000.9: without a spool a late try
    # is an event's last chance, so the one at 1000.9 is made, and its
    # request ends at the deadline.
    assert rig.attempts == pytest.approx([1000.0, 1000.3, 1000.6, 1000.9])
    assert rig.now == pytest.approx(1001.0)
    stats = rig.accounts.ledger.stats()
    assert (stats.sent, stats.dropped, stats.pending) == (3, {"shutdown": 7}, 0)


def test_the_exit_stops_at_once_when_a_pause_outlives_it():
    rig = Rig(flush_at=1)
    rig.answers = [slow_down(30.0)]
    rig.track(0)
    assert rig.step() == pytest.approx(30.0)
    rig.sender.set_deadline(rig.now + 5.0)
    rig.step()
    assert rig.accounts.finished
    assert rig.accounts.ledger.stats().dropped == {"shutdown": 1}


def test_a_backlog_in_the_spool_goes_first_and_a_flush_waits_for_all_of_it():
    # Issue #19: a run after an outage delivered 100 of 300 spooled events.
    spool = FakeSpool(range(300))
    rig = Rig(outbox=spool, flush_interval=600)
    rig.track(-1)
    rig.sender.request_flush(rig.accounts.ledger.accepted)
    for _ in range(20):
        rig.step()
        target = rig.sender.backlog_after(rig.accounts.ledger.accepted, 0)
        if target == rig.accounts.ledger.accepted and rig.accounts.ledger.pending == 0:
            break
    assert sorted(rig.numbers()) == [-1, *range(300)]
    assert spool.count() == 0
    assert rig.accounts.backlog == 0


def test_the_exit_goes_on_with_the_backlog_and_counts_what_it_leaves():
    spool = FakeSpool(range(300))
    rig = Rig(latency=0.01, outbox=spool, flush_interval=600, max_in_flight=1)
    rig.sender.set_deadline(rig.now + 1.0)
    for _ in range(1000):
        wait = rig.step()
        if rig.accounts.finished:
            break
        rig.now += wait if wait else 0.0
    sent = len(rig.sent)
    # 10 ms a request, no request within two round trips of the deadline.
    assert 90 <= sent < 100
    stats = rig.accounts.ledger.stats()
    assert stats.pending == 0
    assert rig.accounts.backlog == spool.count() == 300 - sent


def test_a_backlog_is_not_taken_again_at_once_in_an_outage():
    # Out of retry time, a spooled event goes back to the spool; taking it
    # again at once would only send it again, and again.
    spool = FakeSpool(range(3))
    rig = Rig(outbox=spool, flush_at=1, max_retry_time=1.0, retry_initial_delay=0.5)
    rig.answers = [UNAVAILABLE] * 1000
    for _ in range(50):
        wait = rig.step()
        rig.now += wait if wait else 0.0
        if rig.now > 1010:
            break
    # Tried until the retry time ran out (a few attempts), then left in the
    # spool until the next look, 30 s later.
    assert spool.count() == 3
    assert len(rig.attempts) < 20
    assert spool.looks <= 3
