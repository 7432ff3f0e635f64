"""The scheduling rules, driven with plain numbers for the time: no clock, no sleep."""

from __future__ import annotations

import itertools

import pytest

from produl_server import Config
from produl_server._ledger import Ledger
from produl_server._quota import QUOTA_WINDOW, RollingQuota
from produl_server._schedule import Batching, Schedule, Verdict
from produl_server.collector import RateLimiter


def config(**options):
    options.setdefault("server_key", "sk_test_key_0000")
    return Config(**options)


# -- batching ---------------------------------------------------------------


def test_nothing_queued_is_never_due():
    assert Batching(10, 5.0, 30.0).due_in(100.0, 0, 0.0, 0.0) is None


def test_flush_at_events_are_due_at_once():
    batching = Batching(10, 5.0, 30.0)
    assert batching.due_in(100.0, 10, 99.9, 99.9) == 0.0
    assert batching.due_in(100.0, 9, 99.9, 99.9) == pytest.approx(4.9)


def test_the_timer_runs_from_the_last_enqueue():
    batching = Batching(10, 5.0, 30.0)
    # Queued at 0 and at 3: due at 8, not at 5.
    assert batching.due_in(4.0, 2, 0.0, 3.0) == pytest.approx(4.0)
    assert batching.due_in(8.0, 2, 0.0, 3.0) == 0.0


def test_max_delay_caps_the_age_of_the_oldest():
    batching = Batching(1000, 5.0, 30.0)
    # A trickle every 4 s would postpone the 5 s timer forever.
    assert batching.due_in(28.0, 8, 0.0, 28.0) == pytest.approx(2.0)
    assert batching.due_in(31.0, 9, 0.0, 31.0) == 0.0


# -- the rolling quota ------------------------------------------------------


def test_a_burst_up_to_the_quota_goes_at_once():
    quota = RollingQuota(5, window=60.0)
    assert [quota.take(10.0) for _ in range(5)] == [0.0] * 5
    assert quota.take(10.0) == pytest.approx(60.0)
    assert quota.used == 5


def test_request_n_plus_one_waits_for_the_oldest_to_leave_the_window():
    quota = RollingQuota(3, window=60.0)
    for now in (0.0, 20.0, 40.0):
        assert quota.take(now) == 0.0
    assert quota.take(50.0) == pytest.approx(10.0)
    assert quota.take(60.0) == 0.0  # the request of 0.0 left
    assert quota.take(61.0) == pytest.approx(19.0)


def test_no_quota_never_waits():
    quota = RollingQuota(None)
    assert all(quota.take(0.0) == 0.0 for _ in range(10_000))


def drive(quota, server, arrivals, horizon):
    """Send what arrives as soon as the quota allows; count the server's refusals.

    Args:
        quota: The client's RollingQuota.
        server: A RateLimiter whose clock reads ``clock[0]``.
        arrivals: (time, events) pairs, in order.
        horizon: When to stop.
    """
    now, waiting, sent, refused = 0.0, 0, 0, 0
    clock[0] = now
    arrivals = list(arrivals)
    while now < horizon:
        while arrivals and arrivals[0][0] <= now:
            waiting += arrivals.pop(0)[1]
        if waiting:
            pause = quota.take(now)
            if not pause:
                clock[0] = now
                waiting -= 1
                sent += 1
                if server.acquire("client") is not None:
                    refused += 1
                continue
            step = pause
        else:
            step = arrivals[0][0] - now if arrivals else horizon - now
        now += max(step, 1e-3)
    return sent, refused


clock = [0.0]


@pytest.mark.parametrize("mode", ["fixed", "sliding", "bucket"])
@pytest.mark.parametrize(
    "arrivals",
    [
        pytest.param([(0.0, 5000)], id="one-overload"),
        pytest.param([(t * 7.0, 700) for t in range(40)], id="bursts"),
        pytest.param([(t * 0.01, 1) for t in range(30_000)], id="steady-overload"),
    ],
)
def test_the_client_never_meets_a_429_under_any_quota_shape(mode, arrivals):
    server = RateLimiter(2000, mode=mode, window=60.0, clock=lambda: clock[0])
    quota = RollingQuota(2000)
    sent, refused = drive(quota, server, arrivals, horizon=300.0)
    assert refused == 0
    # And it uses the quota: in 300 s, at least 4 windows' worth, or all.
    assert sent >= min(sum(n for _, n in arrivals), 4 * 2000)


def test_the_window_has_a_margin_for_the_trip():
    assert QUOTA_WINDOW > 60.0


# -- backoff, Retry-After and the outage clock ------------------------------


def test_backoff_doubles_under_full_jitter_up_to_the_maximum():
    ceilings = []
    schedule = Schedule(
        config(retry_initial_delay=0.5, retry_max_delay=4.0),
        uniform=lambda low, high: ceilings.append((low, high)) or high,
    )
    for _ in range(6):
        schedule.failed(0.0, rate_limited=False, retry_after=None, failing_since=None)
    assert ceilings == [(0.0, 0.5), (0.0, 1.0), (0.0, 2.0), (0.0, 4.0), (0.0, 4.0), (0.0, 4.0)]


def test_an_answer_resets_the_backoff():
    schedule = Schedule(config(), uniform=lambda low, high: high)
    for _ in range(4):
        schedule.failed(0.0, rate_limited=False, retry_after=None, failing_since=None)
    schedule.answered()
    _, pause, _ = schedule.failed(0.0, rate_limited=False, retry_after=None, failing_since=None)
    assert pause == 0.5


