"""The job context: what a task-queue job tracks carries its queue and job name."""

from __future__ import annotations

import asyncio
import threading

from produl_server._jobs import current_job, enter_job, leave_job


def test_a_job_s_events_carry_its_queue_and_name_under_the_call_s_own(
    produl_collector, make_client
):
    produl = make_client(default_properties={"service": "api", "queue": "from-defaults"})
    produl.track_event("before", visitor_id="u1")
    token = enter_job("emails", "send_receipt")
    try:
        produl.track_event("in-job", visitor_id="u1")
        produl.track_event("own-keys", {"job": "mine", "n": 1}, visitor_id="u1")
        produl.track_pageview(path="/", visitor_id="u1")  # pageviews carry no properties
    finally:
        leave_job(token)
    produl.track_event("after", visitor_id="u1")
    assert produl.flush(timeout=10)
    by_name = {e.get("n", "pageview"): e.get("pr") for e in produl_collector.events}
    assert by_name == {
        "before": {"service": "api", "queue": "from-defaults"},
        # The job's properties win over the defaults, the call's over both.
        "in-job": {"service": "api", "queue": "emails", "job": "send_receipt"},
        "own-keys": {"service": "api", "queue": "emails", "job": "mine", "n": 1},
        "pageview": None,
        "after": {"service": "api", "queue": "from-defaults"},
    }


def test_each_thread_and_task_sees_its_own_job():
    seen = {}
    token = enter_job("q", "outer")

    def other_thread() -> None:
        seen["thread"] = current_job()

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(10)

    async def task(name: str) -> None:
        inner = enter_job("q", name)
        await asyncio.sleep(0)
        seen[name] = current_job()
        leave_job(inner)

    async def both() -> None:
        await asyncio.gather(task("a"), task("b"))

    asyncio.run(both())
    assert seen == {
        "thread": None,
        "a": {"queue": "q", "job": "a"},
        "b": {"queue": "q", "job": "b"},
    }
    assert current_job() == {"queue": "q", "job": "outer"}
    leave_job(token)
    assert current_job() is None
    enter_job(None, None)  # nothing known: no context
    assert current_job() is None
    enter_job("q", "hook-without-token")
    leave_job()  # hooks that cannot carry a token clear it
    assert current_job() is None
