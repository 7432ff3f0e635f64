"""Flask under gunicorn --preload with 2 workers: nothing lost, at run time or at SIGTERM."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from integration_support import app_env, serve_gunicorn

pytest.importorskip("flask")
pytest.importorskip("gunicorn")

pytestmark = pytest.mark.slow

N = 100


def serve_flask(spawn, collector, **env):
    return serve_gunicorn(
        spawn,
        app_env(collector, **env),
        "produl_flask_demo:app",
        *("--preload", "--workers", "2"),
        name="gunicorn-flask",
    )


def hit_items(base: str) -> None:
    def get(number: int) -> int:
        # A session per request: each one a new connection, spread over the workers.
        with (
            requests.Session() as http,
            http.get(
                f"{base}/items/{number}", headers={"X-Customer": f"c{number}"}, timeout=10
            ) as answer,
        ):
            return answer.status_code

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(get, range(N))) == {200}


def check_all_delivered(collector, base: str) -> set[int]:
    events = collector.events
    items = [e for e in events if e["t"] == "ev"]
    pageviews = [e for e in events if e["t"] == "pv"]
    assert sorted(e["pr"]["number"] for e in items) == list(range(N))
    assert sorted(int(e["p"].rsplit("/", 1)[1]) for e in pageviews) == list(range(N))
    for event in items:
        number = event["pr"]["number"]
        assert event["p"] == f"/items/{number}"
        assert event["u"] == f"{base}/items/{number}"
        assert event["vi"] == f"c{number}"
    return {e["pr"]["pid"] for e in items}


@pytest.mark.parametrize(
    "mode",
    [
        "running",  # default batching: delivered while the workers serve
        "sigterm",  # nothing sent before SIGTERM: only the workers' exit flush can deliver
    ],
)
def test_preload_with_two_workers_loses_nothing(spawn, produl_collector, mode):
    env = {}
    if mode == "sigterm":
        env = {
            "FLASK_PRODUL_FLUSH_AT": "1000",
            "FLASK_PRODUL_FLUSH_INTERVAL": "600",
            "FLASK_PRODUL_MAX_DELAY": "600",
        }
    proc, base = serve_flask(spawn, produl_collector, **env)
    hit_items(base)
    if mode == "running":
        produl_collector.wait_for(2 * N, timeout=30)
    else:
        assert produl_collector.events == []
    proc.signal(signal.SIGTERM)
    assert proc.wait(40) == 0, proc.output()[-3000:]

    pids = check_all_delivered(produl_collector, base)
    assert len(produl_collector.events) == 2 * N
    assert "not delivered" not in proc.output()
    print(
        f"flask/gunicorn --preload ({mode}): {2 * N} tracked by {len(pids)} workers, "
        f"{len(produl_collector.events)} delivered"
    )


def test_pageviews_carry_the_sites_session_and_the_visitors_language(spawn, produl_collector):
    # Issue #20 item 5: the site copies the browser tracker's session into a
    # cookie of its own (the demo's PRODUL_SESSION_KEY reads it), and the
    # pageview carries the first tag of Accept-Language.
    _proc, base = serve_flask(spawn, produl_collector)
    headers = {"X-Customer": "c1", "Accept-Language": "pt-BR,pt;q=0.9,en;q=0.5"}
    cookies = {"demo_session": "tracker-session-9"}
    with requests.get(f"{base}/items/1", headers=headers, cookies=cookies, timeout=10) as answer:
        assert answer.status_code == 200
    # Without the cookie and with a header whose first tag is no language:
    # neither field is sent, and the pageview still is.
    odd = {"X-Customer": "c2", "Accept-Language": "*, en;q=0.1"}
    with requests.get(f"{base}/items/2", headers=odd, timeout=10) as answer:
        assert answer.status_code == 200
    produl_collector.wait_for(4, timeout=30)
    first = produl_collector.assert_pageview(path="/items/1")
    assert (first["sk"], first["l"]) == ("tracker-session-9", "pt-BR")
    event = produl_collector.assert_event("item_viewed", visitor_id="c1")
    assert event["sk"] == "tracker-session-9"
    assert "l" not in event  # the language is a pageview's field only
    second = produl_collector.assert_pageview(path="/items/2")
    assert "sk" not in second
    assert "l" not in second
