"""Delivery over real HTTP to a LocalCollector on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from produl_server import DeliveryError, InvalidEventError, PageviewData, __version__
from produl_server._config import exit_lanes
from produl_server._threads import STARTS_AT_EXIT


def sender_threads():
    return [t for t in threading.enumerate() if t.name == "produl-server.sender"]


def test_wire_format_headers_and_one_kept_alive_connection(produl_collector, make_client):
    produl = make_client()
    produl.track_event(
        "invoice_paid",
        {"amount_cents": 4900, "currency": "usd"},
        visitor_id="cus_abc123",
        path="/webhooks/stripe",
        session_key="cus_abc123-session",
    )
    produl.track_pageview(path="/pricing", visitor_id="cus_abc123", title="Pricing")
    produl.track_pageview(
        PageviewData(path="/docs", visitor_id="cus_abc123", referrer="https://r/")
    )
    assert produl.flush(timeout=10)

    requests = produl_collector.requests
    assert [r.status for r in requests] == [204, 204, 204]
    assert {r.method for r in requests} == {"POST"}
    assert {r.path for r in requests} == {"/api/collect"}
    # Keep-alive: every request came over the same client socket.
    assert len({r.client_port for r in requests}) == 1
    first = requests[0]
    assert first.headers["X-Produl-Server-Key"] == produl_collector.server_key
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["User-Agent"].startswith(f"produl-server-python/{__version__} (python ")
    assert json.loads(first.body) == {
        "t": "ev",
        "n": "invoice_paid",
        "p": "/webhooks/stripe",
        "u": "https://server/webhooks/stripe",
        "vi": "cus_abc123",
        "sk": "cus_abc123-session",
        "pr": {"amount_cents": 4900, "currency": "usd"},
    }
    assert produl_collector.events[1] == {
        "t": "pv",
        "p": "/pricing",
        "u": "https://server/pricing",
        "vi": "cus_abc123",
        "ti": "Pricing",
    }
    assert produl_collector.events[2]["r"] == "https://r/"


def test_ten_queued_events_are_sent_without_waiting_for_the_timer(produl_collector, make_client):
    produl = make_client(flush_interval=600, max_delay=600)
    for i in range(10):
        produl.track_event("e", {"i": i}, visitor_id="v")
    # The timers are ten minutes away: only the count can have triggered it.
    events = produl_collector.wait_for(10, timeout=20)
    assert [e["pr"]["i"] for e in events] == list(range(10))


def test_fewer_events_go_flush_interval_after_the_last_enqueue(produl_collector, make_client):
    produl = make_client(flush_interval=0.5)
    started = time.monotonic()
    produl.track_event("a", visitor_id="v")
    # 0.3 s later "a" is still queued; "b" restarts the 0.5 s timer, so
    # nothing may arrive before 0.5 s after "b" (0.8 s after "a").
    threading.Event().wait(0.3)
    assert produl_collector.events == []
    assert produl.stats.pending == 1
    produl.track_event("b", visitor_id="v")
    last_enqueue = time.monotonic()
    produl_collector.wait_for(2, timeout=20)
    arrived = time.monotonic()
    assert arrived - last_enqueue >= 0.5 - 0.01
    assert [e["n"] for e in produl_collector.events] == ["a", "b"]
    assert arrived - started < 15


def test_max_delay_caps_the_age_of_a_trickle(produl_collector, make_client):
    # One event every 0.1 s never lets a 0.5 s quiet period happen; without
    # max_delay nothing would be sent until the trickle stops.
    produl = make_client(flush_interval=0.5, max_delay=1.0, flush_at=1000)
    first = time.monotonic()
    stop = threading.Event()

    def trickle():
        for i in range(80):  # 8 seconds of trickle at most
            produl.track_event("tick", {"i": i}, visitor_id="v")
            if stop.wait(0.1):
                return

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        produl_collector.wait_for(1, timeout=20)
        # Sent while the trickle was still going, and not before max_delay.
        assert thread.is_alive()
        assert time.monotonic() - first >= 1.0 - 0.01
    finally:
        stop.set()
        thread.join()


def test_flush_sends_now_and_blocks_until_done(produl_collector, make_client):
    produl = make_client(flush_interval=600)
    for i in range(3):
        produl.track_event("e", {"i": i}, visitor_id="v")
    assert produl.flush(timeout=10) is True
    # The collector stores before it answers, so it holds all three now.
    assert len(produl_collector.events) == 3
    assert produl.stats.sent == 3
    assert produl.stats.pending == 0


def test_flush_returns_false_on_timeout_and_true_later(produl_collector, make_client):
    produl_collector.latency = 1.0
    produl = make_client()
    produl.track_event("slow", visitor_id="v")
    assert produl.flush(timeout=0.1) is False
    assert produl.flush(timeout=20) is True
    assert len(produl_collector.events) == 1


def test_flush_with_nothing_queued_is_immediate(make_client):
    produl = make_client()
    assert produl.flush(timeout=0) is True
    # Nothing to send: no sender thread was started for it.
    assert sender_threads() == []


@pytest.mark.parametrize(
    ("status", "retry_after"), [(429, 0.05), (429, None), (500, None), (503, None), (408, None)]
)
def test_bursts_of_retryable_answers_lose_nothing_and_duplicate_nothing(
    produl_collector, make_client, status, retry_after
):
    produl_collector.fail_next(6, status=status, retry_after=retry_after)
    produl = make_client()
    for i in range(25):
        produl.track_event("e", {"i": i}, visitor_id="v")
    assert produl.flush(timeout=30)
    assert sorted(e["pr"]["i"] for e in produl_collector.events) == list(range(25))
    # Order is kept too: a retry resends the head before anything behind it.
    assert [e["pr"]["i"] for e in produl_collector.events] == list(range(25))
    stats = produl.stats
    assert stats.sent == 25
    assert stats.retried == 6
    assert stats.dropped == {}
    assert [r.status for r in produl_collector.requests].count(status) == 6


def test_retry_after_is_honoured(produl_collector, make_client):
    produl_collector.fail_next(1, status=429, retry_after=1.0)
    produl = make_client()
    produl.track_event("e", visitor_id="v")
    assert produl.flush(timeout=20)
    first, second = produl_collector.requests
    assert second.time - first.time >= 1.0 - 0.01


def test_dropped_connections_are_retried(produl_collector, make_client):
    produl_collector.drop_next(3)
    produl = make_client()
    for i in range(5):
        produl.track_event("e", {"i": i}, visitor_id="v")
    assert produl.flush(timeout=30)
    assert [e["pr"]["i"] for e in produl_collector.events] == list(range(5))
    assert produl.stats.retried == 3


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, "rejected"),
        (413, "rejected"),
        (422, "rejected"),
        (404, "rejected"),
        (401, "unauthorized"),
        (403, "unauthorized"),
    ],
)
def test_refused_events_are_dropped_reported_and_do_not_block_the_rest(
    produl_collector, make_client, caplog, status, reason
):
    reported = []
    produl_collector.fail_next(1, status=status)
    produl = make_client(on_error=lambda error, event: reported.append((error, event)))
    for i in range(3):
        produl.track_event("e", {"i": i}, visitor_id="v")
    with caplog.at_level(logging.WARNING, logger="produl_server"):
        assert produl.flush(timeout=20) is False  # done, but events were dropped
        assert produl.stats.pending == 0
    assert [e["pr"]["i"] for e in produl_collector.events] == [1, 2]
    assert len(produl_collector.requests) == 3  # never retried
    assert produl.stats.dropped == {reason: 1}
    ((error, event),) = reported
    assert isinstance(error, DeliveryError)
    assert (error.reason, error.status) == (reason, status)
    assert event["pr"] == {"i": 0}
    assert f"HTTP {status}" in caplog.text


def test_a_wrong_key_is_reported_loudly_once(produl_collector, make_client, caplog):
    reported = []
    produl = make_client(server_key="sk_wrong_key_9999", on_error=lambda e, ev: reported.append(e))
    with caplog.at_level(logging.DEBUG, logger="produl_server"):
        for _ in range(3):
            produl.track_event("e", visitor_id="v")
        assert produl.flush(timeout=20) is False  # done, but events were dropped
        assert produl.stats.pending == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "PRODUL_SERVER_KEY" in errors[0].getMessage()
    assert "sk_…9999" in errors[0].getMessage()
    assert "sk_wrong_key_9999" not in caplog.text
    assert [e.reason for e in reported] == ["unauthorized"] * 3
    assert produl_collector.events == []
    # The collector's error body reaches the log, so the fix is obvious.
    assert "401" in errors[0].getMessage()


def test_events_are_given_up_after_max_retry_time(make_client, caplog):
    reported = []
    # A port nothing listens on: every attempt is a connection error.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    produl = make_client(
        api_url=f"http://127.0.0.1:{port}",
        max_retry_time=0.3,
        on_error=lambda e, ev: reported.append(e),
    )
    produl.track_event("e", visitor_id="v")
    with caplog.at_level(logging.WARNING, logger="produl_server"):
        assert produl.flush(timeout=20) is False  # done, but events were dropped
        assert produl.stats.pending == 0
    assert [e.reason for e in reported] == ["retries_exhausted"]
    assert produl.stats.dropped == {"retries_exhausted": 1}
    assert produl.stats.retried >= 1
    assert "gave up after" in caplog.text


def test_a_burst_within_the_quota_goes_at_once_and_the_rest_waits_for_the_window():
    # The quota is "N requests in any rolling minute": a burst of up to N is
    # sent at once, without smoothing, and request N+1 waits for the window.
    from produl_server import Produl
    from produl_server.testing import LocalCollector

    with LocalCollector(rate_limit=10) as collector:
        produl = Produl(
            server_key=collector.server_key,
            api_url=collector.url,
            max_requests_per_minute=10,
            flush_interval=600,
            spool_dir=False,  # the loss at shutdown is the point
        )
        try:
            for i in range(15):
                produl.track_event("e", {"i": i}, visitor_id="v")
            # The first ten go now: a smoothed pace (10/min) would need a minute.
            events = collector.wait_for(10, timeout=20)
            assert [e["pr"]["i"] for e in events] == list(range(10))
            assert produl.flush(timeout=0.5) is False
            assert len(collector.events) == 10
            assert [r.status for r in collector.requests] == [204] * 10
            assert produl.stats.pending == 5
        finally:
            produl.shutdown(timeout=0)
        assert produl.stats.dropped == {"shutdown": 5}


@pytest.mark.parametrize("max_in_flight", [1, 4])
def test_the_sender_survives_a_raising_hook_and_internal_errors(
    produl_collector, make_client, caplog, max_in_flight
):
    def hook(error, event):
        raise RuntimeError("hook bug")

    produl = make_client(on_error=hook, max_in_flight=max_in_flight)
    produl_collector.fail_next(1, status=400)
    produl.track_event("bad", visitor_id="v")
    with caplog.at_level(logging.ERROR, logger="produl_server"):
        assert produl.flush(timeout=10) is False  # done, but events were dropped
        assert produl.stats.pending == 0
        (sender,) = sender_threads()
        # Break the transport once from inside the sender thread.
        transport = produl._worker._transport
        real_send = transport.send
        calls = []

        def broken(body, timeout=None):
            calls.append(body)
            if len(calls) == 1:
                raise RuntimeError("internal bug")
            return real_send(body, timeout)

        transport.send = broken
        produl.track_event("after", visitor_id="v")
        assert produl.flush(timeout=20)
    assert "the on_error hook raised" in caplog.text
    assert "unexpected error in the sender" in caplog.text
    assert [e["n"] for e in produl_collector.events] == ["after"]
    # The same sender thread did it all, and still runs.
    assert sender.is_alive()
    assert sender_threads() == [sender]


def test_eight_threads_deliver_8000_events_exactly_once(produl_collector, make_client):
    produl = make_client()
    barrier = threading.Barrier(8)

    def work(t):
        barrier.wait()
        for i in range(1000):
            produl.track_event("e", {"t": t, "i": i}, visitor_id=f"v{t}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert produl.flush(timeout=120)
    seen = [(e["pr"]["t"], e["pr"]["i"]) for e in produl_collector.events]
    assert len(seen) == 8000
    assert set(seen) == {(t, i) for t in range(8) for i in range(1000)}
    # Per thread, order is preserved.
    for t in range(8):
        assert [i for tt, i in seen if tt == t] == list(range(1000))
    assert produl.stats.sent == 8000
    assert produl.stats.queued == 8000


def test_a_full_queue_drops_without_blocking_and_warns_once(produl_collector, make_client, caplog):
    reported = []
    produl_collector.hang()
    produl = make_client(
        max_queue_size=5,
        flush_at=1000,
        flush_interval=600,
        on_error=lambda e, ev: reported.append((e, ev)),
    )
    try:
        with caplog.at_level(logging.WARNING, logger="produl_server"):
            for i in range(9):
                produl.track_event("e", {"i": i}, visitor_id="v")
        stats = produl.stats
        assert stats.dropped == {"queue_full": 4}
        # Every tracked event is counted, and ends sent, dropped or pending.
        assert stats.queued == 9
        assert stats.pending == 5
        assert [e.reason for e, _ in reported] == ["queue_full"] * 4
        assert [ev["pr"]["i"] for _, ev in reported] == [5, 6, 7, 8]  # the hook sees each one
        warnings = [r for r in caplog.records if "queue is full" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        produl_collector.release()
    assert produl.flush(timeout=20) is False  # done, but events were dropped
    assert produl.stats.pending == 0
    assert [e["pr"]["i"] for e in produl_collector.events] == [0, 1, 2, 3, 4]


def test_disabled_client_validates_but_sends_nothing(produl_collector, make_client):
    produl = make_client(enabled=False)
    produl.track_event("ok", visitor_id="v")
    with pytest.raises(InvalidEventError):
        produl.track_event("", visitor_id="v")
    assert produl.flush(timeout=1)
    assert produl_collector.requests == []
    assert produl.stats.queued == 0
    assert sender_threads() == []


def test_sync_mode_sends_on_the_callers_thread(produl_collector, make_client):
    produl = make_client(sync_mode=True)
    produl.track_event("now", visitor_id="v")
    # Delivered before track_event returned, and no thread was started.
    assert [e["n"] for e in produl_collector.events] == ["now"]
    assert sender_threads() == []
    # A fixed pause (Retry-After), not a jittered backoff that a slow
    # machine may outlast before the call returns: it stays pending.
    produl_collector.fail_next(1, status=503, retry_after=2)
    produl.track_event("later", visitor_id="v")
    assert produl.stats.pending == 1
    assert produl.flush(timeout=10)
    assert [e["n"] for e in produl_collector.events] == ["now", "later"]


def test_raise_on_invalid_false_turns_errors_into_counted_drops(make_client, caplog):
    reported = []
    produl = make_client(raise_on_invalid=False, on_error=lambda e, ev: reported.append((e, ev)))
    with caplog.at_level(logging.WARNING, logger="produl_server"):
        produl.track_event("n", {"s": {1}}, visitor_id="v")
        produl.track_pageview(path="no-slash", visitor_id="v")
        produl.track_pageview("not data")  # type: ignore[arg-type]
    assert produl.stats.dropped == {"invalid": 3}
    assert [e.reason for e, _ in reported] == ["invalid"] * 3
    assert reported[0][1]["n"] == "n"
    assert 'properties["s"]' in caplog.text


def test_pageview_data_must_be_pageview_data(make_client):
    produl = make_client()
    with pytest.raises(InvalidEventError, match="data: must be a PageviewData"):
        produl.track_pageview({"path": "/x"})  # type: ignore[arg-type]


def test_shutdown_is_idempotent_and_later_events_are_reported(produl_collector, make_client):
    reported = []
    with make_client(flush_interval=600, on_error=lambda e, ev: reported.append(e)) as produl:
        produl.track_event("inside", visitor_id="v")
    assert [e["n"] for e in produl_collector.events] == ["inside"]
    produl.shutdown()
    produl.shutdown(timeout=0)
    produl.track_event("after", visitor_id="v")
    assert [e.reason for e in reported] == ["shutdown"]
    assert produl.stats.dropped == {"shutdown": 1}
    assert "shut down" in repr(produl)
    assert produl.flush(timeout=1) is False  # done, but events were dropped
    assert produl.stats.pending == 0


def test_shutdown_reports_what_it_could_not_deliver(hung_collector, make_client, caplog):
    produl = make_client(flush_interval=600, api_url=hung_collector.url, spool_dir=False)
    for i in range(3):
        produl.track_event("e", {"i": i}, visitor_id="v")
    with caplog.at_level(logging.WARNING, logger="produl_server"):
        produl.shutdown(timeout=0.5)
    assert produl.stats.dropped == {"shutdown": 3}
    assert "3 event(s) not delivered" in caplog.text


def test_debug_logs_show_outcome_and_latency(produl_collector, make_client, caplog):
    produl = make_client()
    with caplog.at_level(logging.DEBUG, logger="produl_server"):
        produl.track_event("e", {"secret_prop": "top"}, visitor_id="v")
        assert produl.flush(timeout=10)
    lines = [r.getMessage() for r in caplog.records]
    assert any("/api/collect -> 204 in" in line and " ms " in line for line in lines)
    assert "top" not in caplog.text


@pytest.mark.parametrize("status", [None, 500, 429])
def test_a_backlog_goes_out_on_several_connections_in_per_visitor_order(
    produl_collector, make_client, status
):
    produl_collector.latency = 0.05
    if status:
        produl_collector.fail_next(5, status=status, retry_after=0.05 if status == 429 else None)
    produl = make_client(max_in_flight=4, flush_interval=600)
    for i in range(60):
        produl.track_event("e", {"i": i}, visitor_id=f"v{i % 6}")
    assert produl.flush(timeout=60)
    events = produl_collector.events
    assert sorted(e["pr"]["i"] for e in events) == list(range(60))  # once each
    for visitor in range(6):
        mine = [e["pr"]["i"] for e in events if e["vi"] == f"v{visitor}"]
        assert mine == sorted(mine), f"visitor v{visitor} out of order: {mine}"
    ports = {r.client_port for r in produl_collector.requests}
    assert 1 < len(ports) <= 4
    assert produl.stats.sent == 60
    assert produl.stats.dropped == {}


def test_without_a_backlog_one_connection_is_enough(produl_collector, make_client):
    produl = make_client(max_in_flight=4, flush_at=5)
    for round_ in range(4):
        for i in range(3):
            produl.track_event("e", {"i": i}, visitor_id=f"v{round_}{i}")
        assert produl.flush(timeout=10)
    assert len(produl_collector.events) == 12
    assert len({r.client_port for r in produl_collector.requests}) == 1


def test_429s_never_use_up_an_events_retry_time(produl_collector, make_client):
    # max_retry_time is far shorter than the 429 episode: 429s must not count.
    produl_collector.fail_next(8, status=429, retry_after=0.1)
    produl = make_client(max_retry_time=0.2)
    produl.track_event("patient", visitor_id="v")
    assert produl.flush(timeout=30)
    assert [e["n"] for e in produl_collector.events] == ["patient"]
    assert produl.stats.dropped == {}
    assert produl.stats.retried == 8


def test_in_a_long_outage_later_events_get_one_attempt_each(make_client):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    reported = []
    produl = make_client(
        api_url=f"http://127.0.0.1:{port}",
        max_retry_time=0.3,
        flush_interval=600,
        on_error=lambda e, ev: reported.append(ev["pr"]["i"]),
    )
    produl.track_event("e", {"i": 0}, visitor_id="v")
    assert produl.flush(timeout=20) is False  # the first one used up the outage budget
    assert produl.stats.pending == 0
    started_attempts = produl.stats.retried
    for i in range(1, 6):
        produl.track_event("e", {"i": i}, visitor_id="v")
    assert produl.flush(timeout=20) is False  # each given up after one attempt
    assert produl.stats.pending == 0
    assert reported == [0, 1, 2, 3, 4, 5]
    # Each later event was tried once and given up: the outage is old.
    assert produl.stats.retried == started_attempts
    assert produl.stats.dropped == {"retries_exhausted": 6}


def test_events_lost_at_the_shutdown_deadline_reach_the_hook(hung_collector, make_client):
    reported = []
    produl = make_client(
        api_url=hung_collector.url,
        flush_interval=600,
        on_error=lambda e, ev: reported.append((e.reason, ev["pr"]["i"])),
        spool_dir=False,
    )
    for i in range(3):
        produl.track_event("e", {"i": i}, visitor_id="v")
    produl.shutdown(timeout=0.3)
    assert sorted(reported) == [("shutdown", 0), ("shutdown", 1), ("shutdown", 2)]


def test_shutdown_ends_every_sender_thread(produl_collector, make_client):
    before = set(threading.enumerate())
    produl = make_client(max_in_flight=3, flush_interval=600)
    produl.track_event("e", visitor_id="v")
    assert produl.flush(timeout=10)
    # No backlog yet: the sender alone, no lane threads.
    mine = [
        t for t in set(threading.enumerate()) - before if t.name.startswith("produl-server.sender")
    ]
    assert [t.name for t in mine] == ["produl-server.sender"]
    produl_collector.latency = 0.05  # a backlog at real latency starts the lanes
    for i in range(40):
        produl.track_event("e", {"i": i}, visitor_id=f"v{i}")
    assert produl.flush(timeout=30)
    mine = [
        t for t in set(threading.enumerate()) - before if t.name.startswith("produl-server.sender")
    ]
    # The sender and three lanes; on Python 3.12 the exit's lanes too, started
    # ahead with them (none can start at exit there).
    assert len(mine) == 1 + (3 if STARTS_AT_EXIT else exit_lanes(3))
    produl.shutdown(timeout=5)
    for thread in mine:
        thread.join(timeout=10)
    assert [t for t in mine if t.is_alive()] == []
    assert len(produl_collector.events) == 41


def test_a_429_after_an_outage_does_not_end_the_event(produl_collector, make_client):
    # The event fails with a 500 (its clock starts), then meets 429s for
    # longer than max_retry_time: it must still be delivered.
    produl_collector.fail_next(1, status=500)
    produl_collector.fail_next(6, status=429, retry_after=0.1)
    produl = make_client(max_retry_time=0.3)
    produl.track_event("e", visitor_id="v")
    assert produl.flush(timeout=30)
    assert [e["n"] for e in produl_collector.events] == ["e"]
    assert produl.stats.dropped == {}
