"""A fleet behind one IP: the quota and the spool in a real Redis, real processes, real HTTP.

Each "pod" is a temp directory of its own (its ``TMPDIR`` and its host
quota's ``PRODUL_QUOTA_DIR``): pods share nothing but the Redis and the
collector's address, as pods behind one NAT gateway would.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from support import free_port, wait_until

from produl_server._redis import TIMEOUT as REDIS_TIMEOUT
from produl_server.testing import LocalCollector

pytestmark = pytest.mark.slow

#: The spool's lease in the SIGKILL test (seconds; PRODUL_SPOOL_LEASE).
LEASE = 3


def pod(tmp_path, name):
    """A pod's own directory, with its temp dir and host-quota dir."""
    home = tmp_path / name
    for sub in ("tmp", "quota"):
        (home / sub).mkdir(mode=0o700, parents=True)
    return home


def pod_env(home, api_url, server_key, redis_url=None, **extra):
    env = {
        "PRODUL_SERVER_KEY": server_key,
        "PRODUL_API_URL": api_url,
        "PRODUL_QUOTA_DIR": str(home / "quota"),
        "TMPDIR": str(home / "tmp"),
        "PYTHONPATH": ":".join(sys.path),
        "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin",
        # The test's own default spool (conftest), never the real home.
        "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"],
        "PYTHONUNBUFFERED": "1",
    }
    if redis_url is not None:
        env["PRODUL_REDIS_URL"] = redis_url
    env.update(extra)
    return env


def start(code, env, *args, stdout=subprocess.PIPE):
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=env["TMPDIR"],
    )


def reap(proc):
    """Kill it if it still runs, and close its pipes (whatever happened before)."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def finish(proc, timeout=60):
    """Close stdin, wait for the exit; return (stdout, stderr), failing on a non-zero status."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"no exit within {timeout} s; stderr:\n{err[-3000:]}") from None
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    return out, err


def say(proc, line="go"):
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def stats_of(out):
    """The JSON lines a child printed, as dicts."""
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def indices(collector):
    return collections.Counter(e["pr"]["i"] for e in collector.events)


def connect(redis_server):
    import redis  # the redis_server fixture skips (or fails in CI) without it

    return redis.Redis.from_url(redis_server.url, socket_timeout=10)


def streams(redis_server):
    """{key: length} of every Stream in the test's Redis: the spools."""
    client = connect(redis_server)
    try:
        return {key: client.xlen(key) for key in client.scan_iter(_type="stream")}
    finally:
        client.close()


def spooled(redis_server):
    return sum(streams(redis_server).values())


def claimed(redis_server):
    """Spooled events claimed by a sender and not acknowledged (XPENDING), every spool."""
    client = connect(redis_server)
    try:
        total = 0
        for key in client.scan_iter(_type="stream"):
            for group in client.xinfo_groups(key):
                total += int(group["pending"])
        return total
    finally:
        client.close()


# -- a shared quota -----------------------------------------------------------

BURST = """
    import json, sys
    from produl_server import Produl
    worker, count, budget = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    produl = Produl(max_requests_per_minute=400, shutdown_timeout=budget, flush_interval=600)
    sys.stdin.readline()  # the whole fleet starts bursting at once
    for i in range(count):
        produl.track_event("burst", {"w": worker, "i": i}, visitor_id=f"w{worker}-{i % 10}")
    produl.shutdown()
    s = produl.stats
    print(json.dumps({"sent": s.sent, "spooled": s.spooled, "dropped": s.dropped,
                      "pending": s.pending, "quota": s.quota, "used": s.quota_used}))
"""

GROUPS, PER_GROUP, BURST_SIZE, QUOTA = 3, 3, 150, 400


def run_fleet(tmp_path, collector, redis_url, budget):
    """3 pods x 3 processes burst 150 events each at once; return (seconds to 400, outputs)."""
    procs = []
    for group in range(GROUPS):
        home = pod(tmp_path, f"pod{group}")
        env = pod_env(home, collector.url, collector.server_key, redis_url)
        for n in range(PER_GROUP):
            worker = group * PER_GROUP + n
            procs.append(start(BURST, env, worker, BURST_SIZE, budget))
    try:
        for proc in procs:
            say(proc)
        started = time.monotonic()
        if redis_url is not None:
            collector.wait_for(QUOTA, timeout=15)
        took = time.monotonic() - started
        outputs = [finish(proc, timeout=budget + 60) for proc in procs]
    finally:
        for proc in procs:
            reap(proc)
    return took, outputs


