"""uWSGI (from PyPI): background sending in the workers, and the exit flush.

uWSGI 2.0.31 turns Python threads on by default (``--enable-threads`` is a
no-op there); older versions need the flag, and without it the integration
falls back to ``sync_mode`` (tested in test_integrations_unit.py, since a
current uWSGI can no longer run without threads).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import requests
from integration_support import app_env, free_port, require_tool, wait_http

UWSGI = Path(sys.executable).parent / "uwsgi"

pytestmark = pytest.mark.slow

N = 20


@pytest.fixture(autouse=True)
def _need_uwsgi():
    require_tool(UWSGI.exists(), f"uwsgi next to {sys.executable} (pip install uwsgi)")


@pytest.mark.parametrize("threads_flag", [[], ["--enable-threads"]], ids=["default", "enable"])
def test_uwsgi_workers_send_in_the_background_and_flush_on_stop(
    spawn, produl_collector, threads_flag
):
    port = free_port()
    options = {"flush_at": 5, "flush_interval": 600, "max_delay": 600}
    proc = spawn(
        [
            str(UWSGI),
            "--http-socket",
            f"127.0.0.1:{port}",
            "--module",
            "produl_wsgi_demo:application",
            "--master",
            "--processes",
            "2",
            "--need-app",
            "--die-on-term",  # SIGTERM stops uWSGI instead of reloading it
            "--disable-logging",
            *threads_flag,
        ],
        app_env(produl_collector, DEMO_PRODUL_OPTIONS=json.dumps(options)),
        name="uwsgi",
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(proc, base + "/healthz")
    modes = set()
    for n in range(N):
        # A new connection each time, so both workers serve some.
        with requests.get(f"{base}/page/{n}", headers={"X-Customer": f"c{n}"}, timeout=10) as r:
            assert r.status_code == 200
            modes.add(r.headers["X-Produl-Mode"])
    assert modes == {"thread"}
    # Batches of 5 leave each of the 2 workers with at most 4 unsent.
    produl_collector.wait_for(2 * N - 8, timeout=30)
    proc.signal(signal.SIGTERM)
    proc.wait(40)

    events = produl_collector.events
    assert len(events) == 2 * N, proc.output()[-3000:]
    assert sorted(e["p"] for e in events if e["t"] == "pv") == sorted(
        f"/page/{n}" for n in range(N)
    )
    for event in events:
        number = event["p"].rsplit("/", 1)[1]
        assert event["u"] == f"{base}/page/{number}"
        assert event["vi"] == f"c{number}"
    pids = {e["pr"]["pid"] for e in events if e["t"] == "ev"}
    print(
        f"uwsgi {threads_flag or 'default'}: {2 * N} tracked in {len(pids)} workers, "
        f"{len(events)} delivered"
    )
