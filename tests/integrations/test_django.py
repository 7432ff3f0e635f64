"""Django: the demo project served by gunicorn (2 workers x 2 threads), end to end."""

from __future__ import annotations

import json
import signal

import pytest
import requests
from integration_support import app_env, serve_gunicorn

pytest.importorskip("django")
pytest.importorskip("gunicorn")

pytestmark = pytest.mark.slow

N = 30


def serve_django(spawn, collector, **options):
    env = app_env(collector, DEMO_PRODUL_OPTIONS=json.dumps(options))
    return serve_gunicorn(
        spawn,
        env,
        "produl_django_demo.wsgi",
        *("--workers", "2", "--threads", "2", "--worker-class", "gthread"),
        name="gunicorn-django",
    )


def test_requests_become_pageviews_and_events_with_the_request_path(spawn, produl_collector):
    proc, base = serve_django(spawn, produl_collector, flush_at=5, flush_interval=0.5)
    with requests.Session() as http:
        for n in range(N):
            answer = http.get(f"{base}/articles/{n}/", headers={"X-Demo-User": str(n % 3 + 1)})
            assert answer.status_code == 200
        # Anonymous: an event without a visitor, and no pageview.
        assert http.get(f"{base}/articles/999/").status_code == 200
        # JSON: an event, no pageview. 404 and the excluded health check: nothing.
        assert http.get(f"{base}/api/items", headers={"X-Demo-User": "1"}).status_code == 200
        assert http.get(f"{base}/nowhere/", headers={"X-Demo-User": "1"}).status_code == 404
        assert http.get(f"{base}/healthz", headers={"X-Demo-User": "1"}).status_code == 200

    expected = N + N + 1 + 1  # pageviews, events, the anonymous event, items_listed
    produl_collector.wait_for(expected, timeout=30)
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.output()[-3000:]

    events = produl_collector.events
    assert len(events) == expected, events
    pageviews = sorted((e for e in events if e["t"] == "pv"), key=lambda e: e["p"])
    reads = [e for e in events if e.get("n") == "article_read"]
    assert len(pageviews) == N
    assert len(reads) == N + 1
    for n in range(N):
        path = f"/articles/{n}/"
        visitor = str(n % 3 + 1)
        (pv,) = [e for e in pageviews if e["p"] == path]
        assert pv == {"t": "pv", "p": path, "u": base + path, "vi": visitor}
        (ev,) = [e for e in reads if e["p"] == path]
        assert ev == {
            "t": "ev",
            "n": "article_read",
            "p": path,
            "u": base + path,
            "vi": visitor,
            "pr": {"number": n},
        }
    (anonymous,) = [e for e in reads if e["p"] == "/articles/999/"]
    assert "vi" not in anonymous
    (listed,) = [e for e in events if e.get("n") == "items_listed"]
    assert listed["p"] == "/api/items"
    assert listed["vi"] == "1"
    print(f"django/gunicorn: {expected} tracked, {len(events)} delivered")
