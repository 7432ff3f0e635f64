"""Exit and fork behaviour, proven in real subprocesses and real forks."""

from __future__ import annotations

import multiprocessing
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from produl_server import Produl

pytestmark = pytest.mark.slow

# os.fork() in a process with threads warns on 3.12+; forking is the point here.
fork_warning = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


def run_script(
    body: str, url: str, key: str, timeout: float = 60
) -> tuple[subprocess.CompletedProcess[str], float]:
    script = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        from produl_server import Produl
        """
    ) + textwrap.dedent(body)
    env = dict(os.environ, PRODUL_API_URL=url, PRODUL_SERVER_KEY=key)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result, time.monotonic() - started


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_plain_script_delivers_at_exit_without_waiting_for_the_timer(produl_collector):
    # flush_interval=600: only the exit hook can have sent these in time.
    result, elapsed = run_script(
        """
        produl = Produl(flush_interval=600, max_delay=600)
        for i in range(3):
            produl.track_event("from_script", {"i": i}, visitor_id="v")
        """,
        produl_collector.url,
        produl_collector.server_key,
    )
    assert result.returncode == 0, result.stderr
    assert [e["pr"]["i"] for e in produl_collector.events] == [0, 1, 2]
    assert elapsed < 60
    assert "not delivered" not in result.stderr


def test_a_forgotten_client_is_still_flushed_at_exit(produl_collector):
    result, _ = run_script(
        """
        def handler():
            Produl(flush_interval=600).track_event("orphan", visitor_id="v")
        handler()
        import gc; gc.collect()
        """,
        produl_collector.url,
        produl_collector.server_key,
    )
    assert result.returncode == 0, result.stderr
    assert [e["n"] for e in produl_collector.events] == ["orphan"]


@pytest.mark.parametrize("server", ["hanging", "down"])
def test_exit_is_bounded_when_the_server_hangs_or_is_down(hung_collector, server):
    url = hung_collector.url
    if server == "down":
        url = f"http://127.0.0.1:{closed_port()}"
    # request_timeout=60 and max_retry_time=600: without the shared exit
    # budget this script would take minutes.
    result, elapsed = run_script(
        """
        produl = Produl(shutdown_timeout=1.0, request_timeout=60, flush_interval=600)
        for i in range(2):
            produl.track_event("stuck", visitor_id="v")
        """,
        url,
        hung_collector.server_key,
    )
    assert result.returncode == 0, result.stderr
    assert "2 event(s) not delivered before the shutdown deadline" in result.stderr
    assert elapsed < 30
    assert hung_collector.events == []


def test_one_exit_budget_for_all_clients(hung_collector):
    # Four clients, each with a 2 s shutdown_timeout, all stuck: one shared
    # budget means about 2 s at exit, not 8.
    result, elapsed = run_script(
        """
        clients = [Produl(shutdown_timeout=2.0, request_timeout=60) for _ in range(4)]
        for c in clients:
            c.track_event("stuck", visitor_id="v")
        """,
        hung_collector.url,
        hung_collector.server_key,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("1 event(s) not delivered") == 4
    assert 2.0 <= elapsed < 6.0, elapsed


@fork_warning
def test_fork_child_gets_its_own_sender_and_starts_empty(produl_collector):
    produl = Produl(
        server_key=produl_collector.server_key,
        api_url=produl_collector.url,
        flush_interval=600,
        max_requests_per_minute=None,
    )
    try:
        produl.track_event("parent", {"i": 1}, visitor_id="p")
        produl.track_event("parent", {"i": 2}, visitor_id="p")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                produl.track_event("child", visitor_id="c")
                ok = produl.flush(timeout=20)
                stats = produl.stats
                code = 0 if ok and stats.sent == 1 and stats.queued == 1 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert produl.flush(timeout=20)
    finally:
        produl.shutdown()
    names = sorted(e["n"] for e in produl_collector.events)
    assert names == ["child", "parent", "parent"]  # nothing sent twice
    child_port = {r.client_port for r in produl_collector.requests if b"child" in r.body}
    parent_ports = {r.client_port for r in produl_collector.requests if b"parent" in r.body}
    assert child_port.isdisjoint(parent_ports)


@fork_warning
def test_fork_while_the_sender_is_mid_request_does_not_deadlock(produl_collector):
    produl_collector.latency = 0.3
    produl = Produl(
        server_key=produl_collector.server_key,
        api_url=produl_collector.url,
        max_requests_per_minute=None,
    )
    try:
        for i in range(5):
            produl.track_event("parent", {"i": i}, visitor_id="p")
        produl.flush(timeout=0)  # wake the sender now
        produl_collector.wait_for_requests(1, timeout=10)  # a request is in flight
        pid = os.fork()
        if pid == 0:  # pragma: no cover
            code = 1
            try:
                produl.track_event("child", visitor_id="c")
                code = 0 if produl.flush(timeout=20) else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert produl.flush(timeout=30)
    finally:
        produl.shutdown()
    names = [e["n"] for e in produl_collector.events]
    assert names.count("parent") == 5
    assert names.count("child") == 1


def _pool_task(args: tuple[int, str, str]) -> bool:
    task, _, _ = args
    client = _INHERITED
    assert client is not None
    client.track_event("pool_task", {"task": task}, visitor_id="w")
    return client.flush(timeout=20)


_INHERITED: Produl | None = None


@fork_warning
def test_multiprocessing_fork_pool_delivers_each_event_once(produl_collector):
    global _INHERITED
    _INHERITED = Produl(
        server_key=produl_collector.server_key,
        api_url=produl_collector.url,
        flush_interval=600,
        max_requests_per_minute=None,
    )
    try:
        _INHERITED.track_event("before_fork", visitor_id="p")
        context = multiprocessing.get_context("fork")
        with context.Pool(2) as pool:
            results = pool.map(_pool_task, [(i, "", "") for i in range(10)])
        assert all(results)
        assert _INHERITED.flush(timeout=20)
    finally:
        _INHERITED.shutdown()
        _INHERITED = None
    tasks = sorted(e["pr"]["task"] for e in produl_collector.events if e["n"] == "pool_task")
    assert tasks == list(range(10))
    assert [e["n"] for e in produl_collector.events].count("before_fork") == 1


def _loss_line(stderr: str) -> str:
    lines = [
        line
        for line in stderr.splitlines()
        if line.startswith("WARNING") and "they are lost" in line
    ]
    assert len(lines) == 1, stderr
    return lines[0]


def test_the_loss_line_names_the_last_cause(produl_collector):
    # Issue #23: with the collector down the line said what was lost, not why.
    result, _ = run_script(
        """
        produl = Produl(shutdown_timeout=1.0, flush_interval=600, spool_dir=False)
        for i in range(3):
            produl.track_event("stuck", visitor_id="v")
        """,
        f"http://127.0.0.1:{closed_port()}",
        produl_collector.server_key,
    )
    assert result.returncode == 0, result.stderr
    line = _loss_line(result.stderr)
    assert "3 event(s) not delivered before the shutdown deadline (last error:" in line
    assert "refused" in line.lower()


def test_the_loss_line_says_until_when_the_quota_is_used_up(produl_collector):
    result, _ = run_script(
        """
        produl = Produl(shutdown_timeout=1.0, max_requests_per_minute=2, spool_dir=False)
        for i in range(5):
            produl.track_event("over", visitor_id="v")
        """,
        produl_collector.url,
        produl_collector.server_key,
    )
    assert result.returncode == 0, result.stderr
    line = _loss_line(result.stderr)
    assert "3 event(s) not delivered" in line
    assert re.search(r"\(the (host's )?quota is used up until \d\d:\d\d:\d\d\)", line), line
