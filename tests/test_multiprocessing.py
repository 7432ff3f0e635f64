"""multiprocessing children deliver what they tracked, under every start method.

Each test runs a real script in a real interpreter: its children are real
processes that end the way multiprocessing ends them (``os._exit`` after its
own finalizers, so no ``atexit`` handler of theirs runs).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import concurrent.futures
    import multiprocessing
    import os
    import sys

    from produl_server import Produl

    # Made at import: inherited by fork children, made anew in spawn and
    # forkserver children when they import this module.
    produl = Produl(flush_interval=600)


    def work(worker):
        for i in range(50):
            produl.track_event("child", {"w": worker, "i": i}, visitor_id=f"w{worker}")
        return os.getpid()


    if __name__ == "__main__":
        method, shape = sys.argv[1], sys.argv[2]
        context = multiprocessing.get_context(method)
        if shape == "process":
            children = [context.Process(target=work, args=(n,)) for n in range(4)]
            for child in children:
                child.start()
            for child in children:
                child.join()
            assert all(child.exitcode == 0 for child in children)
        elif shape == "pool":
            pool = context.Pool(4)
            pool.map(work, range(4), chunksize=1)
            pool.close()
            pool.join()
        elif shape == "executor":
            with concurrent.futures.ProcessPoolExecutor(4, mp_context=context) as executor:
                list(executor.map(work, range(4)))
        print("parent done")
    """
)


def run(tmp_path, collector, method, shape):
    script = tmp_path / "mp_script.py"
    script.write_text(SCRIPT)
    env = {
        "PRODUL_SERVER_KEY": collector.server_key,
        "PRODUL_API_URL": collector.url,
        "PYTHONPATH": ":".join(sys.path),
        "PATH": "/usr/bin:/bin",
        # The test's own default spool (conftest), never the real home.
        "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"],
    }
    return subprocess.run(
        [sys.executable, str(script), method, shape],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
@pytest.mark.parametrize("shape", ["process", "pool", "executor"])
def test_children_deliver_everything_exactly_once(tmp_path, produl_collector, method, shape):
    result = run(tmp_path, produl_collector, method, shape)
    assert result.returncode == 0, result.stderr
    assert "parent done" in result.stdout
    events = produl_collector.wait_for(200, timeout=60)
    seen = collections.Counter((e["pr"]["w"], e["pr"]["i"]) for e in events)
    assert len(events) == 200, result.stderr
    assert set(seen) == {(w, i) for w in range(4) for i in range(50)}
    assert max(seen.values()) == 1


POOL_BLOCK = textwrap.dedent(
    """
    import multiprocessing
    import sys

    from produl_server import Produl

    produl = Produl()


    def f(i):
        produl.track_event("pooled", {"i": i}, visitor_id=f"v{i % 20}")


    if __name__ == "__main__":
        multiprocessing.set_start_method(sys.argv[1])
        with multiprocessing.Pool(4) as pool:
            pool.map(f, range(400))
        print("parent done")
    """
)


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_a_with_pool_block_delivers_what_its_terminated_workers_tracked(
    tmp_path, produl_collector, method
):
    # The newcomer's snippet (issue #23): Pool.__exit__ sends SIGTERM to the
    # workers while their events are still queued (the 5 s timer has not
    # fired). 0 to 352 of 400 used to arrive, silently; and about one run in
    # 50 hung, a worker never acting on its SIGTERM (see test_sigterm.py).
    script = tmp_path / "pool_block.py"
    script.write_text(POOL_BLOCK)
    env = {
        "PRODUL_SERVER_KEY": produl_collector.server_key,
        "PRODUL_API_URL": produl_collector.url,
        "PYTHONPATH": ":".join(sys.path),
        "PATH": "/usr/bin:/bin",
        "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"],
    }
    result = subprocess.run(
        [sys.executable, str(script), method],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "parent done" in result.stdout
    events = produl_collector.wait_for(400, timeout=60)
    seen = collections.Counter(e["pr"]["i"] for e in events)
    assert set(seen) == set(range(400)), result.stderr
    assert max(seen.values()) == 1
