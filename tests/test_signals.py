"""The SDK's threads leave the process's signals to the application's threads."""

from __future__ import annotations

import pathlib
import signal
import threading

import pytest

from produl_server._threads import leave_signals_to_others, start_thread

pytestmark = pytest.mark.skipif(
    not pathlib.Path("/proc/self/task").is_dir(), reason="reads thread masks from Linux's /proc"
)


def blocked(thread: threading.Thread) -> set[int]:
    """The signals *thread* blocks, read from the kernel."""
    status = pathlib.Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    mask = int(
        next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16
    )
    return {number for number in range(1, 65) if mask >> (number - 1) & 1}


def test_every_thread_of_a_sending_client_blocks_sigterm(produl_collector, make_client):
    # A SIGTERM the kernel handed to the sender, while a pool worker's main
    # thread waited on a lock, was never acted on: the worker lived on and
    # its events stayed queued (issue #23, with Pool() under forkserver).
    produl = make_client(flush_interval=600, max_in_flight=4)
    produl_collector.latency = 0.01  # a backlog at latency: lanes start
    for i in range(40):
        produl.track_event("e", {"i": i}, visitor_id=f"v{i}")
    assert produl.flush(timeout=30)
    # The collector's threads (the fixture's) block them too.
    ours = [t for t in threading.enumerate() if t.name.startswith("produl-server.")]
    assert {"produl-server.sender", "produl-server.sender-1", "produl-server.deadlines"} <= {
        t.name for t in ours
    }
    for thread in ours:
        assert {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} <= blocked(thread), thread.name
    assert signal.SIGTERM not in blocked(threading.main_thread())


def test_synchronous_signals_are_left_unblocked():
    seen: list[set[int]] = []

    def run() -> None:
        leave_signals_to_others()
        seen.append(blocked(threading.current_thread()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert seen, "the thread did not run"
    assert signal.SIGTERM in seen[0]
    assert not {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL} & seen[0]


def test_a_thread_of_ours_is_born_with_them_blocked():
    # Blocked before its first step: a thread that blocked them only once it
    # ran could take a signal in between.
    seen: list[set[int]] = []
    ran = threading.Event()

    def run() -> None:
        seen.append(blocked(threading.current_thread()))
        ran.set()

    assert start_thread(run, "produl-server.test")
    assert ran.wait(10), "the thread did not run"
    assert {signal.SIGTERM, signal.SIGINT} <= seen[0]
    # The starting thread gets its own mask back.
    assert signal.SIGTERM not in blocked(threading.current_thread())
