"""The spool end to end: real scripts, a real ``produl-server drain``, a real collector."""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from produl_server import ConfigurationError, Produl
from produl_server._client import worker_of
from produl_server.testing import LocalCollector

pytestmark = pytest.mark.slow


def env_for(collector, **extra):
    env = {
        "PRODUL_SERVER_KEY": collector.server_key,
        "PRODUL_API_URL": collector.url,
        "PYTHONPATH": ":".join(sys.path),
        "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin",
        # The test's own default spool (conftest), never the real home.
        "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"],
    }
    env.update(extra)
    return env


def run_script(code, env, timeout=120):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def drain(env, spool, *options, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "produl_server", "drain", "--spool", str(spool), *options],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


TRACK = """
    import sys
    from produl_server import Produl
    produl = Produl(spool_dir=sys.argv[1] if len(sys.argv) > 1 else {spool!r},
                    shutdown_timeout={budget}, max_requests_per_minute=None,
                    retry_initial_delay=0.05, retry_max_delay=0.2)
    for i in range({count}):
        produl.track_event("e", {{"i": i}}, visitor_id=f"v{{i % 50}}")
    print(produl.stats)
"""


def counts(collector):
    return collections.Counter(e["pr"]["i"] for e in collector.events)


def test_a_3000_event_script_spools_what_its_budget_cannot_send(tmp_path):
    spool = tmp_path / "spool"
    with LocalCollector() as collector:
        # 50 ms a request: even 32 exit lanes cannot send 3,000 in 2 s.
        collector.latency = 0.05
        env = env_for(collector)
        result = run_script(TRACK.format(spool=str(spool), budget=2.0, count=3000), env)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert len(collector.events) < 3000
        line = re.search(
            r"(\d+) event\(s\) not delivered .* were spooled in (.*?)[ ;]", result.stderr
        )
        assert line, result.stderr
        assert line[2] == str(spool)
        # Each request still under way at the deadline is announced: its event
        # is spooled, and may also have arrived. No request starts within two
        # round trips of the deadline, so these are rare.
        twice = re.search(
            r"\((\d+) of them had a request under way, and may arrive twice\)", result.stderr
        )
        announced = int(twice[1]) if twice else 0
        assert 3000 <= len(collector.events) + int(line[1]) <= 3000 + announced
        collector.latency = 0.0
        drained = drain(env, spool, "--rate-limit", "off", "--timeout", "60")
        assert drained.returncode == 0, drained.stderr
        assert "the spool is empty" in drained.stdout
        seen = counts(collector)
        assert set(seen) == set(range(3000))
        assert sum(seen.values()) - 3000 <= announced


def test_a_collector_down_for_the_whole_run_then_up(tmp_path):
    spool = tmp_path / "spool"
    with LocalCollector() as collector:
        collector.fail_next(1_000_000, status=503)
        env = env_for(collector)
        code = TRACK.format(spool=str(spool), budget=1.0, count=200)
        result = run_script(code + "    produl.shutdown()\n    print(produl.stats)\n", env)
        assert result.returncode == 0, result.stderr
        assert (
            "200 event(s) not delivered before the shutdown deadline (last error: HTTP 503"
            in result.stderr
        )
        assert ") were spooled in " + str(spool) in result.stderr
        assert "pending=0, spooled=200" in result.stdout
        assert collector.events == []
        collector.reset()  # the collector is back
        drained = drain(env, spool, "--timeout", "60")
        assert drained.returncode == 0, drained.stderr
        assert sorted(counts(collector).elements()) == list(range(200))