@pytest.mark.parametrize("mode", ["fixed", "sliding", "bucket"])
def test_three_pods_share_one_quota_in_redis_and_meet_no_429(tmp_path, redis_server, mode):
    total = GROUPS * PER_GROUP * BURST_SIZE
    with LocalCollector(rate_limit=QUOTA, rate_limit_mode=mode) as collector:
        took, outputs = run_fleet(tmp_path, collector, redis_server.url, budget=6)
        statuses = [r.status for r in collector.requests]
        assert statuses.count(429) == 0, f"{statuses.count(429)} x 429"
        # The quota's 400, within 15 s of the start (wait_for failed otherwise),
        # once each: the rest waits for the next window, in Redis.
        pairs = collections.Counter((e["pr"]["w"], e["pr"]["i"]) for e in collector.events)
        assert len(collector.events) == QUOTA, took
        assert max(pairs.values()) == 1
    stats = [stats_of(out)[-1] for out, _ in outputs]
    assert {s["quota"] for s in stats} == {"redis"}
    assert all(sum(s["dropped"].values()) == 0 and s["pending"] == 0 for s in stats), stats
    assert max(s["used"] for s in stats) == QUOTA
    assert sum(s["sent"] for s in stats) == QUOTA
    # Nothing lost: what the window could not take is in the Redis spool, once.
    assert spooled(redis_server) == total - QUOTA
    assert any("spooled in Redis" in err for _, err in outputs), outputs[0][1]


def test_without_redis_the_same_three_pods_meet_429s(tmp_path):
    # Each pod paces with its own host quota: together they send 3 x 400.
    with LocalCollector(rate_limit=QUOTA, rate_limit_mode="sliding") as collector:
        run_fleet(tmp_path, collector, None, budget=4)
        statuses = [r.status for r in collector.requests]
        assert statuses.count(429) > 0
        assert len(collector.events) == QUOTA


# -- the spool in Redis -------------------------------------------------------

TRACK = """
    import sys
    from produl_server import Produl
    count, budget = int(sys.argv[1]), float(sys.argv[2])
    produl = Produl(shutdown_timeout=budget, retry_initial_delay=0.05, retry_max_delay=0.2)
    for i in range(count):
        produl.track_event("e", {"i": i}, visitor_id=f"v{i % 50}")
    print("tracked", flush=True)
"""

DELIVER = """
    import json, sys
    from produl_server import Produl
    produl = Produl(retry_initial_delay=0.05, retry_max_delay=0.2)
    produl.track_event("hello", {"i": -1}, visitor_id="v")  # starts the sender
    print("started", flush=True)
    sys.stdin.readline()
    produl.shutdown()
    s = produl.stats
    print(json.dumps({"sent": s.sent, "spooled": s.spooled, "dropped": s.dropped}))
"""


def spool_in_redis(tmp_path, name, api_url, redis_server, count, budget=1.0, **extra):
    """A pod tracks *count* events while the collector is down, and exits; return its home."""
    home = pod(tmp_path, name)
    env = pod_env(home, api_url, "sk_test_local", redis_server.url, **extra)
    proc = start(TRACK, env, count, budget)
    try:
        assert proc.stdout.readline() == "tracked\n", proc.stderr.read()
        exiting = time.monotonic()
        _, err = finish(proc)
        took = time.monotonic() - exiting
    finally:
        reap(proc)
    # The exit spends its budget on the outage, and no more because of Redis
    # (FINISH_WAIT, 2 s, is what a finishing exit may add to it; then room).
    assert took < budget + 5.0, (took, err)
    assert f"{count} event(s) not delivered before the shutdown deadline (last error: " in err, err
    assert ") were spooled in " in err, err
    assert f"Redis at {redis_server.url}" in err
    assert spooled(redis_server) == count
    return home


def test_the_spool_survives_its_pod(tmp_path, redis_server):
    port = free_port()  # the collector is down: nothing listens there yet
    api_url = f"http://127.0.0.1:{port}"
    first = spool_in_redis(tmp_path, "pod-a", api_url, redis_server, 300)
    shutil.rmtree(first)  # the pod is deleted, and its disk with it
    assert not first.exists()
    with LocalCollector(port=port) as collector:
        home = pod(tmp_path, "pod-b")
        proc = start(DELIVER, pod_env(home, api_url, collector.server_key, redis_server.url))
        try:
            assert proc.stdout.readline() == "started\n"
            collector.wait_for(301, timeout=30)
            say(proc, "done")
            out, _ = finish(proc)
        finally:
            reap(proc)
        seen = indices(collector)
        assert sorted(seen.elements()) == [-1, *range(300)]
    assert stats_of(out)[-1]["sent"] == 301
    assert spooled(redis_server) == 0


