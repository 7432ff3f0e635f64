"""SIGTERM ends a multiprocessing child after it delivered, even when its main thread cannot act.

``Pool.terminate()`` sends SIGTERM to workers whose main thread waits in
``sem_wait()`` on a lock that ``terminate()`` holds for good. A signal that
lands on another thread, or just before that wait, never interrupts it:
Python's handler never runs, and ``terminate()`` waits for the worker
forever. About one run in 50 of the pool test hung so in CI. Each script
here is a real interpreter whose child is a real ``multiprocessing`` child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX signals"),
]

SCRIPT = textwrap.dedent(
    """
    import multiprocessing
    import os
    import signal
    import sys
    import threading
    import time

    from produl_server import Produl

    produl = Produl(flush_interval=600)


    def main_thread_is_waiting():
        # "S" in /proc several times in a row: the main thread sleeps in its wait.
        main = threading.main_thread().native_id
        deadline = time.monotonic() + 30
        seen = 0
        while seen < 5 and time.monotonic() < deadline:
            with open(f"/proc/self/task/{main}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
            seen = seen + 1 if state == "S" else 0
            time.sleep(0.01)


    def on_an_application_thread():
        main_thread_is_waiting()
        # Handled on this thread of the application's (it blocks nothing):
        # the main thread, asleep in sem_wait(), is never told.
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)


    def child(lock, mode):
        if mode == "app-wakeup-fd":
            # The application owns the wakeup pipe (as asyncio does for its
            # signal handlers): the main thread's handler must do the work.
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)
            signal.set_wakeup_fd(write_end)
        for i in range(20):
            produl.track_event("terminated", {"i": i}, visitor_id=f"v{i}")
        if mode == "app-wakeup-fd":
            os.kill(os.getpid(), signal.SIGTERM)
        elif mode == "ends-meanwhile":
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            # The child ends on its own while the listener delivers (the
            # collector answers slowly): its exit flush must wait for it.
            deadline = time.monotonic() + 30
            while not produl.stats.sent and time.monotonic() < deadline:
                time.sleep(0.01)
            print("ended with", produl.stats.sent, "sent", flush=True)
            return
        else:
            threading.Thread(target=on_an_application_thread, daemon=True).start()
        lock.acquire()  # held by the parent for good, as terminate() holds its queue's lock
        print("the child went on", flush=True)


    if __name__ == "__main__":
        method, mode = sys.argv[1], sys.argv[2]
        context = multiprocessing.get_context(method)
        lock = context.Lock()
        lock.acquire()
        process = context.Process(target=child, args=(lock, mode))
        process.start()
        process.join(60)
        print("exitcode", process.exitcode, flush=True)
        if process.exitcode is None:
            process.kill()
    """
)


def run(tmp_path, collector, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "sigterm_script.py"
    script.write_text(SCRIPT)
    env = {
        "PRODUL_SERVER_KEY": collector.server_key,
        "PRODUL_API_URL": collector.url,
        "PYTHONPATH": ":".join(sys.path),
        "PATH": "/usr/bin:/bin",
        "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"],
    }
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread states from /proc")
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_a_sigterm_the_main_thread_never_sees_still_delivers_and_ends_the_child(
    tmp_path, produl_collector, method
):
    result = run(tmp_path, produl_collector, method, "other-thread")
    # Before: "exitcode None" after 60 s, and nothing delivered.
    assert f"exitcode {-signal.SIGTERM}" in result.stdout, result.stdout + result.stderr
    assert "the child went on" not in result.stdout
    events = produl_collector.wait_for(20, timeout=30)
    assert sorted(e["pr"]["i"] for e in events) == list(range(20))


def test_with_the_applications_wakeup_pipe_the_main_thread_delivers(tmp_path, produl_collector):
    result = run(tmp_path, produl_collector, "fork", "app-wakeup-fd")
    assert f"exitcode {-signal.SIGTERM}" in result.stdout, result.stdout + result.stderr
    events = produl_collector.wait_for(20, timeout=30)
    assert sorted(e["pr"]["i"] for e in events) == list(range(20))


def test_a_child_that_ends_while_the_listener_delivers_waits_for_it(tmp_path, produl_collector):
    produl_collector.latency = 0.2  # 20 events take about a second
    result = run(tmp_path, produl_collector, "fork", "ends-meanwhile")
    # Without the wait: the child's exit flush found no client left (the
    # listener had taken them), the child ended with exit code 0 while the
    # listener was still sending, and the rest was lost without a word.
    assert f"exitcode {-signal.SIGTERM}" in result.stdout, result.stdout + result.stderr
    events = produl_collector.wait_for(20, timeout=30)
    assert sorted(e["pr"]["i"] for e in events) == list(range(20))