def test_drain_killed_midway_then_run_again_loses_nothing(tmp_path):
    spool = tmp_path / "spool"
    with LocalCollector() as collector:
        collector.fail_next(1_000_000, status=503)
        env = env_for(collector, PRODUL_SPOOL_LEASE="2")
        result = run_script(TRACK.format(spool=str(spool), budget=0.5, count=400), env)
        assert result.returncode == 0, result.stderr
        collector.reset()
        collector.latency = 0.02
        killed = subprocess.Popen(
            [sys.executable, "-m", "produl_server", "drain", "--spool", str(spool)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            collector.wait_for(60, timeout=60)
        finally:
            killed.send_signal(signal.SIGKILL)
            killed.wait(30)
        collector.latency = 0.0
        # The claims of the killed drainer come back after their 2 s lease.
        drained = drain(env, spool, "--rate-limit", "off", "--timeout", "60")
        assert drained.returncode == 0, drained.stderr
        seen = counts(collector)
        assert set(seen) == set(range(400))
        # Duplicates: at most what the killed drainer had claimed.
        assert sum(seen.values()) - 400 <= 50


def test_a_new_client_delivers_the_spool_first(tmp_path):
    spool = tmp_path / "spool"
    with LocalCollector() as collector:
        collector.fail_next(1_000_000, status=503)
        result = run_script(
            TRACK.format(spool=str(spool), budget=0.5, count=30), env_for(collector)
        )
        assert result.returncode == 0, result.stderr
        collector.reset()
        produl = Produl(server_key=collector.server_key, api_url=collector.url, spool_dir=spool)
        try:
            events = collector.wait_for(30, timeout=30)
            assert sorted(e["pr"]["i"] for e in events) == list(range(30))
        finally:
            produl.shutdown(timeout=2)
        assert produl.stats.sent == 30


def test_a_spool_directory_that_cannot_be_used_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigurationError) as caught:
        # Enabled: a disabled client opens no spool, so it would not notice.
        Produl(
            server_key="sk_test_key_0000",
            spool_dir=blocker / "spool",
            api_url="http://127.0.0.1:9",
        )
    message = str(caught.value)
    assert "spool_dir" in message
    assert "\n" not in message
    with LocalCollector() as collector:
        result = drain(env_for(collector), blocker / "spool")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert collector.server_key not in result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX rlimits")
def test_a_full_disk_at_exit_is_one_clear_error_and_the_events_are_counted(tmp_path):
    # The spool opens fine; then files may not grow (RLIMIT_FSIZE: writes
    # past the limit fail with EFBIG, as a full disk fails with ENOSPC).
    # At the exit deadline the 500 undelivered events cannot be written.
    spool = tmp_path / "spool"
    with LocalCollector() as collector:
        env = env_for(collector, PRODUL_API_URL=f"http://127.0.0.1:{closed_port()}")
    result = run_script(
        f"""
        import os, resource
        from produl_server import Produl
        produl = Produl(spool_dir={str(spool)!r}, shutdown_timeout=1,
                        retry_initial_delay=0.05, retry_max_delay=0.2)
        biggest = max(entry.stat().st_size for entry in os.scandir({str(spool)!r}))
        resource.setrlimit(resource.RLIMIT_FSIZE, (biggest + 4096, biggest + 4096))
        for i in range(500):
            produl.track_event("e", {{"i": i, "pad": "x" * 200}}, visitor_id=f"v{{i % 50}}")
        """,
        env,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    spool_errors = [line for line in lines if "spool" in line.lower() and "lost" not in line]
    assert len(spool_errors) == 1, result.stderr
    assert "500 event(s) not delivered before the shutdown deadline" in result.stderr
    assert f"they are lost. The spool ({spool}) could not take them" in result.stderr
    assert collector.server_key not in result.stderr


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


AFTER = """
    import time
    from produl_server import Produl
    produl = Produl(spool_dir={spool!r}, shutdown_timeout={budget}, max_requests_per_minute={rate},
                    shared_quota=False)
    produl.track_event("after", {{"i": -1}}, visitor_id="v")
    {end}
    print(produl.stats)
"""


def spooled_in_an_outage(collector, spool, count):
    collector.fail_next(1_000_000, status=503)
    result = run_script(TRACK.format(spool=str(spool), budget=0.5, count=count), env_for(collector))
    assert result.returncode == 0, result.stderr
    assert f"{count} event(s) not delivered before the shutdown deadline (last error: " in (
        result.stderr
    )
    assert ") were spooled in " in result.stderr
    collector.reset()  # the collector is back


@pytest.mark.parametrize("end", ["flush", "exit"])
def test_a_run_after_an_outage_drains_the_spool_it_finds(tmp_path, end):
    # Issue #19: such a run delivered 100 of 300 spooled events, and exited
    # leaving 200 on disk with stats saying pending=0, spooled=0.
    spool = tmp_path / "spool"
    with LocalCollector() as collector:
        spooled_in_an_outage(collector, spool, 300)
        code = AFTER.format(
            spool=str(spool),
            budget=30,
            rate=None,
            end='print("flushed", produl.flush(timeout=30))' if end == "flush" else "",
        )
        result = run_script(code, env_for(collector))
        assert result.returncode == 0, result.stderr
        if end == "flush":
            assert "flushed True" in result.stdout
            assert "pending=0," in result.stdout
        seen = counts(collector)
        assert set(seen) == {-1, *range(300)}
        with Produl(server_key=collector.server_key, api_url=collector.url, spool_dir=spool) as p:
            assert worker_of(p).spool_count() == 0


def test_a_backlog_the_quota_holds_back_stays_on_disk_and_stats_say_so(tmp_path):
    spool = tmp_path / "spool"
    with LocalCollector() as collector:
        spooled_in_an_outage(collector, spool, 300)
        # 60 requests a minute: 60 go at once, and the rest waits for the quota.
        code = AFTER.format(
            spool=str(spool),
            budget=1.0,
            rate=60,
            end='print("flushed", produl.flush(timeout=1)); produl.shutdown()',
        )
        result = run_script(code, env_for(collector))
        assert result.returncode == 0, result.stderr
        assert "flushed False" in result.stdout
        assert len(collector.events) == 60
        stats = re.search(r"sent=(\d+),.*pending=(\d+), .*backlog=(\d+)\)", result.stdout)
        assert stats, result.stdout
        assert (int(stats[1]), int(stats[2]), int(stats[3])) == (60, 0, 241)
