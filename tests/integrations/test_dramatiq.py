"""Dramatiq with a real redis-server: 2 worker processes x 2 threads, stopped by SIGTERM."""

from __future__ import annotations

import sys

import pytest
from queue_workers import N, check_delivery, demo_env, enqueue, numbers, stop, wait_jobs_done

pytest.importorskip("dramatiq", reason="dramatiq is not installed (produl-server[dramatiq])")

pytestmark = pytest.mark.slow

# Dramatiq's own shutdown timeout is 10 minutes; its worker process polls
# for the stop flag every second and its threads their queue every second.
GRACE = 30

SEND = f"""
import produl_dramatiq_demo as demo
for n in range({N}):
    demo.record_signup.send(n)
"""


def run_worker(spawn, collector, redis_url, **extra):
    env = demo_env(collector, redis_url, **extra)
    enqueue(env, redis_url, SEND)
    worker = spawn(
        [
            sys.executable,
            "-m",
            "dramatiq",
            "produl_dramatiq_demo",
            "--processes",
            "2",
            "--threads",
            "2",
        ],
        env,
        name="dramatiq",
    )
    wait_jobs_done(worker)
    return worker


def test_every_actor_event_is_delivered(spawn, produl_collector, redis_url):
    worker = run_worker(spawn, produl_collector, redis_url)
    assert produl_collector.events == []  # all 100 still queued at SIGTERM
    took = stop(worker, GRACE)
    pids = check_delivery(produl_collector, queue="signups", job="record_signup")
    print(
        f"dramatiq: {N} messages in {len(pids)} process(es), {N}/{N} delivered, stop {took:.1f} s"
    )


def test_flush_after_job_delivers_while_the_worker_runs(spawn, produl_collector, redis_url):
    worker = run_worker(spawn, produl_collector, redis_url, DEMO_FLUSH_AFTER_JOB="1")
    # The client holds events for 10 minutes: only the per-message flush sends them now.
    produl_collector.wait_for(N, timeout=30)
    assert numbers(produl_collector) == list(range(N))
    stop(worker, GRACE)
    check_delivery(produl_collector, queue="signups", job="record_signup")


def test_connect_adds_the_middleware_once(make_client):
    from dramatiq.brokers.stub import StubBroker

    from produl_server.integrations import dramatiq as produl_dramatiq

    broker = StubBroker()
    first, second = make_client(), make_client()
    try:
        produl_dramatiq.connect(first, broker)
        produl_dramatiq.connect(second, broker)
        produl_dramatiq.connect(first, broker)
        added = [m for m in broker.middleware if isinstance(m, produl_dramatiq.ProdulMiddleware)]
        assert len(added) == 1
        assert produl_dramatiq._clients == [first, second]
        produl_dramatiq.disconnect(first)
        assert produl_dramatiq._clients == [second]
    finally:
        produl_dramatiq.disconnect()
    assert produl_dramatiq._clients == []


def test_without_connect_the_client_delivers_but_without_job_context(
    spawn, produl_collector, redis_url
):
    # A worker process ends through multiprocessing, whose exit finalizers
    # run the client's own exit flush: connect() adds the job context, the
    # per-message flush, and a flush before the broker closes.
    worker = run_worker(spawn, produl_collector, redis_url, connect=False)
    stop(worker, GRACE)
    assert numbers(produl_collector) == list(range(N))
    assert not any("queue" in e["pr"] or "job" in e["pr"] for e in produl_collector.events)


@pytest.mark.parametrize("flush_after_job", [False, True])
def test_the_middleware_in_a_worker_of_this_process(make_client, produl_collector, flush_after_job):
    import dramatiq
    from dramatiq.brokers.stub import StubBroker

    from produl_server.integrations import dramatiq as produl_dramatiq

    broker = StubBroker()
    client = make_client(flush_at=1000, flush_interval=600, max_delay=600)
    produl_dramatiq.connect(client, broker, flush_after_job=flush_after_job)

    @dramatiq.actor(broker=broker, queue_name="reports", max_retries=0)
    def build_report(n):
        client.track_event("report", {"n": n})

    broker.emit_after("process_boot")
    worker = dramatiq.Worker(broker, worker_threads=2)
    worker.start()
    stopped = False
    try:
        for n in range(5):
            build_report.send(n)
        broker.join("reports", timeout=10_000)
        worker.join()
        if flush_after_job:
            assert client.stats.pending == 0  # sent after each message
        else:
            assert produl_collector.events == []  # held until the worker stops
        worker.stop()
        stopped = True
        assert client.stats.pending == 0  # after_worker_shutdown flushed
    finally:
        if not stopped:
            worker.stop()
        produl_dramatiq.disconnect()
    client.track_event("outside")  # no job context outside a message
    assert client.flush(10)
    by_n = {e["pr"]["n"]: e["pr"] for e in produl_collector.events if e["n"] == "report"}
    assert by_n == {n: {"n": n, "queue": "reports", "job": "build_report"} for n in range(5)}
    assert [e.get("pr") for e in produl_collector.events if e["n"] == "outside"] == [None]
