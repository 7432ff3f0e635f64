"""Subprocess plumbing: environment, bounded waits, cleanup, child entry points.

Every measured piece runs in a fresh interpreter started by
:func:`run_child`: ``python -m bench._proc MODULE FUNCTION JSON`` calls
``bench.MODULE.FUNCTION(**JSON)`` and prints its JSON result as the last line.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

#: The repository root: the children import ``bench`` and ``produl_server`` from it.
ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH-RESULT "
#: Children start here, not in the repository: ``python -m`` puts the working
#: directory first on ``sys.path``, which would hide ``--sdk``'s checkout.
#: A private, empty directory (mode 0700), not the shared temp directory,
#: where any module another program left (an ``attrs.py``) would be imported
#: instead of the real one (issue 23). The first process makes it and removes
#: it at exit; its children (which leave by ``os._exit``) inherit it through
#: ``BENCH_NEUTRAL_CWD`` rather than make their own.
NEUTRAL_CWD = os.environ.get("BENCH_NEUTRAL_CWD") or ""
if not NEUTRAL_CWD or not os.path.isdir(NEUTRAL_CWD):
    NEUTRAL_CWD = os.environ["BENCH_NEUTRAL_CWD"] = tempfile.mkdtemp(prefix="produl-bench-cwd-")
    atexit.register(shutil.rmtree, NEUTRAL_CWD, ignore_errors=True)


#: Set by ``python -m bench --sdk PATH``: measure the produl_server found in
#: PATH (another checkout) instead of this tree's. The collector always runs
#: from this tree.
SDK_PATH_VARIABLE = "BENCH_SDK_PATH"
#: Set by the runner to a snapshot of this tree's produl_server, taken when the
#: run starts, so that edits made while a run goes on cannot mix versions.
#: The collector runs from it (or from the tree when unset).
TREE_PATH_VARIABLE = "BENCH_TREE_PATH"


def child_env(extra: dict[str, str] | None = None, *, sdk: bool = True) -> dict[str, str]:
    """The environment for a child: this one, the repo first on the path, no proxies.

    Args:
        extra: Variables to add.
        sdk: Whether the child measures the SDK (and so honours ``--sdk``).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
        and not k.startswith(("PRODUL_", "POSTHOG_", "SEGMENT_"))
    }
    path = env.get("PYTHONPATH")
    first = [str(ROOT)]
    if os.environ.get(TREE_PATH_VARIABLE):
        first.insert(0, os.environ[TREE_PATH_VARIABLE])
    if sdk and os.environ.get(SDK_PATH_VARIABLE):
        first.insert(0, os.environ[SDK_PATH_VARIABLE])
    env["PYTHONPATH"] = os.pathsep.join(first) + (os.pathsep + path if path else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("COVERAGE_PROCESS_START", None)  # coverage tracing would distort every figure
    # No measure may write its leftovers into the user's default spool (an
    # app stopped with 10,000 events queued left 12 MB there per run): off,
    # unless the measure gives the child a state directory of its own (P8).
    if not extra or "XDG_STATE_HOME" not in extra:
        env["PRODUL_SPOOL_DIR"] = "off"
    if extra:
        env.update(extra)
    return env


def stop(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """Wait up to *grace* seconds for *proc*, then terminate, then kill it."""
    for action in (None, proc.terminate, proc.kill):
        if action is not None and proc.poll() is None:
            action()
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait(5.0)


class LineReader:
    """Reads a pipe on a daemon thread so a line can be awaited with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._lines.put(line)
        except (OSError, ValueError):
            pass
        self._lines.put("")  # end of stream

    def readline(self, timeout: float) -> str:
        """The next line, or ``""`` at end of stream or after *timeout* seconds."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return ""


class ChildError(RuntimeError):
    """A child failed or timed out; the message carries its stderr tail."""


def run_child(module: str, function: str, args: dict[str, Any], timeout: float) -> Any:
    """Run ``bench.<module>.<function>(**args)`` in a fresh interpreter.

    Args:
        module: A module of the ``bench`` package.
        function: A function in it that returns JSON-able data.
        args: Its keyword arguments (JSON-able).
        timeout: Seconds before the child is killed.

    Returns:
        What the function returned.

    Raises:
        ChildError: If it failed, printed no result, or ran out of time.
    """
    argv = [sys.executable, "-m", "bench._proc", module, function, json.dumps(args)]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=NEUTRAL_CWD,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise ChildError(
            f"{module}.{function} ran over {timeout:g} s; stderr: {err[-2000:]}"
        ) from None
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise ChildError(
        f"{module}.{function} exited {proc.returncode} without a result; stderr: {err[-2000:]}"
    )


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    # The child runs in its own session: take any helper it started with it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10.0)


def emit(result: Any) -> None:
    """Print a child's result line and leave at once.

    ``os._exit`` skips the SDKs' exit handlers on purpose: their exit cost is
    measured by P3 alone, and a hung collector must not hold a child for its
    shutdown timeout.
    """
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _main() -> None:
    module, function, raw = sys.argv[1:4]
    target = getattr(importlib.import_module(f"bench.{module}"), function)
    emit(target(**json.loads(raw)))


if __name__ == "__main__":
    _main()
