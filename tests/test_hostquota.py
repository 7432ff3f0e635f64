"""HostQuota: one request quota for every process of the host.

The unit tests pass ``now`` and check the answers; two objects on one file
stand for two processes. The process tests start real interpreters (fresh
ones, never a fork of pytest) and synchronise with them through pipes, so
nothing depends on how fast a loaded machine schedules them.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import random
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import produl_server
from produl_server import _hostquota
from produl_server._hostquota import HostQuota
from produl_server._quota import RollingQuota

WINDOW = 61.0
#: A wall-clock time for the injected ``now`` values.
BASE = 1_700_000_000.0
#: How long one call may take while another process holds the lock: the
#: lock budget plus generous room for a loaded two-core machine.
CALL_BOUND = HostQuota.LOCK_BUDGET + 0.5


@pytest.fixture(name="folder")
def _folder(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "quota"
    folder.mkdir(mode=0o700)
    return folder


@pytest.fixture(name="make")
def _make(folder: pathlib.Path):
    """Build quotas in the test's directory; close them all afterwards."""
    made: list[HostQuota] = []

    def make(limit: int = 5, key: str = "https://api.produl.test", **options) -> HostQuota:
        options.setdefault("directory", str(folder))
        quota = HostQuota(limit, key, **options)
        made.append(quota)
        return quota

    yield make
    for quota in made:
        quota.close()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "produl_server" and r.levelno >= logging.WARNING]


def at_most_in_any_window(stamps: list[float], limit: int, window: float) -> bool:
    """True if no window of *window* seconds (open at its start) holds more than *limit*."""
    stamps = sorted(stamps)
    return all(stamps[i + limit] - stamps[i] >= window for i in range(max(0, len(stamps) - limit)))


# -- the ring, with injected time ------------------------------------------------


def test_one_quota_answers_like_rolling_quota(make) -> None:
    shared, alone = make(limit=7, window=10.0), RollingQuota(7, window=10.0)
    rng = random.Random(1)
    now = BASE
    for _ in range(3000):
        now += rng.choice([0.0, 0.01, 0.3, 1.7, 4.0])
        if rng.random() < 0.2:
            assert shared.wait(now) == pytest.approx(alone.wait(now))
        else:
            assert shared.take(now) == pytest.approx(alone.take(now))
        assert shared.used == alone.used
    assert shared.shared


def test_two_quotas_on_one_file_share_the_limit(make) -> None:
    first, second = make(limit=5, window=10.0), make(limit=5, window=10.0)
    assert first.path == second.path
    assert [first.take(BASE), second.take(BASE + 1), first.take(BASE + 2)] == [0, 0, 0]
    assert [second.take(BASE + 3), second.take(BASE + 4)] == [0, 0]
    # Full: the oldest (BASE) leaves the window at BASE + 10.
    assert first.take(BASE + 5) == pytest.approx(5.0)
    assert second.wait(BASE + 6) == pytest.approx(4.0)
    assert first.used == second.used == 5
    assert second.take(BASE + 10) == 0
    assert first.take(BASE + 10.5) == pytest.approx(0.5)


def test_never_more_than_the_limit_in_any_window(make) -> None:
    quotas = [make(limit=20, window=5.0) for _ in range(3)]
    rng = random.Random(2)
    now, granted = BASE, []
    for _ in range(5000):
        now += rng.expovariate(8.0)
        if not rng.choice(quotas).take(now):
            granted.append(now)
    assert len(granted) > 1000  # the test did hit the limit, and long after it
    assert at_most_in_any_window(granted, 20, 5.0)
    assert not at_most_in_any_window(granted, 19, 5.0)  # and used all of it


def test_quotas_with_other_keys_are_independent(make) -> None:
    one, other = make(limit=1, key="https://a.test"), make(limit=1, key="https://b.test")
    assert one.path != other.path
    assert one.take(BASE) == 0
    assert other.take(BASE) == 0


