"""Regression tests for the sender's share of the hardening review (issue 9).

Each one reproduces the situation for real: a LocalCollector, a raw-socket
stub server on 127.0.0.1 for answers no honest server gives, or a real
subprocess for what happens at exit.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from support import RawServer

from produl_server import DeliveryError, Produl


@pytest.fixture(name="stub")
def _stub():
    made = []

    def make(answer):
        """A raw server on 127.0.0.1 that answers each connection once with *answer*."""
        server = RawServer(lambda conn, number: answer(conn, server.stopping) and False)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def endless_chunked_body(conn, stop):
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
    sent = 0
    with contextlib.suppress(OSError):
        while not stop.is_set() and sent < 2 * 1024**3:
            conn.sendall(chunk)
            sent += len(chunk)


def test_an_endless_answer_is_cut_at_64_kib_and_the_event_counts_as_sent(stub):
    server = stub(endless_chunked_body)
    produl = Produl(server_key="sk_test_key_0000", api_url=server.url, request_timeout=2)
    produl.track_event("e", visitor_id="v")
    # The 2xx status stands; the body is cut, its connection closed.
    assert produl.flush(timeout=30) is True
    assert produl.stats.sent == 1
    produl.shutdown(timeout=1)
    assert produl.stats.pending == 0


def huge_400(conn, stop):
    message = "bad\nFORGED LOG LINE\x1b[31m " + "y" * 5_000_000
    body = '{"message": "' + message.replace("\n", "\\n").replace("\x1b", "\\u001b") + '"}'
    data = body.encode()
    conn.sendall(
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(data)
    )
    with contextlib.suppress(OSError):
        conn.sendall(data)


def test_a_huge_error_message_is_truncated_and_escaped(stub, caplog):
    server = stub(huge_400)
    reported: list[DeliveryError] = []
    produl = Produl(
        server_key="sk_test_key_0000",
        api_url=server.url,
        on_error=lambda error, event: reported.append(error),
    )
    produl.track_event("e", visitor_id="v")
    assert produl.flush(timeout=30) is False  # done, but events were dropped
    assert produl.stats.pending == 0
    produl.shutdown(timeout=1)
    (error,) = reported
    assert error.reason == "rejected"
    text = str(error)
    assert len(text) < 600
    assert "\n" not in text
    assert "\x1b" not in text
    assert "\\n" in text  # shown escaped, not dropped
    for record in caplog.records:
        assert "\n" not in record.getMessage()
        assert len(record.getMessage()) < 1000


def test_a_hook_that_calls_sys_exit_cannot_end_the_sender(produl_collector, make_client, caplog):
    def hook(error, event):
        sys.exit(3)

    produl = make_client(on_error=hook)
    produl_collector.fail_next(1, status=400)
    produl.track_event("refused", visitor_id="v")
    assert produl.flush(timeout=10) is False  # done, but events were dropped
    assert produl.stats.pending == 0
    for i in range(3):
        produl.track_event("after", {"i": i}, visitor_id="v")
    assert produl.flush(timeout=10)
    assert [e["pr"]["i"] for e in produl_collector.events] == [0, 1, 2]
    assert "the on_error hook raised" in caplog.text


def test_sync_mode_a_hook_that_flushes_returns_false_at_once(produl_collector, make_client):
    results: list[bool] = []
    produl = make_client(sync_mode=True)

    def hook(error, event):
        results.append(produl.flush(timeout=None))

    produl = make_client(sync_mode=True, on_error=hook)
    produl_collector.fail_next(1, status=400)
    done = threading.Event()
    # On a thread, so that a hang fails the test instead of freezing it.
    worker = threading.Thread(
        target=lambda: (produl.track_event("e", visitor_id="v"), done.set()), daemon=True
    )
    worker.start()
    assert done.wait(20), "the hook's flush() hung"
    assert results == [False]


def test_sync_mode_flush_waits_no_longer_than_its_timeout(produl_collector, make_client):
    produl = make_client(sync_mode=True)
    produl_collector.latency = 3.0
    sending = threading.Thread(target=lambda: produl.track_event("slow", visitor_id="v"))
    sending.start()
    produl_collector.wait_for_held(1, timeout=20)
    started = time.monotonic()
    # Another thread's request holds the line for 3 s: this flush may not wait for it.
    assert produl.flush(timeout=0.2) is False
    assert time.monotonic() - started < 2.0
    sending.join(30)
    assert [e["n"] for e in produl_collector.events] == ["slow"]


def test_stats_add_up_after_a_lossy_shutdown(hung_collector, make_client):
    reported = []
    produl = make_client(
        api_url=hung_collector.url,
        flush_interval=600,
        on_error=lambda e, ev: reported.append(e.reason),
        spool_dir=False,
    )
    for i in range(3):
        produl.track_event("e", {"i": i}, visitor_id="v")
    produl.shutdown(timeout=1)
    stats = produl.stats
    assert stats.queued == 3
    assert stats.pending == 0
    assert stats.sent == 0
    assert stats.dropped == {"shutdown": 3}
    assert stats.queued == stats.sent + stats.dropped_total
    assert reported == ["shutdown"] * 3


def test_shutdown_from_the_hook_lets_the_sender_deliver_until_the_deadline(
    produl_collector, make_client
):
    produl: Produl

    senders = []

    def hook(error, event):
        senders.append(threading.current_thread())
        produl.shutdown()

    produl = make_client(on_error=hook, flush_interval=600, shutdown_timeout=10)
    produl_collector.fail_next(1, status=400)
    produl.track_event("refused", visitor_id="v")
    produl.track_event("kept", visitor_id="v")
    produl.flush(timeout=0)  # start sending; the hook runs on the sender
    events = produl_collector.wait_for(1, timeout=20)
    assert [e["n"] for e in events] == ["kept"]
    # Shut down from its own hook, the sender ends once nothing is left.
    (sender,) = senders
    assert sender.name == "produl-server.sender"
    sender.join(20)
    assert not sender.is_alive()
    stats = produl.stats
    assert stats.sent == 1
    assert stats.dropped == {"rejected": 1}


def run_script(code: str, *env_pairs: tuple[str, str], timeout: float = 60):
    env = {
        "PYTHONPATH": ":".join(sys.path),
        "PATH": "/usr/bin:/bin",
        # The test's own default spool (conftest), never the real home.
        "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"],
    }
    env.update(dict(env_pairs))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_a_loss_at_exit_reaches_stderr_with_no_logging_configured():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nobody answers
    result = run_script(
        f"""
        from produl_server import Produl
        produl = Produl(server_key="sk_test_key_0000", api_url="http://127.0.0.1:{port}",
                        shutdown_timeout=0.5, spool_dir=False)
        for i in range(20):
            produl.track_event("e", {{"i": i}}, visitor_id="v")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "20 event(s) not delivered before the shutdown deadline" in result.stderr
    assert "flush()" in result.stderr


