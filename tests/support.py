"""Helpers both tiers share: free ports, deadlines, host tools and a throwaway Redis.

``tests/`` is on ``sys.path`` once its ``conftest.py`` is imported, so the
fast tier imports this as ``support`` and ``integration_support`` re-exports
what the slow tier used to find there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

#: Seconds a redis-server may take to answer PING after it was started.
REDIS_START_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> object:
    """Poll *condition* until it is truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def require_tool(found: bool, what: str) -> None:
    """Skip when a host tool is missing, but only outside CI, where it must exist."""
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is required in CI")
        pytest.skip(f"{what} is not installed")


def redis_command(port: int, *words: str) -> str:
    """Send one inline command to redis; return the first reply line ('' if refused)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall((" ".join(words) + "\r\n").encode())
            with sock.makefile("rb") as reply:
                return reply.readline().decode().strip()
    except OSError:
        return ""


class RedisServer:
    """A ``redis-server`` on a loopback port, without persistence, killed at the end.

    :meth:`stop` and :meth:`start` take it down and bring it back on the same
    port, as an outage would; its output goes to *log* and is shown when it
    fails to start.
    """

    def __init__(self, log: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        require_tool(binary is not None, "redis-server (apt-get install redis-server)")
        assert binary is not None
        self.binary = binary
        self.log_path = log
        self.port = port if port is not None else free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} {'up' if self.running else 'down'}>"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        """Start it (again, on the same port) and wait until it answers PING."""
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self._proc

        def pong() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"redis-server exited ({proc.returncode}):\n{self.output()[-3000:]}"
                )
            return redis_command(self.port, "PING") == "+PONG"

        wait_until(pong, REDIS_START_TIMEOUT, f"redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        """Kill it (SIGKILL: nothing is saved) and wait until the port is closed; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def command(self, *words: str) -> str:
        """One inline command; the first reply line ('' when it is down)."""
        return redis_command(self.port, *words)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class RawServer:
    """Reads each request on each connection and lets *answer* write the reply.

    ``answer(conn, number)`` gets the request's number on its connection
    (0, 1, ...) and returns True to keep the connection for another request.
    """

    def __init__(self, answer):
        self._answer = answer
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.connections = 0
        self.closed = 0
        self.requests: list[bytes] = []
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _read_request(self, conn, data):
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None, b""
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(rest) < length:
            rest += conn.recv(65536)
        return head + b"\r\n\r\n" + rest[:length], rest[length:]

    def _handle(self, conn):
        try:
            self._exchange(conn)
        finally:
            conn.close()
            self.closed += 1

    def _exchange(self, conn):
        with contextlib.suppress(OSError):
            conn.settimeout(10)
            pending = b""
            number = 0
            while not self.stopping.is_set():
                request, pending = self._read_request(conn, pending)
                if request is None:
                    return
                self.requests.append(request)
                if not self._answer(conn, number):
                    return
                number += 1

    def close(self):
        self.stopping.set()
        self._thread.join(5)
        self._sock.close()
        for thread in self._threads:
            thread.join(5)
