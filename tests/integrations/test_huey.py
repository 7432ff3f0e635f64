"""Huey with a real redis-server: a process consumer (2 forked workers), stopped by SIGTERM."""

from __future__ import annotations

import sys

import pytest
from integration_support import wait_until
from queue_workers import N, check_delivery, demo_env, enqueue, numbers, stop, wait_jobs_done

pytest.importorskip("huey", reason="huey is not installed (produl-server[huey])")

pytestmark = pytest.mark.slow

# SIGTERM is Huey's immediate shutdown: the consumer stops its workers and
# gives them one second before multiprocessing's exit handler joins them.
GRACE = 30

SEND = f"""
import produl_huey_demo as demo
for n in range({N}):
    demo.record_signup(n)
"""


def run_consumer(spawn, collector, redis_url, kind="process", **extra):
    env = demo_env(collector, redis_url, **extra)
    enqueue(env, redis_url, SEND)
    worker = spawn(
        [
            sys.executable,
            "-m",
            "huey.bin.huey_consumer",
            "produl_huey_demo.huey",
            "--worker-type",
            kind,
            "--workers",
            "2",
        ],
        env,
        name=f"huey-{kind}",
    )
    wait_jobs_done(worker)
    return worker


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_every_task_event_is_delivered(spawn, produl_collector, redis_url, kind):
    worker = run_consumer(spawn, produl_collector, redis_url, kind)
    assert produl_collector.events == []  # all 100 still queued at SIGTERM
    took = stop(worker, GRACE)
    pids = check_delivery(produl_collector, queue="signups", job="record_signup")
    print(
        f"huey {kind}: {N} tasks in {len(pids)} process(es), {N}/{N} delivered, stop {took:.1f} s"
    )


def test_flush_after_job_delivers_while_the_consumer_runs(spawn, produl_collector, redis_url):
    worker = run_consumer(spawn, produl_collector, redis_url, DEMO_FLUSH_AFTER_JOB="1")
    # The client holds events for 10 minutes: only the per-task flush sends them now.
    produl_collector.wait_for(N, timeout=30)
    assert numbers(produl_collector) == list(range(N))
    stop(worker, GRACE)
    check_delivery(produl_collector, queue="signups", job="record_signup")


def test_without_connect_the_client_delivers_but_without_job_context(
    spawn, produl_collector, redis_url
):
    # A forked worker ends through multiprocessing, whose exit finalizers run
    # the client's own exit flush: connect() adds the job context, the
    # per-task flush, and a flush in each worker's on_shutdown hook.
    worker = run_consumer(spawn, produl_collector, redis_url, connect=False)
    stop(worker, GRACE)
    assert numbers(produl_collector) == list(range(N))
    assert not any("queue" in e["pr"] or "job" in e["pr"] for e in produl_collector.events)


def test_connect_registers_once(make_client):
    from huey import MemoryHuey

    from produl_server.integrations import huey as produl_huey

    huey = MemoryHuey("registers-once", immediate=True)
    first, second = make_client(), make_client()
    try:
        produl_huey.connect(first, huey)
        produl_huey.connect(second, huey)
        produl_huey.connect(first, huey)
        assert list(huey._shutdown) == ["produl_server_flush"]
        assert produl_huey._clients == [first, second]
        produl_huey.disconnect(first)
        assert produl_huey._clients == [second]
    finally:
        produl_huey.disconnect()
    assert produl_huey._clients == []


def test_the_shutdown_hook_flushes_in_a_consumer_of_this_process(make_client, produl_collector):
    from huey import MemoryHuey

    from produl_server.integrations import huey as produl_huey

    huey = MemoryHuey("reports")
    client = make_client(flush_at=1000, flush_interval=600, max_delay=600)
    produl_huey.connect(client, huey)

    @huey.task()
    def build_report(n):
        client.track_event("report", {"n": n})

    for n in range(5):
        build_report(n)
    consumer = huey.create_consumer(workers=2, periodic=False, initial_delay=0.01, max_delay=0.1)
    consumer.start()
    stopped = False
    try:
        wait_until(lambda: client.stats.pending == 5, 30, "the 5 tasks to track their event")
        assert produl_collector.events == []  # held until the workers stop
        consumer.stop(graceful=True)  # joins the workers: their on_shutdown hook ran
        stopped = True
        assert client.stats.pending == 0
    finally:
        if not stopped:
            consumer.stop()
        produl_huey.disconnect()
    by_n = {e["pr"]["n"]: e["pr"] for e in produl_collector.events}
    assert by_n == {n: {"n": n, "queue": "reports", "job": "build_report"} for n in range(5)}
