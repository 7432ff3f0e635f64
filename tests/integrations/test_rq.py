"""RQ with a real redis-server: every tracked event survives the work-horse's os._exit()."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from integration_support import app_env, redis_command, wait_until

pytest.importorskip("rq")

pytestmark = pytest.mark.slow

N = 100
# Nothing is sent before the process ends unless the integration flushes.
HOLD = {"flush_at": 1000, "flush_interval": 600, "max_delay": 600}


def run_jobs(spawn, collector, redis_url, kind, connect=True, **extra):
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    assert redis_command(port, "FLUSHALL") == "+OK"
    env = app_env(
        collector,
        DEMO_PRODUL_OPTIONS=json.dumps(HOLD),
        DEMO_CONNECT="1" if connect else "0",
        **extra,
    )
    send = subprocess.run(
        [
            sys.executable,
            "-c",
            "from redis import Redis\nfrom rq import Queue\n"
            "from produl_rq_demo import record_signup\n"
            f"queue = Queue(connection=Redis.from_url({redis_url!r}))\n"
            f"for n in range({N}):\n    queue.enqueue(record_signup, n)\n",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert send.returncode == 0, send.stderr[-2000:]
    worker = spawn(
        [
            sys.executable,
            "-c",
            f"import produl_rq_demo\nprodul_rq_demo.work({redis_url!r}, {kind!r})",
        ],
        env,
        name=f"rq-{kind}",
    )

    def all_done() -> bool:
        if not worker.alive():
            raise AssertionError(worker.output()[-3000:])
        return worker.output().count("Job OK") >= N

    wait_until(all_done, 120, f"{N} jobs to finish")
    return worker


def stop_warm(worker) -> None:
    worker.signal(signal.SIGTERM)  # RQ's warm shutdown
    # RQ 3.0 stops its pubsub thread with get_message(timeout=60) in flight:
    # now and then (with or without produl) its teardown waits out those 60 s.
    assert worker.wait(90) == 0, worker.output()[-3000:]


def numbers(collector) -> list[int]:
    return sorted(e["pr"]["number"] for e in collector.events if e.get("n") == "signup")


@pytest.mark.parametrize("kind", ["fork", "simple"])
def test_every_job_event_is_delivered(spawn, produl_collector, redis_url, kind):
    worker = run_jobs(spawn, produl_collector, redis_url, kind)
    if kind == "simple":
        # The jobs ran in the worker itself: all 100 are still queued at SIGTERM.
        assert produl_collector.events == []
    stop_warm(worker)
    assert numbers(produl_collector) == list(range(N))  # 100/100, no duplicate
    for event in produl_collector.events:  # the job context
        assert event["pr"]["queue"] == "default", event
        assert event["pr"]["job"] == "produl_rq_demo.record_signup", event
    pids = {e["pr"]["pid"] for e in produl_collector.events}
    delivered = len(produl_collector.events)
    print(f"rq {kind}: {N} jobs in {len(pids)} process(es), {delivered} delivered")


def test_fork_worker_loses_every_event_without_the_integration(spawn, produl_collector, redis_url):
    # The control: each work-horse ends with os._exit(), which skips atexit.
    worker = run_jobs(spawn, produl_collector, redis_url, "fork", connect=False)
    stop_warm(worker)
    print(f"rq fork without connect(): {len(produl_collector.events)} of {N} delivered")
    assert produl_collector.events == []


def test_flush_after_job_delivers_while_the_worker_runs(spawn, produl_collector, redis_url):
    worker = run_jobs(spawn, produl_collector, redis_url, "simple", DEMO_FLUSH_AFTER_JOB="1")
    # The client holds events for 10 minutes and SimpleWorker never exits a
    # horse: only the per-job flush can deliver them before the shutdown.
    produl_collector.wait_for(N, timeout=30)
    assert numbers(produl_collector) == list(range(N))
    stop_warm(worker)
    assert numbers(produl_collector) == list(range(N))


def test_disconnect_puts_rq_back(make_client):
    from rq.worker import BaseWorker

    from produl_server.integrations import rq as produl_rq

    original = BaseWorker.perform_job
    first, second = make_client(), make_client()
    produl_rq.connect(first)
    produl_rq.connect(second)
    produl_rq.connect(first)  # once per client, and RQ is patched once
    try:
        assert BaseWorker.perform_job is not original
        assert BaseWorker.perform_job.__wrapped__ is original
        produl_rq.disconnect(first)
        assert BaseWorker.perform_job is not original
    finally:
        produl_rq.disconnect()
    assert BaseWorker.perform_job is original
