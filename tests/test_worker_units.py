"""The sender's loops with a scripted transport (the ``transport_factory`` seam): no HTTP."""

from __future__ import annotations

import json
import threading
import time

import pytest
from support import wait_until

from produl_server import Config, _lanes
from produl_server._config import exit_lanes
from produl_server._event import encode_event
from produl_server._transport import Outcome, Verdict
from produl_server._worker import Worker


class ScriptedTransport:
    """Answers from a script; records what was sent and from which thread."""

    def __init__(self, answers=(), latency=0.0):
        self.answers = list(answers)
        self.latency = latency
        self.sent: list[dict] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0

    def __call__(self, config):
        return self

    def send(self, body, timeout=None):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            answer = self.answers.pop(0) if self.answers else Outcome(Verdict.DELIVERED, 204)
        if self.latency:
            time.sleep(self.latency)  # the network's time, not the test's
        with self.lock:
            self.in_flight -= 1
            self.threads.add(threading.current_thread().name)
            if answer.verdict is Verdict.DELIVERED:
                self.sent.append(json.loads(body))
        return answer

    def close(self):
        pass

    def abandon(self):
        pass


_made: list[Worker] = []


@pytest.fixture(autouse=True)
def _close_workers():
    """Close every worker a test made: its sender thread must not outlive it."""
    yield
    while _made:
        _made.pop().close(5)


def worker(transport, **options):
    options.setdefault("server_key", "sk_test_key_0000")
    options.setdefault("api_url", "http://127.0.0.1:9")
    options.setdefault("max_requests_per_minute", None)
    options.setdefault("retry_initial_delay", 0.01)
    options.setdefault("retry_max_delay", 0.02)
    made = Worker(Config(**options), transport_factory=transport)
    _made.append(made)
    return made


def put(w, visitor, i):
    w.put(encode_event("e", {"i": i}, visitor, None, None, None))


def test_lanes_keep_each_visitors_order_and_use_max_in_flight():
    transport = ScriptedTransport(latency=0.01)
    w = worker(transport, max_in_flight=4, flush_interval=600)
    for i in range(200):
        put(w, f"v{i % 5}", i)
    assert w.flush(timeout=60)
    w.close(5)
    assert len(transport.sent) == 200
    for visitor in range(5):
        mine = [e["pr"]["i"] for e in transport.sent if e["vi"] == f"v{visitor}"]
        assert mine == sorted(mine)
    assert transport.most_in_flight == 4
    assert {"produl-server.sender-1", "produl-server.sender-4"} <= transport.threads


def new_lanes(before):
    """The lane threads started since *before* (a set of threads)."""
    return {
        t for t in set(threading.enumerate()) - before if t.name.startswith("produl-server.sender-")
    }


@pytest.fixture(name="no_thread_at_exit")
def _no_thread_at_exit(monkeypatch):
    """Python 3.12's way, on any Python: lanes start ahead; refuse() ends thread starts."""
    monkeypatch.setattr(_lanes, "STARTS_AT_EXIT", False)
    refused = threading.Event()
    start = _lanes.start_thread

    def start_unless_refused(target, name):
        return not refused.is_set() and start(target, name)

    monkeypatch.setattr(_lanes, "start_thread", start_unless_refused)
    return refused.set


def test_lanes_started_ahead_wait_for_the_exit_and_it_opens_them(no_thread_at_exit):
    transport = ScriptedTransport(latency=0.02)
    before = set(threading.enumerate())
    w = worker(transport, max_in_flight=4, flush_interval=600)
    for i in range(100):
        put(w, f"v{i % 97}", i)
    # One lane per event beyond a batch, on the caller's thread: all of the
    # exit's are there when the last call returns, whatever the sender did.
    assert len(new_lanes(before)) == exit_lanes(4) == 32
    assert w.flush(timeout=60)
    # While the process runs, no more in flight than max_in_flight.
    assert transport.most_in_flight == 4
    for i in range(100, 700):
        put(w, f"v{i % 97}", i)
    no_thread_at_exit()  # as at interpreter exit on Python 3.12
    w.close(3)  # 600 events at 20 ms: 4 lanes would need 3 s
    assert len(transport.sent) == 700
    for visitor in range(97):
        mine = [e["pr"]["i"] for e in transport.sent if e["vi"] == f"v{visitor}"]
        assert mine == sorted(mine)
    # The exit opened more lanes than max_in_flight, though none could start.
    assert 4 < transport.most_in_flight <= 32


def test_the_sender_starts_the_exit_lanes_when_it_first_opens_lanes(no_thread_at_exit):
    transport = ScriptedTransport()
    before = set(threading.enumerate())
    w = worker(transport, max_in_flight=3, flush_interval=600)
    put(w, "v", 0)
    assert w.flush(timeout=30)
    # A fast link: a backlog on it starts no lane, ahead or not.
    for i in range(1, 41):
        put(w, f"v{i}", i)
    assert w.flush(timeout=30)
    assert new_lanes(before) == set()
    # Slower: the callers still knew it fast, the sender opens lanes, and
    # starts the exit's with them.
    transport.latency = 0.02
    for i in range(41, 81):
        put(w, f"v{i}", i)
    assert w.flush(timeout=30)
    assert len(new_lanes(before)) == exit_lanes(3) == 24
    assert transport.most_in_flight == 3


