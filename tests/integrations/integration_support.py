"""Helpers for the integration tests: real servers in real subprocesses, on 127.0.0.1.

Every process is started in its own session and its whole process group is
killed in a ``finally``, so a failing test leaves nothing running. Output goes
to a file (a full pipe would block the server) and is shown when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import requests

# Shared with the fast tier (tests/support.py); re-exported for the slow tier's modules.
from support import free_port, redis_command, require_tool, wait_until

__all__ = [
    "APPS",
    "Proc",
    "app_env",
    "free_port",
    "redis_command",
    "require_tool",
    "serve_gunicorn",
    "serve_uvicorn",
    "wait_http",
    "wait_until",
]

APPS = Path(__file__).resolve().parent / "apps"


def app_env(collector, **extra: str) -> dict[str, str]:
    """The environment of a served app: ours, the collector's URL and key, the apps dir."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(APPS) + (os.pathsep + path if path else "")
    env["PRODUL_API_URL"] = collector.url
    env["PRODUL_SERVER_KEY"] = collector.server_key
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """A subprocess in its own process group, with its output in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, **popen) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 -- closed in kill()
        self.popen = subprocess.Popen(
            args,
            env=env,
            cwd=str(APPS),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"process did not exit within {timeout} s; output:\n{self.output()[-3000:]}"
            ) from None

    def kill(self) -> None:
        """Kill the whole group (workers too), reap, close the log; idempotent."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        try:
            self.popen.wait(10)
        finally:
            self._log.close()


def wait_http(proc: Proc, url: str, timeout: float = 60.0) -> None:
    """Wait until *url* answers 200, or fail early if the server died."""

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"server exited early:\n{proc.output()[-3000:]}")
        try:
            # A worker that is still importing the app on a loaded machine
            # can take a while to answer its first request: keep polling.
            with requests.get(url, timeout=10) as answer:
                return answer.status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    wait_until(ready, timeout, f"{url} to answer")


def serve_gunicorn(spawn, env: dict[str, str], app: str, *options: str, name: str):
    """Serve *app* with gunicorn on a free loopback port; return (proc, base URL).

    The socket is bound here and handed over (``fd://``), so the port is
    known before gunicorn starts and no other process can take it.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    try:
        proc = spawn(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"fd://{listener.fileno()}",
                "--graceful-timeout",
                "20",
                *options,
                app,
            ],
            env,
            name=name,
            pass_fds=[listener.fileno()],
        )
    finally:
        listener.close()
    base = f"http://127.0.0.1:{port}"
    wait_http(proc, base + "/healthz")
    return proc, base


def serve_uvicorn(spawn, env: dict[str, str], app: str, *options: str, name: str):
    """Serve the ASGI *app* with uvicorn on a free loopback port; return (proc, base URL)."""
    port = free_port()
    proc = spawn(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            *options,
            app,
        ],
        env,
        name=name,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(proc, base + "/healthz")
    return proc, base