def drain(env, redis_url, api_url, *options):
    """``produl-server drain --redis URL --api-url URL --server-key KEY [options]``."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "produl_server",
            "drain",
            "--redis",
            redis_url,
            "--api-url",
            api_url,
            "--server-key",
            env["PRODUL_SERVER_KEY"],
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        # What it is told on the command line, not what the environment says.
        env={k: v for k, v in env.items() if k not in ("PRODUL_API_URL", "PRODUL_SERVER_KEY")},
        check=False,
    )


def kill_a_sender_midway(tmp_path, redis_server, collector, api_url):
    """A sender delivers the spool slowly and is SIGKILLed mid-way; return (delivered, claimed)."""
    collector.latency = 0.05  # the sender is mid-way for seconds
    env = pod_env(pod(tmp_path, "pod-b"), api_url, collector.server_key, redis_server.url)
    killed = start(DELIVER, dict(env, PRODUL_SPOOL_LEASE=str(LEASE)))
    try:
        collector.wait_for(40, timeout=30)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    # Its own "hello" (-1) waits behind the spool: lost with it, as SIGKILL does.
    delivered = sum(n for i, n in indices(collector).items() if i >= 0)
    assert delivered < 300, "the sender was not mid-way"
    # Claimed by the dead sender and never acknowledged: at most these come twice.
    in_flight = claimed(redis_server)
    assert in_flight > 0
    collector.latency = 0.0
    return delivered, in_flight


def test_a_sender_killed_midway_loses_nothing(tmp_path, redis_server):
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    spool_in_redis(tmp_path, "pod-a", api_url, redis_server, 300, PRODUL_SPOOL_LEASE=str(LEASE))
    with LocalCollector(port=port) as collector:
        delivered, in_flight = kill_a_sender_midway(tmp_path, redis_server, collector, api_url)
        env = pod_env(
            pod(tmp_path, "pod-c"), api_url, collector.server_key, PRODUL_SPOOL_LEASE=str(LEASE)
        )
        started = time.monotonic()
        # Like drain --spool: it waits out the dead sender's lease, then delivers its claims.
        drained = drain(env, redis_server.url, api_url, "--timeout", "60")
        assert drained.returncode == 0, drained.stderr
        assert "the spool is empty" in drained.stdout
        assert time.monotonic() - started < LEASE + 15
        seen = collections.Counter(i for i in indices(collector).elements() if i >= 0)
        assert set(seen) == set(range(300))
        duplicates = sum(seen.values()) - 300
        assert duplicates <= in_flight, (duplicates, in_flight, delivered)
    assert spooled(redis_server) == 0


def test_a_running_client_takes_over_a_dead_senders_claims_after_the_lease(tmp_path, redis_server):
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    lease = {"PRODUL_SPOOL_LEASE": str(LEASE)}
    spool_in_redis(tmp_path, "pod-a", api_url, redis_server, 300, **lease)
    with LocalCollector(port=port) as collector:
        delivered, in_flight = kill_a_sender_midway(tmp_path, redis_server, collector, api_url)
        env = pod_env(pod(tmp_path, "pod-c"), api_url, collector.server_key, redis_server.url)
        proc = start(DELIVER, dict(env, **lease))
        try:
            assert proc.stdout.readline() == "started\n"
            # A surviving pod delivers what the dead one held once its lease ran out.
            wait_until(
                lambda: set(indices(collector)) >= set(range(300)),
                LEASE + 15,
                f"the {in_flight} event(s) the dead sender held, after its {LEASE} s lease",
            )
            say(proc, "done")
            finish(proc)
        finally:
            reap(proc)
        seen = indices(collector)
        assert set(seen) == {-1, *range(300)}
        # Only the spooled events count, not the senders' own "hello" (-1).
        duplicates = sum(n - 1 for i, n in seen.items() if i >= 0)
        assert duplicates <= in_flight, (duplicates, in_flight, delivered)
    assert spooled(redis_server) == 0


# -- Redis down ---------------------------------------------------------------

DOWN = """
    import json, sys, time
    from produl_server import Produl
    count = int(sys.argv[1])
    produl = Produl(max_requests_per_minute=600, flush_interval=600)
    def say(**fields):
        print(json.dumps(fields), flush=True)
    sys.stdin.readline()
    slowest, started = 0.0, time.perf_counter()
    for i in range(count):
        before = time.perf_counter()
        produl.track_event("down", {"i": i}, visitor_id=f"v{i % 10}")
        slowest = max(slowest, time.perf_counter() - before)
    say(burst=time.perf_counter() - started, slowest=slowest)
    delivered = produl.flush(timeout=60)
    s = produl.stats
    say(delivered=delivered, sent=s.sent, quota=s.quota)
    sys.stdin.readline()  # Redis is up again
    deadline, i = time.monotonic() + 20, count
    while produl.stats.quota != "redis" and time.monotonic() < deadline:
        produl.track_event("probe", {"i": i}, visitor_id="p")
        produl.flush(timeout=5)
        i += 1
        time.sleep(0.1)
    produl.track_event("probe", {"i": i}, visitor_id="p")
    produl.flush(timeout=5)
    s = produl.stats
    say(quota=s.quota, used=s.quota_used, sent=s.sent, probes=i + 1 - count)
    produl.shutdown()
