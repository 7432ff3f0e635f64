"""The three rate-limit shapes (issue #11): fake-clock rules, then real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import urllib3

from produl_server._protocol import KEY_HEADER
from produl_server.collector import CollectorServer, MemoryStore, RateLimiter
from produl_server.testing import LocalCollector

EVENT = {"t": "ev", "n": "burst", "vi": "u1"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def take(limiter: RateLimiter, n: int, key: str = "ip") -> list[int | None]:
    return [limiter.acquire(key) for _ in range(n)]


# -- fixed ---------------------------------------------------------------------


def test_fixed_allows_n_per_window_then_resets_at_once(clock: Clock) -> None:
    limiter = RateLimiter(3, mode="fixed", clock=clock)

    assert take(limiter, 3) == [None] * 3
    clock.now += 20
    assert limiter.acquire("ip") == 40  # the window opened 20 s ago
    clock.now += 39.5
    assert limiter.acquire("ip") == 1
    clock.now += 0.5  # the window ends: the whole quota is back at once
    assert take(limiter, 4) == [None, None, None, 60]


def test_fixed_lets_2n_through_across_a_window_edge(clock: Clock) -> None:
    limiter = RateLimiter(3, mode="fixed", clock=clock)
    assert take(limiter, 1) == [None]
    clock.now += 59.9
    assert take(limiter, 2) == [None, None]
    clock.now += 0.2
    assert take(limiter, 4) == [None, None, None, 60]  # 5 in 0.3 s


# -- sliding -------------------------------------------------------------------


def test_sliding_counts_the_last_window_only(clock: Clock) -> None:
    limiter = RateLimiter(3, mode="sliding", clock=clock)

    assert take(limiter, 1) == [None]
    clock.now += 30
    assert take(limiter, 3) == [None, None, 30]  # the first leaves at +60
    clock.now += 30  # exactly 60 s after the first
    assert take(limiter, 2) == [None, 30]
    clock.now += 59.9
    assert take(limiter, 3) == [None, None, 1]  # the +60 one stays until +120


def test_sliding_never_lets_more_than_n_into_any_window(clock: Clock) -> None:
    limiter = RateLimiter(5, mode="sliding", clock=clock)
    allowed: list[float] = []
    for _ in range(600):  # a request every 0.7 s for 7 minutes
        if limiter.acquire("ip") is None:
            allowed.append(clock.now)
        clock.now += 0.7
    assert all(later - earlier >= 60 for earlier, later in zip(allowed, allowed[5:], strict=False))
    assert len(allowed) >= 5 * 7


# -- bucket --------------------------------------------------------------------


def test_bucket_bursts_n_then_refills_n_per_window(clock: Clock) -> None:
    limiter = RateLimiter(60, mode="bucket", clock=clock)  # one token a second

    assert take(limiter, 60) == [None] * 60
    assert limiter.acquire("ip") == 1
    clock.now += 1.0
    assert take(limiter, 2) == [None, 1]
    clock.now += 3600
    assert take(limiter, 61).count(None) == 60  # capped at N


def test_bucket_is_the_default_and_a_clock_stepping_back_drains_nothing(clock: Clock) -> None:
    limiter = RateLimiter(2, clock=clock)
    assert limiter.mode == "bucket"
    assert take(limiter, 1) == [None]
    clock.now -= 50
    assert take(limiter, 2) == [None, 30]


# -- shared rules --------------------------------------------------------------


@pytest.mark.parametrize(("mode", "wait"), [("fixed", 60), ("sliding", 60), ("bucket", 30)])
def test_each_mode_is_per_key_refusals_use_no_quota_and_reset_forgets(
    clock: Clock, mode: str, wait: int
) -> None:
    limiter = RateLimiter(2, mode=mode, clock=clock)
    assert take(limiter, 2, "a") == [None, None]
    assert take(limiter, 50, "a") == [wait] * 50
    assert take(limiter, 2, "b") == [None, None]
    clock.now += 60
    assert take(limiter, 2, "a") == [None, None]  # the 50 refusals counted for nothing
    limiter.reset()
    assert take(limiter, 2, "a") == [None, None]


@pytest.mark.parametrize(("mode", "wait"), [("fixed", 2), ("sliding", 2), ("bucket", 1)])
def test_a_shorter_window_scales_every_mode(clock: Clock, mode: str, wait: int) -> None:
    limiter = RateLimiter(4, mode=mode, window=2.0, clock=clock)
    assert take(limiter, 5) == [None] * 4 + [wait]
    clock.now += 2.0
    assert take(limiter, 4) == [None] * 4


@pytest.mark.parametrize("mode", ["fixed", "sliding", "bucket"])
def test_idle_clients_are_forgotten(clock: Clock, mode: str) -> None:
    limiter = RateLimiter(1, mode=mode, clock=clock)
    for n in range(100):
        limiter.acquire(f"10.0.0.{n}")
    clock.now += 500
    limiter.acquire("other")
    assert list(limiter._quotas) == ["other"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"limit": 0}, "positive"),
        ({"limit": 1, "window": 0.0}, "window"),
        ({"limit": 1, "mode": "leaky"}, "mode"),
    ],
)
def test_bad_options_are_refused(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        RateLimiter(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rate_limit_mode": "leaky"}, "mode"), ({"rate_limit_window": -1.0}, "window")],
)
def test_local_collector_refuses_bad_options(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        LocalCollector(rate_limit=10, **kwargs)


def test_the_server_checks_the_mode_even_with_limits_off() -> None:
    with pytest.raises(ValueError, match="mode"):
        CollectorServer(
            store=MemoryStore(),
            server_key="sk_x",
            rate_limit=None,
            keyless_rate_limit=None,
            rate_limit_mode="nope",
        )


# -- over real HTTP ------------------------------------------------------------


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    pool = urllib3.PoolManager(maxsize=1, retries=False, timeout=10.0)
    yield pool
    pool.clear()


@pytest.mark.parametrize("mode", ["fixed", "sliding", "bucket"])
def test_the_request_after_n_in_a_window_gets_429(http: urllib3.PoolManager, mode: str) -> None:
    # 60 s windows: nothing refills while the 6 requests run, on any machine.
    with LocalCollector(rate_limit=5, rate_limit_mode=mode) as collector:
        answers = [
            http.request(
                "POST",
                collector.url + "/api/collect",
                body=json.dumps(EVENT).encode(),
                headers={KEY_HEADER: collector.server_key},
            )
            for _ in range(6)
        ]
        assert [a.status for a in answers] == [204] * 5 + [429]
        limited = answers[-1]
        assert json.loads(limited.data)["error"] == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert len(collector.events) == 5
