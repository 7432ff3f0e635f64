"""Django under uvicorn (ASGI), 2 workers: async and sync views, at run time and at SIGTERM."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from integration_support import app_env, serve_uvicorn

httpx = pytest.importorskip("httpx")
pytest.importorskip("django")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow

N = 40
APP = "produl_django_demo.asgi:application"
QUEUED = {"flush_at": 1000, "flush_interval": 600, "max_delay": 600, "shutdown_timeout": 20}


def serve(spawn, collector, **options):
    env = app_env(collector, DEMO_PRODUL_OPTIONS=json.dumps(options))
    return serve_uvicorn(spawn, env, APP, "--workers", "2", name="uvicorn-django")


def hit(base: str) -> None:
    def get(job: tuple[str, int]) -> int:
        route, number = job
        with httpx.Client(timeout=10) as http:
            answer = http.get(f"{base}/{route}/{number}/", headers={"X-Demo-User": str(number)})
            return answer.status_code

    jobs = [(route, n) for route in ("async", "articles") for n in range(1, N + 1)]
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(get, jobs)) == {200}


def check(events: list[dict], base: str) -> None:
    """One event and one pageview per request, each with its own request's fields."""
    assert len(events) == 4 * N, events
    for route in ("async", "articles"):
        for kind in ("ev", "pv"):
            found = sorted(
                int(e["p"].split("/")[2])
                for e in events
                if e["t"] == kind and e["p"].startswith(f"/{route}/")
            )
            assert found == list(range(1, N + 1)), (route, kind, found)
    for event in events:
        number = int(event["p"].split("/")[2])
        assert event["u"] == base + event["p"]
        assert event["vi"] == str(number)
        if event["t"] == "ev":
            assert event["pr"]["number"] == number
            if event["p"].startswith("/async/"):
                # Tracked in the event loop's thread: no hop to a thread.
                assert event["pr"]["in_loop"] is True


@pytest.mark.parametrize("mode", ["running", "sigterm"])
def test_async_and_sync_views_lose_nothing(spawn, produl_collector, mode):
    options = {"flush_interval": 0.2} if mode == "running" else QUEUED
    proc, base = serve(spawn, produl_collector, **options)
    hit(base)
    if mode == "running":
        produl_collector.wait_for(4 * N, timeout=30)
    else:
        assert produl_collector.events == []
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(40) == 0, proc.output()[-3000:]
    took = time.monotonic() - started
    check(produl_collector.events, base)
    print(f"django/uvicorn --workers 2 ({mode}): {4 * N} delivered; stopped in {took:.2f} s")


def test_sigterm_with_the_api_hung_stays_within_the_shutdown_budget(spawn, hung_collector):
    budget = 2.0
    proc, base = serve(spawn, hung_collector, flush_at=1, shutdown_timeout=budget)
    with httpx.Client(timeout=10) as http:
        for number in range(1, 6):
            answer = http.get(f"{base}/async/{number}/", headers={"X-Demo-User": "1"})
            assert answer.status_code == 200
    hung_collector.wait_for_held(1, timeout=30)
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.output()[-3000:]
    took = time.monotonic() - started
    assert took < budget + 8, took
    print(f"django/uvicorn SIGTERM with the API hung: exited in {took:.2f} s (budget {budget} s)")
