"""Celery prefork -c 4 on one host: the pool processes share one quota, so none meets a 429."""

from __future__ import annotations

import pytest
from test_celery import run_worker, stop_warm

pytest.importorskip("celery")
pytest.importorskip("redis")

pytestmark = pytest.mark.slow

QUOTA = 60  # a minute's worth; the 100 tasks track 100 events


@pytest.mark.parametrize("shared", [True, False])
def test_four_pool_processes_share_one_quota(spawn, tmp_path, redis_url, shared):
    from produl_server.testing import LocalCollector

    quota_dir = tmp_path / "quota"
    quota_dir.mkdir(mode=0o700)
    options = {
        "max_requests_per_minute": QUOTA,
        "shared_quota": shared,
        "flush_at": 1,
        "shutdown_timeout": 1,
    }
    with LocalCollector(rate_limit=QUOTA, rate_limit_mode="fixed") as collector:
        worker = run_worker(
            spawn,
            collector,
            redis_url,
            "prefork",
            options,
            concurrency=4,
            PRODUL_QUOTA_DIR=str(quota_dir),
        )
        collector.wait_for(QUOTA, timeout=60)
        stop_warm(worker)
        statuses = [r.status for r in collector.requests]
        if shared:
            assert statuses.count(429) == 0
            assert len(collector.events) == QUOTA
            pids = {e["pr"]["pid"] for e in collector.events}
            assert len(pids) > 1  # several pool processes tracked, one quota paced them
        else:
            assert statuses.count(429) > 0
