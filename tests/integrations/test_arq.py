"""arq with a real redis-server: the asyncio worker, stopped by SIGTERM."""

from __future__ import annotations

import sys

import pytest
from integration_support import wait_until
from queue_workers import N, check_delivery, demo_env, enqueue, numbers, stop, wait_jobs_done

pytest.importorskip("arq", reason="arq is not installed (produl-server[arq])")

pytestmark = pytest.mark.slow

# arq cancels running jobs at SIGTERM and then closes: a few seconds at most.
GRACE = 30

SEND = f"""
import asyncio, os
from arq import create_pool
from arq.connections import RedisSettings

async def main():
    pool = await create_pool(RedisSettings.from_dsn(os.environ["DEMO_REDIS_URL"]))
    for n in range({N}):
        await pool.enqueue_job("record_signup", n, _queue_name="signups")
    await pool.aclose()

asyncio.run(main())
"""


def run_worker(spawn, collector, redis_url, **extra):
    env = demo_env(collector, redis_url, **extra)
    enqueue(env, redis_url, SEND)
    worker = spawn([sys.executable, "-m", "arq", "produl_arq_demo.WorkerSettings"], env, name="arq")
    wait_jobs_done(worker)
    wait_results_stored(redis_url)
    return worker


def wait_results_stored(redis_url):
    # A job prints its marker before arq stores its result. A SIGTERM in
    # between cancels that job's task, and arq's close() then fails on it
    # (exit status 1, its on_shutdown skipped): arq's own race, not ours.
    from redis import Redis

    with Redis.from_url(redis_url) as redis:

        def stored() -> bool:
            return len(redis.keys("arq:result:*")) == N and not redis.keys("arq:in-progress:*")

        wait_until(stored, 30, f"arq to store {N} results")


def test_every_job_event_is_delivered(spawn, produl_collector, redis_url):
    worker = run_worker(spawn, produl_collector, redis_url)
    assert produl_collector.events == []  # all 100 still queued at SIGTERM
    took = stop(worker, GRACE)
    pids = check_delivery(produl_collector, queue="signups", job="record_signup")
    print(f"arq: {N} jobs in {len(pids)} process(es), {N}/{N} delivered, stop {took:.1f} s")


def test_flush_after_job_delivers_while_the_worker_runs(spawn, produl_collector, redis_url):
    worker = run_worker(spawn, produl_collector, redis_url, DEMO_FLUSH_AFTER_JOB="1")
    # The client holds events for 10 minutes: only the per-job flush sends them now.
    produl_collector.wait_for(N, timeout=30)
    assert numbers(produl_collector) == list(range(N))
    stop(worker, GRACE)
    check_delivery(produl_collector, queue="signups", job="record_signup")


def test_without_connect_the_client_delivers_but_without_job_context(
    spawn, produl_collector, redis_url
):
    # The worker process ends normally, so the client's own exit flush
    # delivers: connect() adds the job context, the per-job flush, and an
    # awaited flush in arq's on_shutdown (for workers that end before their
    # process does).
    worker = run_worker(spawn, produl_collector, redis_url, connect=False)
    stop(worker, GRACE)
    assert numbers(produl_collector) == list(range(N))
    assert not any("queue" in e["pr"] or "job" in e["pr"] for e in produl_collector.events)


def test_worker_hooks_chain_and_disconnect_puts_arq_back(make_client, produl_collector):
    import asyncio

    from arq.worker import Worker, func

    from produl_server.integrations import arq as produl_arq

    original = Worker.__init__
    calls = []

    async def job(ctx, n):
        calls.append(("job", n))
        client.track_event("in-job", {"n": n})

    async def user_shutdown(ctx):
        calls.append("user on_shutdown")
        client.track_event("at-shutdown")

    async def scenario():
        worker = Worker(
            functions=[func(job, name="job")],
            queue_name="q1",
            on_shutdown=user_shutdown,
            handle_signals=False,
        )
        await worker.functions["job"].coroutine({}, 7)
        client.track_event("outside")
        await worker.on_shutdown({})
        await worker.after_job_end({})  # flush_after_job is off: nothing to do
        return worker

    client = make_client(flush_at=1000, flush_interval=600, max_delay=600)
    produl_arq.connect(client)
    produl_arq.connect(client)  # patched once
    try:
        assert Worker.__init__.__wrapped__ is original
        asyncio.run(scenario())
        assert calls == [("job", 7), "user on_shutdown"]
        # The user's hook ran first; the flush after it delivered all three.
        assert client.stats.pending == 0
        by_name = {e["n"]: e.get("pr") for e in produl_collector.wait_for(3)}
        assert by_name == {
            "in-job": {"n": 7, "queue": "q1", "job": "job"},
            "outside": None,
            "at-shutdown": None,
        }
    finally:
        produl_arq.disconnect()
    assert Worker.__init__ is original


def test_a_cancelled_flush_after_job_ends_the_job_quietly(make_client, hung_collector):
    import asyncio

    from produl_server.integrations import arq as produl_arq

    # The collector never answers: the flush is still waiting when arq's
    # SIGTERM handler cancels the job's task.
    client = make_client(api_url=hung_collector.url, server_key=hung_collector.server_key)
    client.track_event("held")
    produl_arq.connect(client, flush_after_job=True, shutdown_timeout=2)

    async def cancel_during_the_flush() -> bool:
        task = asyncio.ensure_future(produl_arq._flush_after_job({}))
        await asyncio.sleep(0)  # the task runs up to its wait for the flush
        assert not task.done()
        task.cancel()
        await task  # ends quietly: arq's close() can gather it
        return task.cancelled()

    try:
        assert asyncio.run(cancel_during_the_flush()) is False
    finally:
        produl_arq.disconnect()
