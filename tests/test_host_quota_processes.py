"""One quota per host: real processes bursting at once against a collector that enforces it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from produl_server.testing import LocalCollector

pytestmark = pytest.mark.slow

BURST = textwrap.dedent(
    """
    import sys
    from produl_server import Produl
    worker, count, limit, shared, budget = (int(a) for a in sys.argv[1:6])
    produl = Produl(max_requests_per_minute=limit, shared_quota=bool(shared),
                    shutdown_timeout=budget, flush_interval=600)
    sys.stdin.readline()  # every process starts bursting at once
    for i in range(count):
        produl.track_event("burst", {"w": worker, "i": i}, visitor_id=f"w{worker}-{i % 10}")
    """
)


def burst(collector, tmp_path, *, processes, count, limit, shared, budget=15):
    env = {
        "PRODUL_SERVER_KEY": collector.server_key,
        "PRODUL_API_URL": collector.url,
        # The local collector is on loopback: share the quota through a
        # directory of this test's own, as containers would on a volume.
        "PRODUL_QUOTA_DIR": str(tmp_path / "quota"),
        "PYTHONPATH": ":".join(sys.path),
        "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin",
        # The test's own default spool (conftest), never the real home.
        "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"],
    }
    (tmp_path / "quota").mkdir(mode=0o700, exist_ok=True)
    args = [str(count), str(limit), str(int(shared)), str(budget)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BURST, str(n), *args],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in range(processes)
    ]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        errors.append(err)
    return errors


@pytest.mark.parametrize("mode", ["fixed", "sliding", "bucket"])
def test_eight_processes_share_one_quota_and_meet_no_429(tmp_path, mode):
    with LocalCollector(rate_limit=2000, rate_limit_mode=mode) as collector:
        # Exactly the quota: a request that had to be retried (a timeout on a
        # loaded machine) uses a second slot, and its event then waits for the
        # window to roll, so the budget covers a whole window.
        errors = burst(
            collector, tmp_path, processes=8, count=250, limit=2000, shared=True, budget=75
        )
        statuses = [r.status for r in collector.requests]
        assert statuses.count(429) == 0
        assert len(collector.events) == 2000, errors
        pairs = {(e["pr"]["w"], e["pr"]["i"]) for e in collector.events}
        assert pairs == {(w, i) for w in range(8) for i in range(250)}


@pytest.mark.parametrize("mode", ["fixed", "sliding", "bucket"])
def test_over_the_quota_the_host_stops_at_it_and_alone_each_process_meets_429s(tmp_path, mode):
    # 8 x 100 events against 400 a minute, within a 5 s exit budget.
    with LocalCollector(rate_limit=400, rate_limit_mode=mode) as collector:
        errors = burst(
            collector, tmp_path, processes=8, count=100, limit=400, shared=True, budget=5
        )
        statuses = [r.status for r in collector.requests]
        assert statuses.count(429) == 0
        assert len(collector.events) == 400
        # What the quota could not take in time is reported, not silent.
        assert sum("not delivered before the shutdown deadline" in e for e in errors) >= 1
    with LocalCollector(rate_limit=400, rate_limit_mode=mode) as collector:
        burst(collector, tmp_path, processes=8, count=100, limit=400, shared=False, budget=5)
        statuses = [r.status for r in collector.requests]
        assert statuses.count(429) > 0