def test_the_plain_http_warning_reaches_stderr_with_no_logging_configured():
    result = run_script(
        """
        from produl_server import Produl
        Produl(server_key="sk_test_key_0000", api_url="http://collector.example", enabled=False)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "plain http" in result.stderr


@pytest.mark.parametrize("timeout", [1e10, float("inf"), float("nan"), -1.0])
def test_flush_and_shutdown_take_any_timeout(produl_collector, make_client, timeout):
    produl = make_client(flush_interval=600)
    produl.track_event("e", visitor_id="v")
    assert produl.flush(timeout=timeout) in (True, False)
    produl.shutdown(timeout=timeout if timeout > 0 else 5)
    stats = produl.stats
    assert stats.pending == 0
    assert stats.queued == stats.sent + stats.dropped_total == 1


def test_a_proxy_from_the_environment_with_unsendable_credentials_is_reported_masked(
    produl_collector, caplog
):
    script = """
        import logging
        logging.basicConfig(level=logging.INFO)
        from produl_server import Produl
        produl = Produl(server_key="sk_test_key_0000", api_url="https://collector.invalid",
                        max_retry_time=0, shutdown_timeout=2)
        produl.track_event("e", visitor_id="v")
        produl.shutdown()
        print(produl.stats.dropped)
    """
    result = run_script(
        script, ("HTTPS_PROXY", "http://user:s%C3%A9cr%E2%80%93t@127.0.0.1:9"), timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot be sent" in result.stderr
    assert "user:***@127.0.0.1:9" in result.stderr
    for secret in ("s%C3%A9cr%E2%80%93t", "s\u00e9cr\u2013t", "s\u00e9cr"):
        assert secret not in result.stderr + result.stdout
    assert "{'retries_exhausted': 1}" in result.stdout


def test_a_script_that_tracks_1000_events_and_ends_delivers_them_all():
    # At 70f9b78 this delivered 170: the pacer spread the burst over a minute.
    from produl_server.testing import LocalCollector

    with LocalCollector(rate_limit=2000) as collector:
        result = run_script(
            """
            from produl_server import Produl
            produl = Produl()
            for i in range(1000):
                produl.track_event("e", {"i": i}, visitor_id=f"v{i % 20}")
            """,
            ("PRODUL_SERVER_KEY", collector.server_key),
            ("PRODUL_API_URL", collector.url),
        )
        assert result.returncode == 0, result.stderr
        assert "not delivered" not in result.stderr
        assert sorted(e["pr"]["i"] for e in collector.events) == list(range(1000))
        assert 429 not in [r.status for r in collector.requests]


def test_a_script_ending_with_a_backlog_at_real_latency_delivers_it_all_at_exit():
    # 400 events and 100 ms a request: 4 lanes send 40 a second, so before
    # the exit opened more lanes (issue #22, P8) some 200 were lost at the
    # 5 s deadline. 32 lanes need about 1.3 s. On Python 3.12, where no
    # thread can start at exit, they are started ahead (it sent 50, and
    # spooled the rest, before they were).
    from produl_server.testing import LocalCollector

    with LocalCollector(rate_limit=2000) as collector:
        collector.latency = 0.1
        result = run_script(
            """
            from produl_server import Produl
            produl = Produl()
            for i in range(400):
                produl.track_event("e", {"i": i}, visitor_id=f"v{i % 97}")
            """,
            ("PRODUL_SERVER_KEY", collector.server_key),
            ("PRODUL_API_URL", collector.url),
        )
        assert result.returncode == 0, result.stderr
        assert 429 not in [r.status for r in collector.requests]
        assert "not delivered" not in result.stderr, result.stderr
        assert sorted(e["pr"]["i"] for e in collector.events) == list(range(400))


#: Python 3.12 at exit, on any Python: the exit's lanes start ahead (or not:
#: {ahead}), and no thread starts once the script's last line has run.
AS_ON_312 = """
    import threading
    from produl_server import Produl, _lanes
    _lanes.STARTS_AT_EXIT = not {ahead}
    start, ended = threading.Thread.start, []

    def start_unless_ended(thread):
        if ended:
            raise RuntimeError("can't create new thread at interpreter shutdown")
        start(thread)

    threading.Thread.start = start_unless_ended
    produl = Produl(shutdown_timeout={budget})
    for i in range({count}):
        produl.track_event("e", {{"i": i}}, visitor_id=f"v{{i % 97}}")
    ended.append(True)
"""


@pytest.mark.parametrize("ahead", [True, False], ids=["ahead", "control"])
def test_where_no_thread_starts_at_exit_the_lanes_started_ahead_send_the_backlog(ahead):
    from produl_server.testing import LocalCollector

    with LocalCollector(rate_limit=2000) as collector:
        collector.latency = 0.1
        # The control: the sender alone sends some 10 a second, and spools the rest.
        count, budget = (400, 5) if ahead else (100, 1)
        result = run_script(
            AS_ON_312.format(ahead=ahead, budget=budget, count=count),
            ("PRODUL_SERVER_KEY", collector.server_key),
            ("PRODUL_API_URL", collector.url),
        )
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert 429 not in [r.status for r in collector.requests]
        delivered = sorted(e["pr"]["i"] for e in collector.events)
        if ahead:
            assert "not delivered" not in result.stderr, result.stderr
            assert delivered == list(range(count))
            return
        spooled = re.search(r"(\d+) event\(s\) not delivered .* were spooled", result.stderr)
        assert spooled, result.stderr
        assert len(delivered) < count // 2
        assert len(delivered) + int(spooled[1]) >= count
