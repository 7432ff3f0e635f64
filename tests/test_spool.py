"""The spool: real SQLite files, real threads, real processes, real SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import produl_server
from produl_server._spool import FILENAME, Spool, SpooledEvent, SpoolError

URL = "https://collector.example/api"
OTHER_URL = "https://other.example/api"

# os.fork() in a process with threads warns on 3.12+; forking is the point here.
fork_warning = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

# A spool user in a process of its own. It prints "ready", waits for a line
# on stdin, then either drains the spool ("drain": claim, ack, repeat) or
# claims 50 events and blocks until it is killed ("hold").
HELPER = textwrap.dedent(
    """
    import json, sys
    from produl_server._spool import Spool
    directory, key, mode = sys.argv[1:4]
    spool = Spool(directory, key, busy_timeout=30.0)
    print("ready", flush=True)
    sys.stdin.readline()
    if mode == "drain":
        acked = []
        while True:
            batch = spool.claim(25, lease=300.0)
            if not batch:  # the rest is claimed by others, who will ack it
                break
            ids = [event.id for event in batch]
            if spool.ack(ids) != len(ids):  # someone else deleted "my" events
                sys.exit(3)
            acked.extend(ids)
        print(json.dumps(acked), flush=True)
    else:
        batch = spool.claim(50, lease=300.0)
        print(json.dumps([event.id for event in batch]), flush=True)
        sys.stdin.read()  # until SIGKILL
    """
)


def start_helper(directory: pathlib.Path, mode: str) -> subprocess.Popen[str]:
    # The helper imports the same produl_server as the tests (wheel or checkout).
    package_root = str(pathlib.Path(produl_server.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=package_root)
    process = subprocess.Popen(
        [sys.executable, "-c", HELPER, str(directory), URL, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until the helper opened the spool
    assert line == "ready\n", process.stderr.read() if process.stderr else line
    return process


def go(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.write("go\n")
    process.stdin.flush()


def events(n: int, start: int = 0) -> list[tuple[bytes, str | None]]:
    return [(json.dumps({"i": i}).encode(), f"v{i}" if i % 2 else None) for i in range(start, n)]


@pytest.fixture(name="spool")
def _spool(tmp_path):
    spool = Spool(tmp_path / "spool", URL)
    yield spool
    spool.close()


# -- the basics --------------------------------------------------------------


def test_add_claim_ack_keeps_order_bodies_and_visitors(spool):
    assert spool.add(events(3)) == 3
    assert spool.add(events(5, start=3)) == 2
    assert spool.count() == 5
    claimed = spool.claim(10, lease=60.0)
    assert [json.loads(e.body)["i"] for e in claimed] == [0, 1, 2, 3, 4]
    assert [e.visitor for e in claimed] == [None, "v1", None, "v3", None]
    assert all(isinstance(e, SpooledEvent) and isinstance(e.body, bytes) for e in claimed)
    assert spool.pending_count() == 0
    assert spool.count() == 5  # claimed is not removed
    assert spool.ack([e.id for e in claimed[:2]]) == 2
    assert spool.count() == 3
    assert spool.ack([claimed[0].id]) == 0  # already gone


def test_released_events_come_back_oldest_first(spool):
    spool.add(events(4))
    first = spool.claim(3, lease=60.0)
    assert spool.release([first[1].id]) == 1
    assert spool.pending_count() == 2
    again = spool.claim(10, lease=60.0)
    assert [e.id for e in again] == [first[1].id, first[2].id + 1]


def test_add_of_nothing_and_an_empty_claim(spool):
    assert spool.add([]) == 0
    assert spool.claim(10, lease=1.0) == []
    assert spool.ack([]) == 0
    assert spool.release([]) == 0


def test_events_survive_closing_and_reopening(tmp_path):
    first = Spool(tmp_path, URL)
    first.add(events(3))
    first.close()
    first.close()  # idempotent
    with pytest.raises(SpoolError, match="closed"):
        first.count()
    second = Spool(tmp_path, URL)
    try:
        assert [e.body for e in second.claim(10, lease=1.0)] == [b for b, _ in events(3)]
    finally:
        second.close()


def test_the_key_keeps_api_urls_apart(tmp_path):
    mine, theirs = Spool(tmp_path, URL), Spool(tmp_path, OTHER_URL)
    try:
        mine.add(events(3))
        theirs.add(events(102, start=100))
        assert (mine.count(), theirs.count()) == (3, 2)
        got = theirs.claim(10, lease=60.0)
        assert [json.loads(e.body)["i"] for e in got] == [100, 101]
        assert mine.ack([e.id for e in got]) == 0  # not its key's events
        assert theirs.count() == 2
        assert len(mine.claim(10, lease=60.0)) == 3
    finally:
        mine.close()
        theirs.close()


def test_bad_arguments_are_refused(spool, tmp_path):
    with pytest.raises(ValueError, match="limit"):
        spool.claim(0, lease=1.0)
    with pytest.raises(ValueError, match="lease"):
        spool.claim(1, lease=0.0)
    with pytest.raises(ValueError, match="lease"):
        spool.extend([1], lease=-1.0)
    with pytest.raises(ValueError, match="positive"):
        Spool(tmp_path, URL, max_events=-1)


def test_directory_and_file_are_private(tmp_path):
    directory = tmp_path / "a" / "spool"
    Spool(directory, URL).close()
    assert directory.stat().st_mode & 0o077 == 0
    assert (directory / FILENAME).stat().st_mode & 0o077 == 0


def test_adding_3000_events_in_one_call(spool):
    assert spool.add(events(3000)) == 3000
    assert spool.count() == 3000


# -- claims and leases -------------------------------------------------------


def test_claims_are_exclusive_between_two_spools_on_one_directory(tmp_path):
    a, b = Spool(tmp_path, URL), Spool(tmp_path, URL)
    try:
        a.add(events(10))
        held_by_a = [e.id for e in a.claim(4, lease=60.0)]
        held_by_b = [e.id for e in b.claim(10, lease=60.0)]
        assert set(held_by_a).isdisjoint(held_by_b)
        assert sorted(held_by_a + held_by_b) == list(range(1, 11))
        assert a.claim(10, lease=60.0) == []
        assert b.release(held_by_a) == 0  # b cannot give back what a holds
        assert b.extend(held_by_a, lease=60.0) == 0
        assert a.release(held_by_a) == 4
        assert [e.id for e in b.claim(10, lease=60.0)] == held_by_a
    finally:
        a.close()
        b.close()


def test_an_expired_lease_can_be_claimed_again(tmp_path):
    a, b = Spool(tmp_path, URL), Spool(tmp_path, URL)
    try:
        a.add(events(3))
        now = 1_000_000.0
        held = [e.id for e in a.claim(3, lease=10.0, now=now)]
        assert b.claim(3, lease=10.0, now=now + 9.9) == []
        assert a.extend(held, lease=10.0, now=now + 9.0) == 3  # now until +19
        assert b.claim(3, lease=10.0, now=now + 18.9) == []
        assert b.pending_count(now=now + 19.0) == 3
        assert [e.id for e in b.claim(3, lease=10.0, now=now + 19.0)] == held
        # a lost them: it can no longer release or extend them...
        assert a.release(held) == 0
        assert a.extend(held, lease=10.0, now=now + 19.0) == 0
        # ...but its late ack still counts: they were delivered.
        assert a.ack(held) == 3
        assert b.count() == 0
    finally:
        a.close()
        b.close()


def test_threads_sharing_one_spool_claim_each_event_once(spool):
    spool.add(events(1000))
    acked: list[list[int]] = [[] for _ in range(8)]

    def drain(mine: list[int]) -> None:
        while batch := spool.claim(7, lease=300.0):
            ids = [e.id for e in batch]
            assert spool.ack(ids) == len(ids)
            mine.extend(ids)

    threads = [threading.Thread(target=drain, args=(mine,)) for mine in acked]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    every = [i for mine in acked for i in mine]
    assert sorted(every) == list(range(1, 1001))
    assert spool.count() == 0


# -- bounds ------------------------------------------------------------------


def test_max_events_stores_what_fits(tmp_path):
    spool = Spool(tmp_path, URL, max_events=10)
    other = Spool(tmp_path, OTHER_URL, max_events=10)
    try:
        assert spool.add(events(7)) == 7
        assert other.add(events(5)) == 3  # the cap is for the whole file
        assert spool.add(events(1)) == 0
        spool.ack([e.id for e in spool.claim(2, lease=60.0)])
        assert other.add(events(5)) == 2
        assert (spool.count(), other.count()) == (5, 5)
    finally:
        spool.close()
        other.close()


def test_a_full_file_raises_spool_error_saying_full(tmp_path):
    # max_bytes sets SQLite's max_page_count: the same SQLITE_FULL as a full disk.
    spool = Spool(tmp_path, URL, max_bytes=64 * 1024)
    try:
        with pytest.raises(SpoolError) as caught:
            spool.add((b"x" * 1024, "v") for _ in range(200))
        message = str(caught.value)
        assert message.startswith(f"the spool at {tmp_path} is full: ")
        assert "\n" not in message
        assert "xxxx" not in message
        assert spool.count() == 0  # all or nothing
        assert spool.add(events(3)) == 3  # the spool still works
    finally:
        spool.close()


# -- failures at construction -------------------------------------------------


def test_a_file_in_place_of_the_directory(tmp_path):
    in_the_way = tmp_path / "spool"
    in_the_way.write_text("not a directory")
    with pytest.raises(SpoolError) as caught:
        Spool(in_the_way, URL)
    assert str(caught.value) == f"cannot use {in_the_way} as the spool directory: Not a directory"


def test_a_file_in_place_of_the_parent_directory(tmp_path):
    in_the_way = tmp_path / "parent"
    in_the_way.write_text("not a directory")
    with pytest.raises(SpoolError) as caught:
        Spool(in_the_way / "spool", URL)
    assert str(caught.value) == (
        f"cannot create the spool directory {in_the_way / 'spool'}: Not a directory"
    )


def test_a_directory_in_place_of_the_database_file(tmp_path):
    (tmp_path / FILENAME).mkdir()
    with pytest.raises(SpoolError) as caught:
        Spool(tmp_path, URL)
    assert str(caught.value) == f"cannot open the spool at {tmp_path}: Is a directory"


@pytest.mark.parametrize("garbage", [b"garbage", b"\x00\xffnot sqlite" * 1000])
def test_a_corrupted_database_file_is_moved_aside_and_a_new_spool_starts(tmp_path, garbage, caplog):
    (tmp_path / FILENAME).write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="produl_server"):
        spool = Spool(tmp_path, URL, "owner")
    spool.add([(b"{}", None)])
    assert spool.count() == 1
    spool.close()
    moved = [p for p in tmp_path.iterdir() if ".damaged-" in p.name]
    assert [p.read_bytes() for p in moved] == [garbage]  # kept for a person to look at
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1
    assert str(moved[0]) in warnings[0]


def test_a_spool_truncated_to_half_does_not_stop_the_app(tmp_path, caplog):
    spool = Spool(tmp_path, URL, "owner")
    spool.add([(b'{"t":"ev","n":"e","pr":{"pad":"' + b"x" * 400 + b'"}}', "v")] * 2000)
    spool.close()
    for suffix in ("-wal", "-shm"):
        (tmp_path / (FILENAME + suffix)).unlink(missing_ok=True)
    path = tmp_path / FILENAME
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.truncate(size // 2)
    with caplog.at_level(logging.WARNING, logger="produl_server"):
        fresh = Spool(tmp_path, URL, "owner")
        assert fresh.count() == 0
    fresh.close()
    assert any("damaged" in r.getMessage() for r in caplog.records)
    assert [p for p in tmp_path.iterdir() if ".damaged-" in p.name]


def test_some_other_sqlite_database(tmp_path):
    db = sqlite3.connect(tmp_path / FILENAME)
    db.execute("CREATE TABLE mine (x)")
    db.commit()
    db.close()
    with pytest.raises(SpoolError, match="is not a produl spool") as caught:
        Spool(tmp_path, URL)
    assert "\n" not in str(caught.value)


# -- processes -----------------------------------------------------------------


@pytest.mark.slow
def test_four_processes_drain_2000_events_each_acked_exactly_once(tmp_path):
    spool = Spool(tmp_path, URL)
    try:
        assert spool.add(events(2000)) == 2000
        helpers = [start_helper(tmp_path, "drain") for _ in range(4)]
        for helper in helpers:  # all opened their spool: start them together
            go(helper)
        acked: list[int] = []
        for helper in helpers:
            out, err = helper.communicate(timeout=90)
            assert helper.returncode == 0, err
            acked.extend(json.loads(out))
        assert len(acked) == 2000
        assert sorted(acked) == list(range(1, 2001))
        assert spool.count() == 0
    finally:
        spool.close()


@pytest.mark.slow
def test_a_sigkilled_claimer_loses_nothing(tmp_path):
    spool = Spool(tmp_path, URL)
    helper = start_helper(tmp_path, "hold")
    try:
        spool.add(events(120))
        go(helper)
        assert helper.stdout is not None
        held = json.loads(helper.stdout.readline())
        assert len(held) == 50
        # While its lease runs, the other 70 are all anyone else can claim.
        others = spool.claim(1000, lease=60.0)
        assert {e.id for e in others}.isdisjoint(held)
        assert len(others) == 70
        spool.ack([e.id for e in others])
        helper.send_signal(signal.SIGKILL)
        helper.wait(timeout=30)
        assert helper.returncode == -signal.SIGKILL
        assert spool.count() == 50
        assert spool.pending_count() == 0  # its 300 s lease still runs
        after_the_lease = time.time() + 301.0
        again = spool.claim(1000, lease=60.0, now=after_the_lease)
        assert [e.id for e in again] == held
        assert spool.ack(held) == 50
        assert spool.count() == 0
    finally:
        if helper.poll() is None:
            helper.kill()
        helper.communicate(timeout=30)
        spool.close()


@fork_warning
@pytest.mark.slow
@pytest.mark.parametrize("explicit", [True, False])
def test_a_forked_child_uses_a_connection_of_its_own(tmp_path, explicit):
    spool = Spool(tmp_path, URL)
    try:
        spool.add(events(10))
        held = [e.id for e in spool.claim(5, lease=300.0)]
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                if explicit:
                    spool.after_fork_in_child()
                ok = spool.add(events(1)) == 1
                ok = ok and spool.release(held) == 0  # the parent's claims stay its own
                got = [e.id for e in spool.claim(100, lease=300.0)]
                ok = ok and len(got) == 6 and set(got).isdisjoint(held)
                ok = ok and spool.ack(got) == 6
                code = 0 if ok else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's connection and claims are intact.
        assert spool.count() == 5
        assert spool.release(held) == 5
        assert [e.id for e in spool.claim(100, lease=1.0)] == held
    finally:
        spool.close()