def test_a_larger_limit_grows_the_ring_and_keeps_every_timestamp(make) -> None:
    small = make(limit=3, window=10.0)
    for offset in range(3):
        assert small.take(BASE + offset) == 0
    size = os.path.getsize(small.path)
    large = make(limit=5, window=10.0)
    assert large.take(BASE + 3) == 0
    assert os.path.getsize(large.path) == size + 2 * 8
    assert large.take(BASE + 4) == 0
    assert large.take(BASE + 5) == pytest.approx(5.0)  # all 5 kept: BASE leaves first
    # The small one maps the grown file and decides with its own limit.
    assert small.take(BASE + 5) == pytest.approx(7.0)  # 5 counted: BASE+2 must leave
    assert small.used == 5


def test_a_smaller_limit_keeps_the_ring_and_decides_alone(make) -> None:
    large = make(limit=5, window=10.0)
    for offset in range(4):
        assert large.take(BASE + offset) == 0
    size = os.path.getsize(large.path)
    small = make(limit=2, window=10.0)
    assert small.take(BASE + 4) == pytest.approx(8.0)  # 4 counted: BASE+2 must leave
    assert os.path.getsize(small.path) == size  # never shrunk
    assert large.take(BASE + 4) == 0
    assert large.take(BASE + 4) == pytest.approx(6.0)


def test_stale_future_timestamps_are_dropped(make) -> None:
    quota = make(limit=2, window=10.0)
    assert quota.take(BASE) == 0
    assert quota.take(BASE) == 0
    # The clock steps back by more than the window: the entries are stale.
    back = BASE - 10.5
    assert quota.take(back) == 0
    assert quota.used == 1


def test_a_small_step_back_counts_but_never_waits_more_than_the_window(make) -> None:
    quota = make(limit=2, window=10.0)
    assert quota.take(BASE) == 0
    assert quota.take(BASE) == 0
    back = BASE - 8.0  # within the window: still counted
    assert quota.take(back) == pytest.approx(10.0)  # 18 s by the stamps, capped
    assert quota.used == 2


def test_timestamps_never_go_backwards_in_the_ring(make) -> None:
    # Two processes read the clock, then take the lock in the other order.
    first, second = make(limit=2, window=10.0), make(limit=2, window=10.0)
    assert second.take(BASE + 0.002) == 0
    assert first.take(BASE + 0.001) == 0  # stored at BASE + 0.002
    assert first.take(BASE + 5) == pytest.approx(5.002)


def test_a_time_that_is_not_finite_is_refused(make) -> None:
    quota = make(limit=2)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="finite"):
            quota.take(bad)
    assert quota.take(BASE) == 0
    assert quota.used == 1


def test_nan_in_the_file_leaves_the_ring(make) -> None:
    quota = make(limit=3)
    for _ in range(3):
        assert quota.take(BASE) == 0
    mapping = quota._mapping
    mapping.slots[0] = mapping.slots[2] = float("nan")  # a damaged file
    assert quota.take(BASE) == 0
    assert quota.used == 2


def test_a_corrupt_file_is_formatted_again(make) -> None:
    quota = make(limit=3)
    assert quota.take(BASE) == 0
    pathlib.Path(quota.path).write_bytes(b"garbage" * 100)
    other = make(limit=3)
    assert other.take(BASE) == 0
    assert other.used == 1
    assert quota.take(BASE) == 0
    assert quota.used == 2


def test_threads_share_one_object(make) -> None:
    quota = make(limit=500)
    granted: list[int] = []

    def work() -> None:
        granted.append(sum(quota.take(BASE + i * 1e-4) == 0 for i in range(300)))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 500


def test_close_paces_alone_afterwards(make) -> None:
    quota = make(limit=1)
    assert quota.take(BASE) == 0
    quota.close()
    quota.close()
    assert not quota.shared
    assert quota.take(BASE) == 0  # a fresh local quota
    assert quota.take(BASE) > 0


