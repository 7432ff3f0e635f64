"""The pace history behind the live page's chart: a fake clock, then real HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
import urllib3

from produl_server._protocol import KEY_HEADER
from produl_server.collector import PaceHistory, PaceSecond
from produl_server.testing import LocalCollector

EVENT = json.dumps({"t": "ev", "n": "paced", "vi": "u1"}).encode()


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.25

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


# -- the history, on a fake clock ----------------------------------------------


def test_counts_requests_and_429s_per_second(clock: Clock) -> None:
    pace = PaceHistory(10, clock=clock)
    pace.count()
    pace.count(rate_limited=True)
    clock.now += 0.7  # the same second
    pace.count()
    clock.now += 2.0
    pace.count(rate_limited=True)

    now, seconds = pace.seconds()

    assert now == 1_700_000_002
    assert seconds == [
        PaceSecond(1_700_000_000, 3, 1),
        PaceSecond(1_700_000_002, 1, 1),
    ]
    assert seconds[0].as_json() == {"t": 1_700_000_000, "requests": 3, "rate_limited": 1}


def test_quiet_history_is_empty(clock: Clock) -> None:
    assert PaceHistory(5, clock=clock).seconds() == (1_700_000_000, [])


def test_forgets_seconds_older_than_the_window(clock: Clock) -> None:
    pace = PaceHistory(10, clock=clock)
    pace.count()
    clock.now += 9
    pace.count()
    assert [s.t for s in pace.seconds()[1]] == [1_700_000_000, 1_700_000_009]
    clock.now += 1  # the first second is now 10 s old: out of the window
    assert [s.t for s in pace.seconds()[1]] == [1_700_000_009]


def test_a_reused_slot_starts_from_zero(clock: Clock) -> None:
    pace = PaceHistory(3, clock=clock)
    for _ in range(5):
        pace.count()
    clock.now += 3  # the same slot of the ring, three seconds later
    pace.count(rate_limited=True)
    assert pace.seconds()[1] == [PaceSecond(1_700_000_003, 1, 1)]


def test_memory_is_bounded_by_the_window(clock: Clock) -> None:
    pace = PaceHistory(60, clock=clock)
    for _ in range(1000):
        pace.count()
        clock.now += 1
    assert len(pace._slots) == 60
    seconds = pace.seconds()[1]
    assert len(seconds) == 59  # the current second has no request yet
    assert seconds[-1].t == pace.now() - 1


def test_a_clock_stepping_back_hides_the_future_seconds(clock: Clock) -> None:
    pace = PaceHistory(10, clock=clock)
    pace.count()
    clock.now -= 5
    assert pace.seconds()[1] == []  # a second "from the future" is not shown
    pace.count()
    assert pace.seconds()[1] == [PaceSecond(1_699_999_995, 1, 0)]


def test_clear_forgets_everything(clock: Clock) -> None:
    pace = PaceHistory(10, clock=clock)
    pace.count(rate_limited=True)
    pace.clear()
    assert pace.seconds()[1] == []


def test_counts_from_many_threads_add_up(clock: Clock) -> None:
    pace = PaceHistory(10, clock=clock)
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait()
        for i in range(500):
            pace.count(rate_limited=i % 5 == 0)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert pace.seconds()[1] == [PaceSecond(1_700_000_000, 4000, 800)]


@pytest.mark.parametrize("window", [0, -3])
def test_refuses_an_empty_window(window: int) -> None:
    with pytest.raises(ValueError, match="at least one second"):
        PaceHistory(window)


# -- GET /api/pace over real HTTP ----------------------------------------------


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    pool = urllib3.PoolManager(maxsize=1, retries=False, timeout=10.0)
    yield pool
    pool.clear()


@pytest.fixture
def limited() -> Iterator[LocalCollector]:
    # A fixed window of a minute: exactly 3 of a quick burst get through.
    with LocalCollector(rate_limit=3, rate_limit_mode="fixed") as collector:
        yield collector


def post(http: urllib3.PoolManager, collector: LocalCollector, path: str = "/api/collect") -> int:
    headers = {KEY_HEADER: collector.server_key}
    return http.request("POST", collector.url + path, body=EVENT, headers=headers).status


def get_pace(
    http: urllib3.PoolManager, collector: LocalCollector, headers: dict[str, str] | None = None
) -> dict:  # type: ignore[type-arg]
    if headers is None:
        headers = {"Authorization": f"Bearer {collector.access_token}"}
    response = http.request("GET", collector.url + "/api/pace", headers=headers)
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert "Access-Control-Allow-Origin" not in response.headers
    return json.loads(response.data)  # type: ignore[no-any-return]


def test_pace_counts_a_burst_and_its_429s(
    http: urllib3.PoolManager, limited: LocalCollector
) -> None:
    statuses = [post(http, limited) for _ in range(5)] + [post(http, limited, "/r")]
    assert statuses == [204, 204, 204, 429, 429, 429]

    body = get_pace(http, limited)

    assert body["window"] == 300
    assert body["quota_per_minute"] == 3
    assert isinstance(body["now"], int)
    seconds = body["seconds"]
    assert sum(s["requests"] for s in seconds) == 6
    assert sum(s["rate_limited"] for s in seconds) == 3
    assert all(body["now"] - 300 < s["t"] <= body["now"] for s in seconds)
    assert [s["t"] for s in seconds] == sorted(s["t"] for s in seconds)


def test_pace_counts_only_the_collection_api(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    assert post(http, produl_collector, "/api/nothing") == 404
    assert http.request("GET", produl_collector.url + "/healthz").status == 200
    get_pace(http, produl_collector)
    assert post(http, produl_collector) == 204

    body = get_pace(http, produl_collector)

    assert body["quota_per_minute"] is None  # LocalCollector has no limit by default
    assert [(s["requests"], s["rate_limited"]) for s in body["seconds"]] == [(1, 0)]


def test_pace_counts_other_refusals_but_marks_only_429s(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    headers = {KEY_HEADER: "wrong"}
    response = http.request(
        "POST", produl_collector.url + "/api/collect", body=EVENT, headers=headers
    )
    assert response.status == 401
    produl_collector.fail_next(1, status=429)
    assert post(http, produl_collector) == 429

    seconds = get_pace(http, produl_collector)["seconds"]

    assert sum(s["requests"] for s in seconds) == 2
    assert sum(s["rate_limited"] for s in seconds) == 1


def test_a_reset_collector_starts_a_fresh_pace(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    assert post(http, produl_collector) == 204
    produl_collector.reset()
    assert get_pace(http, produl_collector)["seconds"] == []


def test_quota_of_a_short_window_is_given_per_minute(http: urllib3.PoolManager) -> None:
    with LocalCollector(rate_limit=5, rate_limit_window=2.0) as collector:
        assert get_pace(http, collector)["quota_per_minute"] == 150


def test_quota_that_is_not_whole_per_minute_stays_exact(http: urllib3.PoolManager) -> None:
    with LocalCollector(rate_limit=1, rate_limit_window=7.0) as collector:
        assert get_pace(http, collector)["quota_per_minute"] == pytest.approx(60 / 7)


def test_pace_accepts_the_server_key_too(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    key = produl_collector.server_key
    assert get_pace(http, produl_collector, {KEY_HEADER: key})["seconds"] == []
    assert get_pace(http, produl_collector, {"Authorization": f"Bearer {key}"})["seconds"] == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {KEY_HEADER: "wrong"}, {"Authorization": "Basic x"}],
)
def test_pace_needs_the_token_or_the_key(
    http: urllib3.PoolManager, produl_collector: LocalCollector, headers: dict[str, str]
) -> None:
    response = http.request("GET", produl_collector.url + "/api/pace", headers=headers)

    assert response.status == 401
    assert json.loads(response.data)["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Access-Control-Allow-Origin" not in response.headers
