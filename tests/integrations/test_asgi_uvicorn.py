"""FastAPI under uvicorn: context, pageviews and the exit, with real HTTP."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from integration_support import app_env, serve_gunicorn, serve_uvicorn

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow

N = 100
APP = "produl_fastapi_demo:app"
# Nothing is sent before the SIGTERM; then there is room for 100 events per
# worker at the default pace (2,000 a minute).
QUEUED_OPTIONS = {"flush_at": 1000, "flush_interval": 600, "max_delay": 600, "shutdown_timeout": 20}


def serve(spawn, collector, *options: str, **produl_options):
    env = app_env(collector, DEMO_PRODUL_OPTIONS=json.dumps(produl_options))
    return serve_uvicorn(spawn, env, APP, *options, name="uvicorn-fastapi")


def hit(base: str, route: str, n: int = N) -> None:
    def get(number: int) -> int:
        # A client per request: a new connection each time, spread over the workers.
        with httpx.Client(timeout=10) as http:
            answer = http.get(f"{base}/{route}/{number}", headers={"X-Customer": f"c{number}"})
            return answer.status_code

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(get, range(n))) == {200}


def check_items(events: list[dict], base: str, route: str) -> set[int]:
    """Every event and pageview exactly once, with its own request's p, u and vi."""
    items = [e for e in events if e["t"] == "ev"]
    pageviews = [e for e in events if e["t"] == "pv"]
    assert sorted(e["pr"]["number"] for e in items) == list(range(N))
    assert sorted(int(e["p"].rsplit("/", 1)[1]) for e in pageviews) == list(range(N))
    for event in items + pageviews:
        number = int(event["p"].rsplit("/", 1)[1])
        assert event["p"] == f"/{route}/{number}"
        assert event["u"] == f"{base}/{route}/{number}"
        assert event["vi"] == f"c{number}"
        if event["t"] == "ev":
            assert event["pr"]["number"] == number
    return {e["pr"]["pid"] for e in items}


@pytest.mark.parametrize("route", ["items", "sync"])
def test_two_workers_track_every_request_with_its_own_context(spawn, produl_collector, route):
    proc, base = serve(spawn, produl_collector, "--workers", "2", flush_interval=0.2)
    hit(base, route)
    produl_collector.wait_for(2 * N, timeout=30)
    pids = check_items(produl_collector.events, base, route)
    proc.signal(signal.SIGTERM)
    proc.wait(30)
    assert len(produl_collector.events) == 2 * N
    print(
        f"fastapi/uvicorn --workers 2 ({route}): {2 * N} delivered, tracked by {len(pids)} workers"
    )


def test_sigterm_delivers_everything_still_queued(spawn, produl_collector):
    proc, base = serve(spawn, produl_collector, "--workers", "2", **QUEUED_OPTIONS)
    hit(base, "items")
    assert produl_collector.events == []  # all of it still queued in the workers
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(40) == 0, proc.output()[-3000:]
    took = time.monotonic() - started
    pids = check_items(produl_collector.events, base, "items")
    assert len(produl_collector.events) == 2 * N
    assert "not delivered" not in proc.output()
    print(
        f"fastapi/uvicorn SIGTERM: {2 * N} queued in {len(pids)} workers, delivered in {took:.2f} s"
    )


def test_sigterm_with_the_api_hung_stays_within_the_shutdown_budget(spawn, hung_collector):
    budget = 2.0
    proc, base = serve(
        spawn, hung_collector, shutdown_timeout=budget, flush_at=1, max_retry_time=600
    )
    with httpx.Client(timeout=10) as http:
        for number in range(5):
            assert http.get(f"{base}/items/{number}").status_code == 200
    hung_collector.wait_for_held(1, timeout=30)  # the sender is stuck on the first one
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    # uvicorn re-raises the SIGTERM once its shutdown is over: atexit never runs.
    assert proc.wait(30) in (0, -signal.SIGTERM), proc.output()[-3000:]
    took = time.monotonic() - started
    # The budget, plus uvicorn's own stop and the interpreter's; never a hang.
    assert took < budget + 8, took
    print(f"fastapi/uvicorn SIGTERM with the API hung: exited in {took:.2f} s (budget {budget} s)")


def test_streaming_websockets_and_background_tasks(spawn, produl_collector):
    websockets_sync = pytest.importorskip("websockets.sync.client")
    proc, base = serve(spawn, produl_collector, flush_at=1)

    # Streaming: chunk 2 only exists once the client has read chunk 1, so a
    # middleware that buffered the body would never finish this.
    with (
        httpx.Client(timeout=30) as http,
        http.stream("GET", f"{base}/stream", headers={"X-Customer": "s1"}) as answer,
    ):
        assert answer.status_code == 200
        lines = answer.iter_lines()
        assert next(lines) == "chunk 1"
        with httpx.Client(timeout=10) as other:
            assert other.post(f"{base}/stream/ack").status_code == 200
        assert next(lines) == "chunk 2"

    # A websocket goes through the middleware untouched, message by message.
    ws_url = base.replace("http://", "ws://") + "/ws"
    with websockets_sync.connect(ws_url, open_timeout=10) as ws:
        for text in ("one", "two"):
            ws.send(text)
            assert ws.recv(timeout=10) == f"echo {text}"
        ws.send("bye")

    # A background task runs after the response, with the request's context.
    with httpx.Client(timeout=10) as http:
        answer = http.get(f"{base}/later/7", headers={"X-Customer": "b1"})
        assert (answer.status_code, answer.text) == (200, "accepted")

    produl_collector.wait_for(3, timeout=30)
    streamed = produl_collector.assert_event("streamed")
    assert (streamed["p"], streamed["vi"]) == ("/stream", "s1")
    pageview = produl_collector.assert_pageview("/stream")
    assert pageview["vi"] == "s1"  # after the last chunk, for a 2xx text/html stream
    done = produl_collector.assert_event("background_done")
    assert done == {
        "t": "ev",
        "n": "background_done",
        "p": "/later/7",
        "u": f"{base}/later/7",
        "vi": "b1",
        "pr": {"number": 7},
    }
    proc.signal(signal.SIGTERM)
    proc.wait(30)
    assert len(produl_collector.events) == 3, produl_collector.events


def test_gunicorn_uvicorn_workers_deliver_everything_at_sigterm(spawn, produl_collector):
    pytest.importorskip("gunicorn")
    worker = "uvicorn.workers.UvicornWorker"
    try:
        import uvicorn_worker  # noqa: F401 -- the package uvicorn.workers moved to

        worker = "uvicorn_worker.UvicornWorker"
    except ImportError:
        pass
    options = {**QUEUED_OPTIONS}
    env = app_env(produl_collector, DEMO_PRODUL_OPTIONS=json.dumps(options))
    proc, base = serve_gunicorn(
        spawn, env, APP, "--workers", "2", "--worker-class", worker, name="gunicorn-uvicorn"
    )
    hit(base, "items")
    assert produl_collector.events == []
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(40) == 0, proc.output()[-3000:]
    took = time.monotonic() - started
    pids = check_items(produl_collector.events, base, "items")
    assert len(produl_collector.events) == 2 * N
    print(
        f"fastapi/gunicorn {worker} SIGTERM: {2 * N} queued in {len(pids)} workers, "
        f"delivered in {took:.2f} s"
    )