@pytest.mark.parametrize(("limit", "window"), [(0, 61.0), (-1, 61.0), (5, 0.0)])
def test_bad_arguments(limit: int, window: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        HostQuota(limit, "key", window=window)


# -- where the file lives ------------------------------------------------------


def test_the_file_is_private(make, folder: pathlib.Path) -> None:
    quota = make()
    assert quota.take(BASE) == 0
    assert pathlib.Path(quota.path).parent == folder
    assert stat.S_IMODE(os.stat(quota.path).st_mode) == 0o600


def test_runtime_dir_first(monkeypatch, tmp_path: pathlib.Path, make) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    quota = make(directory=None)
    assert quota.shared
    folder = tmp_path / "produl-server"
    assert pathlib.Path(quota.path).parent == folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_temp_dir_without_runtime_dir(monkeypatch, tmp_path: pathlib.Path, make) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    quota = make(directory=None)
    assert quota.shared
    folder = tmp_path / f"produl-server-{os.geteuid()}"
    assert pathlib.Path(quota.path).parent == folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_an_unusable_runtime_dir_falls_back_to_the_temp_dir(
    monkeypatch, tmp_path: pathlib.Path, make, caplog
) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    (runtime / "produl-server").write_text("not a directory")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    quota = make(directory=None)
    assert quota.shared
    assert pathlib.Path(quota.path).parent == tmp_path / f"produl-server-{os.geteuid()}"
    assert not warnings_of(caplog)


def check_fallback(quota: HostQuota, caplog, where: pathlib.Path, reason: str) -> None:
    """Local pacing, and exactly one warning naming *where*, without a traceback."""
    assert not quota.shared
    records = warnings_of(caplog)
    assert len(records) == 1, records
    message = records[0].getMessage()
    assert str(where) in message
    assert reason in message
    assert records[0].exc_info is None
    assert "Traceback" not in caplog.text
    assert quota.take(BASE) == 0
    assert quota.take(BASE) == 0
    assert quota.take(BASE) > 0  # limit 2, paced locally
    assert len(warnings_of(caplog)) == 1


def test_a_directory_that_cannot_be_made_falls_back(tmp_path: pathlib.Path, make, caplog) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    where = blocker / "sub"  # fails for root too, unlike a read-only mode
    quota = make(limit=2, directory=str(where))
    check_fallback(quota, caplog, where, "Not a directory")
    assert quota.path is None


def test_a_group_writable_directory_is_refused(folder: pathlib.Path, make, caplog) -> None:
    folder.chmod(0o777)
    quota = make(limit=2)
    check_fallback(quota, caplog, folder, "writable by group or others")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_another_users_directory_is_refused(folder: pathlib.Path, make, caplog) -> None:
    os.chown(folder, 65534, 65534)
    quota = make(limit=2)
    check_fallback(quota, caplog, folder, "owned by uid 65534")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_another_users_temp_dir_is_refused(monkeypatch, tmp_path: pathlib.Path, caplog) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    squatted = tmp_path / f"produl-server-{os.geteuid()}"
    squatted.mkdir(mode=0o700)
    os.chown(squatted, 65534, 65534)
    quota = HostQuota(2, "key")
    check_fallback(quota, caplog, squatted, "owned by uid 65534")


def test_a_symlinked_temp_dir_is_refused(monkeypatch, tmp_path: pathlib.Path, caplog) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    planted = tmp_path / f"produl-server-{os.geteuid()}"
    planted.symlink_to(target)
    quota = HostQuota(2, "key")
    check_fallback(quota, caplog, planted, "not a directory")


def test_a_planted_symlink_is_not_followed(make, caplog) -> None:
    probe = make(limit=2)
    path = pathlib.Path(probe.path)
    probe.close()
    path.unlink(missing_ok=True)
    target = path.with_name("target")
    target.write_bytes(b"")
    path.symlink_to(target)
    quota = make(limit=2)
    check_fallback(quota, caplog, path, "Too many levels of symbolic links")
    assert target.read_bytes() == b""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_another_users_file_is_refused(make, caplog) -> None:
    probe = make(limit=2)
    assert probe.take(BASE) == 0
    probe.close()
    os.chown(probe.path, 65534, 65534)
    quota = make(limit=2)
    check_fallback(quota, caplog, pathlib.Path(probe.path), "not a regular file of ours")


def test_a_full_disk_falls_back_without_a_crash(monkeypatch, make, caplog) -> None:
    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    quota = make(limit=2)
    assert quota.shared  # the file opened; growing it fails on the first call
    assert quota.wait(BASE) == 0
    check_fallback(quota, caplog, pathlib.Path(quota.path), "No space left on device")


def test_a_file_system_without_flock_falls_back(monkeypatch, make, caplog) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    quota = make(limit=2)
    monkeypatch.setattr(_hostquota.fcntl, "flock", no_locks)
    assert quota.shared
    assert quota.wait(BASE) == 0
    check_fallback(quota, caplog, pathlib.Path(quota.path), "No locks available")


def test_without_fcntl(monkeypatch, folder: pathlib.Path, make, caplog) -> None:
    monkeypatch.setattr(_hostquota, "_HAVE_FCNTL", False)
    quota = make(limit=2)
    check_fallback(quota, caplog, folder, "no fcntl.flock")


# -- real processes ------------------------------------------------------------


def python(script: str, *args: str, **options) -> subprocess.Popen[str]:
    """Start a fresh interpreter that imports the produl_server under test."""
    root = os.path.dirname(os.path.dirname(produl_server.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        **options,
    )


TAKER = """
    import sys
    from produl_server._hostquota import HostQuota

    directory, base = sys.argv[1], float(sys.argv[2])
    quota = HostQuota(1000, "https://api.produl.test", directory=directory)
    quota.STUCK_AFTER = 1e9  # never pace alone: a busy answer is retried
    print("ready" if quota.shared else "alone", flush=True)
    sys.stdin.readline()
    granted = busy = 0
    for index in range(250):
        while (answer := quota.take(base + index * 0.001)) == quota.BUSY_WAIT:
            busy += 1
        granted += answer == 0
    quota.close()
    print(granted, busy, flush=True)
"""


@pytest.mark.slow
def test_eight_processes_get_exactly_the_limit(folder: pathlib.Path, make) -> None:
    takers = [python(TAKER, str(folder), repr(BASE)) for _ in range(8)]
    try:
        assert [taker.stdout.readline().strip() for taker in takers] == ["ready"] * 8
        for taker in takers:  # all of them at once
            taker.stdin.write("go\n")
            taker.stdin.flush()
        results = [taker.stdout.readline().split() for taker in takers]
    finally:
        for taker in takers:
            taker.stdin.close()
            taker.stdout.close()
            taker.wait(30)
    assert [taker.returncode for taker in takers] == [0] * 8
    granted = [int(result[0]) for result in results]
    assert sum(granted) == 1000, granted
    # The file agrees: the window is full.
    quota = make(limit=1000)
    assert quota.wait(BASE + 1) > WINDOW - 2
    assert quota.used == 1000


HOLDER = """
    import fcntl, os, sys

    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()
    fcntl.flock(fd, fcntl.LOCK_UN)
"""


def hold_lock(path: str) -> subprocess.Popen[str]:
    """A process that holds the quota's lock until told to let go."""
    holder = python(HOLDER, path)
    assert holder.stdout.readline() == "locked\n"
    return holder


def timed_take(quota: HostQuota, now: float) -> tuple[float, float]:
    started = time.monotonic()
    answer = quota.take(now)
    return answer, time.monotonic() - started


@pytest.mark.slow
def test_a_killed_holder_never_wedges_the_others(make) -> None:
    quota = make(limit=5)
    assert quota.take(BASE) == 0
    holder = hold_lock(quota.path)
    try:
        answer, took = timed_take(quota, BASE)
        assert answer == HostQuota.BUSY_WAIT
        assert took < CALL_BOUND
        holder.kill()  # SIGKILL
        assert holder.wait(30) == -signal.SIGKILL
    finally:
        holder.kill()
        holder.stdin.close()
        holder.stdout.close()
    assert quota.take(BASE) == 0  # the kernel let go of the lock
    assert quota.shared
    assert quota.used == 2


@pytest.mark.slow
def test_a_stopped_holder_bounds_each_call_then_pacing_goes_local(make, caplog) -> None:
    caplog.set_level(logging.INFO, logger="produl_server")
    quota = make(limit=3)
    other = make(limit=3)
    assert quota.take(BASE) == 0
    holder = hold_lock(quota.path)
    try:
        os.kill(holder.pid, signal.SIGSTOP)
        started = time.monotonic()
        answers, slowest = [], 0.0
        while quota.shared and time.monotonic() - started < 30:
            answer, took = timed_take(quota, BASE)
            answers.append(answer)
            slowest = max(slowest, took)
        stuck_for = time.monotonic() - started
        assert not quota.shared
        assert slowest < CALL_BOUND
        assert stuck_for >= HostQuota.STUCK_AFTER
        # Patience first, then the process paces alone at the full limit.
        assert set(answers[:-1]) == {HostQuota.BUSY_WAIT}
        assert answers[-1] == 0
        assert [quota.take(BASE), quota.take(BASE)] == [0, 0]
        answer, took = timed_take(quota, BASE)
        assert answer == pytest.approx(WINDOW)  # 3 taken locally
        assert took < CALL_BOUND
        assert len(warnings_of(caplog)) == 1
        assert "locked for" in warnings_of(caplog)[0].getMessage()
        # Another object that has not been stuck for long only asks for patience.
        assert timed_take(other, BASE)[0] == HostQuota.BUSY_WAIT
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.stdin.close()  # readline() returns: it lets go and exits
        holder.wait(30)
        holder.stdout.close()
    assert quota.take(BASE + 1) == 0  # shared again: the file counts 2
    assert quota.shared
    assert quota.used == 2
    assert "free again" in caplog.text
    assert len(warnings_of(caplog)) == 1


@pytest.mark.slow
def test_stats_say_memory_while_a_stopped_holder_makes_the_client_pace_alone(
    produl_collector, make_client, tmp_path
) -> None:
    # Issue #18, item 14: stats.quota said "host" while the process paced alone.
    folder = tmp_path / "quota"
    folder.mkdir(mode=0o700)
    produl = make_client(max_requests_per_minute=600, quota_dir=str(folder))
    produl.track_event("first", visitor_id="v")
    assert produl.flush(timeout=20)
    assert produl.stats.quota == "host"
    (path,) = folder.glob("quota-*.bin")
    holder = hold_lock(str(path))
    try:
        os.kill(holder.pid, signal.SIGSTOP)
        produl.track_event("alone", visitor_id="v")
        assert produl.flush(timeout=30)  # after STUCK_AFTER it paces alone
        assert produl.stats.quota == "memory"
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.stdin.close()  # readline() returns: it lets go and exits
        holder.wait(30)
        holder.stdout.close()
    produl.track_event("shared again", visitor_id="v")
    assert produl.flush(timeout=20)
    assert produl.stats.quota == "host"
    assert [e["n"] for e in produl_collector.events] == ["first", "alone", "shared again"]


FORKER = """
    import fcntl, os, sys
    from produl_server._hostquota import HostQuota

    quota = HostQuota(5, "https://api.produl.test", directory=sys.argv[1])
    assert quota.take(1000.0) == 0
    fcntl.flock(quota._fd, fcntl.LOCK_EX)  # the parent holds the lock
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            quota.after_fork_in_child()
            # Its own open file: the parent's lock keeps it out ...
            busy = quota.take(1000.0) == quota.BUSY_WAIT and quota.shared
            code = 0 if busy else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    fcntl.flock(quota._fd, fcntl.LOCK_UN)
    print(os.waitstatus_to_exitcode(status), flush=True)
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            quota.after_fork_in_child()
            code = 0 if quota.take(1000.0) == 0 else 1  # ... and once free, it takes
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), quota.take(1000.0), quota.used, flush=True)
"""


@pytest.mark.slow
def test_a_forked_child_gets_a_lock_of_its_own(folder: pathlib.Path) -> None:
    forker = python(FORKER, str(folder))
    out, _ = forker.communicate(timeout=60)
    assert forker.returncode == 0, out
    assert out.split() == ["0", "0", "0.0", "3"]


def test_the_host_wide_quota_takes_the_now_it_is_given():
    # The sender's monotonic now, placed on the wall clock the host's
    # processes share: a fake clock moves the shared window as it moves.
    from produl_server._hostquota import HostWideQuota

    seen = []

    class Window:
        def take(self, now):
            seen.append(now)
            return 0.0

    quota = HostWideQuota(Window(), wall=lambda: 5000.0, mono=lambda: 100.0)
    quota.take(100.0)
    quota.take(103.5)
    assert seen == [5000.0, 5003.5]
