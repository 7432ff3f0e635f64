"""What the task-queue tests share: fill a queue in real Redis, run a real worker, stop it.

Each job of the demo apps (``apps/produl_*_demo.py``) tracks one ``signup``
event and then prints ``tracked <n>``; the client holds events for ten
minutes (``HOLD``), so nothing is sent before the worker ends unless an
integration flushes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from integration_support import app_env, redis_command, wait_until

N = 100
# Nothing is sent before the process ends unless the integration flushes.
HOLD = {"flush_at": 1000, "flush_interval": 600, "max_delay": 600}


def demo_env(collector, redis_url, connect=True, **extra):
    """The environment of a demo worker: the collector, the Redis, the client options."""
    return app_env(
        collector,
        DEMO_REDIS_URL=redis_url,
        DEMO_PRODUL_OPTIONS=json.dumps(HOLD),
        DEMO_CONNECT="1" if connect else "0",
        **extra,
    )


def enqueue(env, redis_url, script: str) -> None:
    """Empty the Redis, then run *script* (which enqueues ``N`` jobs) in a fresh process."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    assert redis_command(port, "FLUSHALL") == "+OK"
    send = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "DEMO_CONNECT": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert send.returncode == 0, send.stderr[-2000:]


def wait_jobs_done(worker, timeout: float = 60) -> None:
    """Wait until every job printed its marker (or fail early if the worker died)."""

    def all_done() -> bool:
        if not worker.alive():
            raise AssertionError(worker.output()[-3000:])
        return worker.output().count("tracked ") >= N

    wait_until(all_done, timeout, f"{N} jobs to finish")


def stop(worker, grace: float) -> float:
    """SIGTERM the worker, which must exit with 0 within *grace* seconds; the time it took."""
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(grace) == 0, worker.output()[-3000:]
    return time.monotonic() - started


def numbers(collector) -> list[int]:
    return sorted(e["pr"]["number"] for e in collector.events if e.get("n") == "signup")


def check_delivery(collector, queue: str, job: str) -> set[int]:
    """100/100 delivered, 0 duplicates, each with the job context; returns the pids seen."""
    assert numbers(collector) == list(range(N))  # 100/100, no duplicate
    for event in collector.events:
        assert event["pr"]["queue"] == queue, event
        assert event["pr"]["job"] == job, event
    return {e["pr"]["pid"] for e in collector.events}