def test_retry_after_wins_over_the_backoff_and_holds_the_gate():
    schedule = Schedule(config(), uniform=lambda low, high: high)
    verdict, pause, _ = schedule.failed(
        10.0, rate_limited=True, retry_after=7.0, failing_since=None
    )
    assert (verdict, pause) == (Verdict.RETRY, 7.0)
    assert schedule.gate(12.0) == pytest.approx(5.0)
    assert schedule.gate(17.0) == 0.0


def test_429s_never_use_up_retry_time():
    schedule = Schedule(config(max_retry_time=1.0), uniform=lambda low, high: 0.0)
    since = None
    for now in itertools.count(0.0, 100.0):
        if now > 10_000:
            break
        verdict, _, since = schedule.failed(
            now, rate_limited=True, retry_after=None, failing_since=since
        )
        assert verdict is Verdict.RETRY
    assert since is None


def test_an_event_gives_up_max_retry_time_after_the_outage_began():
    schedule = Schedule(config(max_retry_time=60.0), uniform=lambda low, high: 0.0)
    verdict, _, since = schedule.failed(
        100.0, rate_limited=False, retry_after=None, failing_since=None
    )
    assert (verdict, since) == (Verdict.RETRY, 100.0)
    verdict, _, since = schedule.failed(
        159.0, rate_limited=False, retry_after=None, failing_since=since
    )
    assert verdict is Verdict.RETRY
    verdict, _, _ = schedule.failed(
        160.0, rate_limited=False, retry_after=None, failing_since=since
    )
    assert verdict is Verdict.GIVE_UP


def test_the_last_try_falls_when_the_retry_time_runs_out_not_a_backoff_later():
    # The CLI's --timeout 3 (max_retry_time) took 5 s: the backoff before the
    # last try ran past the retry time. It is cut to the time left.
    schedule = Schedule(
        config(max_retry_time=3.0, retry_initial_delay=2.0, retry_max_delay=30.0),
        uniform=lambda low, high: high,
    )
    verdict, pause, since = schedule.failed(
        0.0, rate_limited=False, retry_after=None, failing_since=None
    )
    assert (verdict, pause) == (Verdict.RETRY, 2.0)
    verdict, pause, since = schedule.failed(
        2.0, rate_limited=False, retry_after=None, failing_since=since
    )
    assert (verdict, pause) == (Verdict.RETRY, 1.0)  # the backoff said 4 s
    verdict, _, _ = schedule.failed(3.0, rate_limited=False, retry_after=None, failing_since=since)
    assert verdict is Verdict.GIVE_UP


def test_in_an_old_outage_a_new_event_gets_one_attempt():
    schedule = Schedule(config(max_retry_time=60.0), uniform=lambda low, high: 0.0)
    schedule.failed(0.0, rate_limited=False, retry_after=None, failing_since=None)
    # A fresh event (failing_since=None) fails at 500 s: the outage began at 0.
    verdict, _, since = schedule.failed(
        500.0, rate_limited=False, retry_after=None, failing_since=None
    )
    assert (verdict, since) == (Verdict.GIVE_UP, 0.0)


def test_the_outage_clock_stops_when_the_collector_answers():
    schedule = Schedule(config(max_retry_time=60.0), uniform=lambda low, high: 0.0)
    schedule.failed(0.0, rate_limited=False, retry_after=None, failing_since=None)
    schedule.answered()
    verdict, _, since = schedule.failed(
        500.0, rate_limited=False, retry_after=None, failing_since=None
    )
    assert (verdict, since) == (Verdict.RETRY, 500.0)


def test_a_429_after_an_outage_keeps_the_event():
    schedule = Schedule(config(max_retry_time=1.0), uniform=lambda low, high: 0.0)
    _, _, since = schedule.failed(0.0, rate_limited=False, retry_after=None, failing_since=None)
    verdict, _, _ = schedule.failed(50.0, rate_limited=True, retry_after=None, failing_since=since)
    assert verdict is Verdict.RETRY


def test_the_gate_combines_the_backoff_and_the_quota():
    schedule = Schedule(config(max_requests_per_minute=2), uniform=lambda low, high: high)
    assert schedule.gate(0.0) == 0.0
    assert schedule.gate(0.0) == 0.0
    assert schedule.gate(1.0) == pytest.approx(QUOTA_WINDOW - 1.0)
    schedule.failed(1.0, rate_limited=False, retry_after=None, failing_since=None)
    assert schedule.gate(1.1) == pytest.approx(0.4)


# -- the ledger --------------------------------------------------------------


def test_the_ledger_waits_for_every_event_up_to_the_target_in_any_order():
    ledger = Ledger()
    seqs = [ledger.accept() for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    ledger.finish(3)
    ledger.finish(2, "rejected")
    assert not ledger.done_through(2)
    ledger.finish(1)
    assert ledger.done_through(3)
    assert not ledger.wait(5, timeout=0)
    ledger.finish(5)
    ledger.finish(4)
    assert ledger.wait(5, timeout=0)
    stats = ledger.stats()
    assert (stats.queued, stats.sent, stats.dropped, stats.pending) == (5, 4, {"rejected": 1}, 0)


def test_the_ledger_counts_each_event_once():
    ledger = Ledger()
    seq = ledger.accept()
    ledger.accept()
    assert ledger.abandon("shutdown") == 2
    # The request in flight at the deadline answers later: not counted again.
    assert ledger.finish(seq) is False
    stats = ledger.stats()
    assert (stats.queued, stats.sent, stats.dropped, stats.pending) == (2, 0, {"shutdown": 2}, 0)
