"""Serverless: what the decorator flushed is delivered before the handler returns."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest
from integration_support import APPS, app_env

from produl_server.integrations.serverless import flush_after

RUNNER = """
import json, sys
from produl_lambda_demo import handler
for line in sys.stdin:
    print(json.dumps(handler(json.loads(line), None)), flush=True)
"""


@pytest.mark.slow
def test_a_process_frozen_right_after_each_return_loses_nothing(produl_collector):
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER],
        env=app_env(produl_collector),
        cwd=str(APPS),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    expected = 0
    try:
        for invocation in range(10):
            proc.stdin.write(json.dumps({"invocation": invocation, "steps": 3, "customer": "c1"}))
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert json.loads(proc.stdout.readline()) == {"statusCode": 204}
            # Freeze the moment the handler has returned, like a function host.
            proc.send_signal(signal.SIGSTOP)
            expected += 3
            # No waiting: the flush finished before the handler returned.
            assert len(produl_collector.events) == expected
            proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGSTOP)
        proc.kill()  # the host reclaims the frozen environment: no exit hook runs
        proc.wait(10)
        events = produl_collector.events
        assert [(e["pr"]["invocation"], e["pr"]["step"]) for e in events] == [
            (i, s) for i in range(10) for s in range(3)
        ]
        print(
            f"serverless (SIGSTOP after each return): {expected} tracked, {len(events)} delivered"
        )
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()


def test_a_handler_called_repeatedly_delivers_each_invocation(make_client, produl_collector):
    # flush_at / flush_interval far away: only the decorator sends.
    client = make_client(flush_at=1000, flush_interval=600, max_delay=600)

    @flush_after(client, timeout=5.0)
    def handler(event, context):
        client.track_event("step", {"i": event}, visitor_id="v")
        client.track_event("step", {"i": event}, visitor_id="v")
        return event

    for i in range(25):
        assert handler(i, None) == i
        assert len(produl_collector.events) == 2 * (i + 1)
    delivered = len(produl_collector.events)
    print(f"serverless (one process, 25 invocations): 50 tracked, {delivered} delivered")


def test_it_flushes_when_the_handler_raises(make_client, produl_collector):
    client = make_client(flush_at=1000, flush_interval=600)

    @flush_after(client)
    def handler(event, context):
        client.track_event("before_error", visitor_id="v")
        raise KeyError("boom")

    with pytest.raises(KeyError):
        handler({}, None)
    assert [e["n"] for e in produl_collector.events] == ["before_error"]


def test_async_handlers_and_the_context_manager(make_client, produl_collector):
    client = make_client(flush_at=1000, flush_interval=600)

    @flush_after(client)
    async def handler(event, context):
        client.track_event("async_step", visitor_id="v")
        return "ok"

    assert asyncio.run(handler({}, None)) == "ok"
    assert len(produl_collector.events) == 1
    with flush_after(client):
        client.track_event("in_block", visitor_id="v")
    assert [e["n"] for e in produl_collector.events] == ["async_step", "in_block"]


class LambdaContext:
    def __init__(self, remaining_ms: int) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def test_the_flush_never_outlives_the_invocation(make_client, produl_collector, caplog):
    client = make_client(flush_at=1000, flush_interval=600, request_timeout=30)
    produl_collector.hang()
    try:

        @flush_after(client, timeout=10.0)
        def handler(event, context):
            client.track_event("late", visitor_id="v")

        started = time.monotonic()
        handler({}, LambdaContext(remaining_ms=700))  # 0.7 s left, 0.2 s kept back
        elapsed = time.monotonic() - started
    finally:
        produl_collector.release()
    assert elapsed < 3.0
    assert "stay queued for the next one" in caplog.text
    assert client.flush(10)
    assert [e["n"] for e in produl_collector.events] == ["late"]
