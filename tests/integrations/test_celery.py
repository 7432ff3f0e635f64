"""Celery with a real Redis broker: every tracked event survives a warm shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from integration_support import app_env, redis_command, wait_until

pytest.importorskip("celery")
pytest.importorskip("redis")

pytestmark = pytest.mark.slow

N = 100
# Nothing is sent before the worker stops unless the integration flushes.
HOLD = {"flush_at": 1000, "flush_interval": 600, "max_delay": 600}


def run_worker(spawn, collector, redis_url, pool, options, connect=True, concurrency=2, **extra):
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    assert redis_command(int(port), "FLUSHALL") == "+OK"
    env = app_env(
        collector,
        DEMO_BROKER_URL=redis_url,
        DEMO_PRODUL_OPTIONS=json.dumps(options),
        DEMO_CONNECT="1" if connect else "0",
        **extra,
    )
    processes = ["--concurrency", str(concurrency)] if pool != "solo" else []
    worker = spawn(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "produl_celery_demo",
            "worker",
            "--pool",
            pool,
            *processes,
            "--loglevel",
            "INFO",
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
            "--hostname",
            f"demo-{pool}@localhost",
        ],
        env,
        name=f"celery-{pool}",
    )
    send = subprocess.run(
        [
            sys.executable,
            "-c",
            "from produl_celery_demo import record_signup\n"
            f"for n in range({N}):\n    record_signup.delay(n)\n",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert send.returncode == 0, send.stderr[-2000:]

    def all_done() -> bool:
        if not worker.alive():
            raise AssertionError(worker.output()[-3000:])
        return worker.output().count("succeeded in") >= N

    wait_until(all_done, 60, f"{N} tasks to finish")
    return worker


def stop_warm(worker) -> None:
    worker.signal(signal.SIGTERM)  # Celery's warm shutdown
    assert worker.wait(60) == 0, worker.output()[-3000:]


def numbers(collector) -> list[int]:
    return sorted(e["pr"]["number"] for e in collector.events if e.get("n") == "signup")


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_warm_shutdown_delivers_every_event(spawn, produl_collector, redis_url, pool):
    worker = run_worker(spawn, produl_collector, redis_url, pool, HOLD)
    assert produl_collector.events == []
    stop_warm(worker)
    assert numbers(produl_collector) == list(range(N))
    pids = {e["pr"]["pid"] for e in produl_collector.events}
    print(
        f"celery {pool}: {N} tracked in {len(pids)} process(es), "
        f"{len(produl_collector.events)} delivered after SIGTERM"
    )


def test_prefork_loses_the_queue_without_the_integration(spawn, produl_collector, redis_url):
    # The control: a pool child ends with os._exit(), which skips atexit.
    worker = run_worker(spawn, produl_collector, redis_url, "prefork", HOLD, connect=False)
    stop_warm(worker)
    assert produl_collector.events == []


def test_flush_after_task_delivers_while_the_worker_runs(spawn, produl_collector, redis_url):
    worker = run_worker(
        spawn, produl_collector, redis_url, "prefork", HOLD, DEMO_FLUSH_AFTER_TASK="1"
    )
    # The client holds events for 10 minutes: only the per-task flush can
    # deliver them before the shutdown. ("succeeded" is logged by the main
    # process, possibly before the child's task_postrun handler has run.)
    produl_collector.wait_for(N, timeout=30)
    assert numbers(produl_collector) == list(range(N))
    stop_warm(worker)
    assert numbers(produl_collector) == list(range(N))