"""


class Unanswering:
    """A port that accepts connections and never answers: a Redis that hangs."""

    def __init__(self, port):
        self.listener = socket.create_server(("127.0.0.1", port), backlog=64)
        self.listener.settimeout(0.05)
        self.held = []
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.closing.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.held.append(conn)

    def close(self):
        """Close the port and every connection; idempotent."""
        self.closing.set()
        self.thread.join(10)
        self.listener.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("outage", ["closed", "unanswered"])
def test_redis_down_falls_back_warns_once_and_comes_back(tmp_path, redis_server, outage):
    count = 200
    redis_server.stop()
    hang = Unanswering(redis_server.port) if outage == "unanswered" else None
    with LocalCollector(rate_limit=600) as collector:
        env = pod_env(pod(tmp_path, "pod"), collector.url, collector.server_key, redis_server.url)
        proc = start(DOWN, env, count)
        try:
            say(proc)
            timing = json.loads(proc.stdout.readline())
            # A track_event that waited on this Redis would take its timeout.
            assert timing["slowest"] < REDIS_TIMEOUT, timing
            if hang is not None:
                wait_until(lambda: hang.held, 10, "the sender to try Redis")
            first = json.loads(proc.stdout.readline())
            assert first == {"delivered": True, "sent": count, "quota": "host"}
            assert sorted(indices(collector).elements()) == list(range(count))
            if hang is not None:
                hang.close()
            redis_server.start()
            say(proc, "up")
            back = json.loads(proc.stdout.readline())
            _, err = finish(proc)
        finally:
            if hang is not None:
                hang.close()
            reap(proc)
        assert back["quota"] == "redis", (back, err)
        assert back["used"] >= 1
        assert back["sent"] == count + back["probes"]
        assert 429 not in [r.status for r in collector.requests]
    warnings = [line for line in err.splitlines() if "Redis" in line]
    assert len(warnings) == 1, err


# -- produl-server drain --redis ----------------------------------------------


def test_drain_redis_delivers_the_spool_and_exits_0_only_when_it_is_empty(tmp_path, redis_server):
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    home = spool_in_redis(tmp_path, "pod-a", api_url, redis_server, 100, budget=0.5)
    env = pod_env(home, api_url, "sk_test_local")
    # The collector is still down: the spool stays, and drain says so.
    failed = drain(env, redis_server.url, api_url, "--timeout", "2")
    assert failed.returncode == 1, failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert "100 event(s) still spooled" in failed.stderr
    assert spooled(redis_server) == 100
    with LocalCollector(port=port) as collector:
        drained = drain(env, redis_server.url, api_url, "--timeout", "60")
        assert drained.returncode == 0, drained.stderr
        assert "the spool is empty" in drained.stdout
        assert sorted(indices(collector).elements()) == list(range(100))
    assert spooled(redis_server) == 0


AFTER = """
    import json
    from produl_server import Produl
    produl = Produl(shutdown_timeout=30)
    produl.track_event("after", {"i": -1}, visitor_id="v")
    flushed = produl.flush(timeout=30)
    s = produl.stats
    print(json.dumps({"flushed": flushed, "sent": s.sent, "pending": s.pending}), flush=True)
"""


def test_a_run_after_an_outage_drains_the_redis_spool_in_its_flush(tmp_path, redis_server):
    # Issue #19: such a run delivered 100 of the 300 events spooled in Redis.
    port = free_port()  # the collector is down: nothing listens there yet
    api_url = f"http://127.0.0.1:{port}"
    spool_in_redis(tmp_path, "pod-a", api_url, redis_server, 300)
    with LocalCollector(port=port) as collector:
        env = pod_env(pod(tmp_path, "pod-b"), api_url, collector.server_key, redis_server.url)
        proc = start(AFTER, env)
        try:
            out, _ = finish(proc)
        finally:
            reap(proc)
        assert stats_of(out)[-1] == {"flushed": True, "sent": 301, "pending": 0}
        assert sorted(indices(collector).elements()) == [-1, *range(300)]
    assert spooled(redis_server) == 0
