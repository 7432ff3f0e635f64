"""A throwaway ``redis-server`` on a free loopback port, for the Redis measures.

P1's ``redis_url`` line, P9 and ``python -m bench.soak_fleet`` need a real
Redis, the same binary the Celery integration tests start. It runs with no
persistence (``--save "" --appendonly no``) unless asked for an append-only
file, in a temp directory of its own, bound to 127.0.0.1. The parent talks
to it with inline commands over a socket, so the runner itself never needs
the ``redis`` package; only the clients measured do.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from bench import _proc

_START_SECONDS = 20.0
INSTALL_HINT = "apt-get install redis-server; pip install redis"


def binary() -> str | None:
    """The ``redis-server`` executable, or ``None``."""
    found = shutil.which("redis-server")
    if found:
        return found
    return "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None


def missing() -> str | None:
    """Why the Redis measures cannot run here, or ``None`` when they can."""
    reasons = []
    if binary() is None:
        reasons.append("redis-server not found")
    try:
        if importlib.util.find_spec("redis") is None:
            reasons.append("the redis package is not installed")
    except ModuleNotFoundError:  # pragma: no cover - a broken parent package
        reasons.append("the redis package is not installed")
    return "; ".join(reasons) or None


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """Start, restart and stop one ``redis-server``.

    Args:
        port: The port to listen on; 0 picks a free one (kept across restarts).
        persistent: Keep an append-only file (fsync every second), so that a
            restart by SIGTERM keeps the data; otherwise a restart empties it.
    """

    def __init__(self, *, port: int = 0, persistent: bool = False) -> None:
        executable = binary()
        if executable is None:
            raise RuntimeError(f"redis-server not found ({INSTALL_HINT})")
        self._binary = executable
        self.port = port or free_port()
        self.persistent = persistent
        self._scratch = tempfile.TemporaryDirectory(prefix="bench-redis-")
        self.directory = Path(self._scratch.name)
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> RedisServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the server and wait until it answers ``PING``."""
        if self.running:
            return
        argv = [
            self._binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_proc.child_env(sdk=False),
            cwd=self.directory,
        )
        self.starts += 1
        deadline = time.monotonic() + _START_SECONDS
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self._proc.returncode}): {self.log()}")
            if self.command("PING") == "+PONG":
                # An append-only file is loaded before PING answers PONG.
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer in {_START_SECONDS:g} s")
            time.sleep(0.05)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (a clean shutdown that flushes the append-only file), then kill."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
            _proc.stop(proc, grace=grace)

    def kill(self) -> None:
        """SIGKILL: the server dies without flushing anything."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10.0)

    def restart(self, down: float = 0.0) -> None:
        """Stop, stay down *down* seconds, start again on the same port."""
        self.stop()
        time.sleep(down)
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory; idempotent."""
        self.stop()
        self._scratch.cleanup()

    def log(self) -> str:
        """The tail of the server's log."""
        try:
            return (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def command(self, *words: str) -> str:
        """Send one inline command; return the first reply line (``""`` if refused)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall((" ".join(words) + "\r\n").encode())
                with sock.makefile("rb") as reply:
                    return reply.readline().decode().strip()
        except OSError:
            return ""

    def keys(self) -> list[str]:
        """Every key in database 0 (``KEYS *``: fine for a bench's few keys)."""
        return [str(k) for k in self.call("KEYS", "*") or []]

    def call(self, *words: str) -> Any:
        """Send one command and parse the whole RESP reply (lists, integers, strings)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            payload = f"*{len(words)}\r\n" + "".join(
                f"${len(w.encode())}\r\n{w}\r\n" for w in words
            )
            sock.sendall(payload.encode())
            with sock.makefile("rb") as reply:
                return _parse(reply)


def _parse(reply: Any) -> Any:
    line = reply.readline().decode().rstrip("\r\n")
    kind, rest = line[:1], line[1:]
    if kind == "+":
        return rest
    if kind == "-":
        raise RuntimeError(f"redis: {rest}")
    if kind == ":":
        return int(rest)
    if kind == "$":
        size = int(rest)
        if size < 0:
            return None
        data = reply.read(size + 2)[:-2]
        return data.decode(errors="replace")
    if kind == "*":
        count = int(rest)
        return None if count < 0 else [_parse(reply) for _ in range(count)]
    raise RuntimeError(f"redis: unexpected reply {line!r}")