def test_no_lane_starts_ahead_with_max_in_flight_1(no_thread_at_exit):
    transport = ScriptedTransport(latency=0.005)
    before = set(threading.enumerate())
    w = worker(transport, max_in_flight=1, flush_interval=600)
    for i in range(50):
        put(w, "v", i)
    assert w.flush(timeout=30)
    assert new_lanes(before) == set()
    assert [e["pr"]["i"] for e in transport.sent] == list(range(50))


def test_a_retried_event_goes_back_in_front_and_nothing_is_lost():
    retry = Outcome(Verdict.RETRY, 503, None, "server_error", "HTTP 503")
    transport = ScriptedTransport(answers=[retry, retry])
    w = worker(transport, flush_interval=600)
    for i in range(5):
        put(w, "v", i)
    assert w.flush(timeout=30)
    assert [e["pr"]["i"] for e in transport.sent] == [0, 1, 2, 3, 4]
    stats = w.stats()
    assert (stats.sent, stats.retried, stats.pending) == (5, 2, 0)


def test_a_flush_waits_for_everything_queued_before_it_only():
    gate = threading.Event()

    class Held(ScriptedTransport):
        def send(self, body, timeout=None):
            gate.wait(30)
            return super().send(body, timeout)

    transport = Held()
    w = worker(transport, flush_interval=600)
    put(w, "v", 0)
    assert w.flush(timeout=0.05) is False  # its one event is held
    gate.set()
    assert w.flush(timeout=30) is True
    assert w.stats().sent == 1


def test_sync_mode_sends_on_the_callers_thread_and_starts_no_thread():
    transport = ScriptedTransport()
    w = worker(transport, sync_mode=True)
    put(w, "v", 0)
    assert transport.threads == {threading.current_thread().name}
    assert w.stats().sent == 1


def test_a_shutdown_deadline_counts_what_is_left_exactly_once():
    transport = ScriptedTransport(latency=0.2)
    w = worker(transport, flush_interval=600)
    for i in range(50):
        put(w, "v", i)
    w.close(0.3)
    stats = w.stats()
    assert stats.pending == 0
    assert stats.queued == stats.sent + stats.dropped_total == 50
    assert stats.dropped["shutdown"] == 50 - stats.sent


def test_the_loss_line_counts_the_requests_under_way_at_the_deadline(caplog):
    gate = threading.Event()

    class Held(ScriptedTransport):
        def send(self, body, timeout=None):
            gate.wait(30)  # under way until the test lets it go
            return super().send(body, timeout)

    w = worker(Held(), flush_interval=600)
    for i in range(3):
        put(w, "v", i)  # one visitor: one request under way, two waiting
    assert w.flush(timeout=0.05) is False
    try:
        w.close(0.2)
    finally:
        gate.set()
    lines = [r.getMessage() for r in caplog.records if "shutdown deadline" in r.getMessage()]
    assert len(lines) == 1
    assert "3 event(s) not delivered before the shutdown deadline; they are lost" in lines[0]
    assert "(1 of them had a request under way, and may have arrived)" in lines[0]


def test_no_request_starts_within_two_round_trips_of_the_exit_deadline(tmp_path):
    # A fake clock that only the transport moves: each request takes 0.1 s.
    # With a spool, a request that would end past the deadline is not
    # started (its answer would be lost, the event spooled, and maybe sent
    # twice); the spool keeps the rest instead.
    now = [1000.0]
    starts: list[float] = []

    class Timed(ScriptedTransport):
        def send(self, body, timeout=None):
            starts.append(now[0])
            now[0] += 0.1
            return super().send(body, timeout)

    options = {"flush_interval": 600, "max_in_flight": 1, "spool_dir": str(tmp_path / "s")}
    made = Worker(
        Config(server_key="sk_test_key_0000", api_url="http://127.0.0.1:9", **options),
        transport_factory=Timed(),
        clock=lambda: now[0],
    )
    _made.append(made)
    for i in range(20):
        put(made, "v", i)
    made.close(0.55)
    deadline = 1000.55
    # Sent at 1000.0 (latency unknown yet), then at 1000.1, 1000.2 and
    # 1000.3 (0.25 s left, more than 2 x 0.1 s); at 1000.4 only 0.15 s was left.
    assert starts == pytest.approx([1000.0, 1000.1, 1000.2, 1000.3])
    assert all(deadline - start >= 0.2 for start in starts[1:])
    stats = made.stats()
    assert (stats.sent, stats.spooled, stats.pending) == (4, 16, 0)


def test_an_event_tracked_during_a_send_waits_for_its_own_trigger():
    # flush_interval=0.3: a lone event goes 0.3 s after its enqueue. One
    # tracked while the previous one is being sent must wait for its own
    # 0.3 s too, not leave with the request after that one (issue #19).
    put_at: dict[int, float] = {}
    sent_at: dict[int, float] = {}
    holder: list[Worker] = []

    class Tracking(ScriptedTransport):
        def send(self, body, timeout=None):
            i = json.loads(body)["pr"]["i"]
            sent_at[i] = time.monotonic()
            if i < 3:  # the next one is tracked while this one is sent
                put_at[i + 1] = time.monotonic()
                put(holder[0], "v", i + 1)
            return super().send(body, timeout)

    transport = Tracking()
    w = worker(transport, flush_interval=0.3)
    holder.append(w)
    put_at[0] = time.monotonic()
    put(w, "v", 0)
    wait_until(lambda: len(transport.sent) == 4, 30, "four events sent")
    assert sorted(sent_at) == [0, 1, 2, 3]
    for i in range(4):
        assert sent_at[i] - put_at[i] >= 0.3, (i, sent_at[i] - put_at[i])
