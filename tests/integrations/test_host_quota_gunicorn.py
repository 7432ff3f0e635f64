"""gunicorn -w 4 on one host: the workers share one quota, so none meets a 429."""

from __future__ import annotations

import signal

import pytest
import requests
from integration_support import app_env, serve_gunicorn

pytest.importorskip("flask")
pytest.importorskip("gunicorn")

pytestmark = pytest.mark.slow

QUOTA = 120  # a minute's worth, well under the 2 x 100 events tracked


def serve_and_hit(spawn, collector, quota_dir, *, shared):
    env = app_env(
        collector,
        PRODUL_QUOTA_DIR=str(quota_dir),
        FLASK_PRODUL_MAX_REQUESTS_PER_MINUTE=str(QUOTA),
        FLASK_PRODUL_SHARED_QUOTA="true" if shared else "false",
        FLASK_PRODUL_FLUSH_AT="1",
        FLASK_PRODUL_SHUTDOWN_TIMEOUT="1",
    )
    proc, base = serve_gunicorn(
        spawn, env, "produl_flask_demo:app", "--workers", "4", name="gunicorn-quota"
    )
    with requests.Session() as http:
        for number in range(100):
            answer = http.get(
                f"{base}/items/{number}", headers={"X-Customer": f"c{number}"}, timeout=10
            )
            assert answer.status_code == 200
    return proc


@pytest.mark.parametrize("mode", ["fixed", "sliding", "bucket"])
def test_four_gunicorn_workers_share_one_quota(spawn, tmp_path, mode):
    from produl_server.testing import LocalCollector

    quota_dir = tmp_path / "quota"
    quota_dir.mkdir(mode=0o700)
    with LocalCollector(rate_limit=QUOTA, rate_limit_mode=mode) as collector:
        proc = serve_and_hit(spawn, collector, quota_dir, shared=True)
        collector.wait_for(QUOTA, timeout=60)
        proc.signal(signal.SIGTERM)
        assert proc.wait(40) == 0, proc.output()[-3000:]
        statuses = [r.status for r in collector.requests]
        assert statuses.count(429) == 0
        assert len(collector.events) == QUOTA
        # What the quota left undelivered at SIGTERM is said, not silent.
        assert "not delivered before the shutdown deadline" in proc.output()


def test_alone_the_same_workers_meet_429s(spawn, tmp_path):
    from produl_server.testing import LocalCollector

    quota_dir = tmp_path / "quota"
    quota_dir.mkdir(mode=0o700)
    with LocalCollector(rate_limit=QUOTA) as collector:
        proc = serve_and_hit(spawn, collector, quota_dir, shared=False)
        collector.wait_for(QUOTA, timeout=60)
        proc.signal(signal.SIGTERM)
        assert proc.wait(40) == 0, proc.output()[-3000:]
        assert [r.status for r in collector.requests].count(429) > 0
