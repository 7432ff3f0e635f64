"""The local collector in a process of its own, driven over stdin/stdout.

A collector in the measured process would share its GIL and its CPU
accounting, so every measure talks to one started here with
``python -m bench._collector``. It is produl_server's own collector
(:class:`~produl_server.collector.CollectorServer`, the engine of
``LocalCollector``) with two bench-only additions:

* it counts answers by status instead of recording every request, so a long
  run does not grow the collector;
* it answers the peers' batch endpoints (segment ``/v1/batch``, posthog
  ``/batch/``) with ``200`` and counts the events in them, so the peers run
  their success path, as they would in production, rather than a 404 path.

Commands, one per line on stdin, each answered by one JSON line on stdout:
``stats``, ``latency SECONDS``, ``hang``, ``release``, ``reset``, ``quit``.

``python -m bench._collector LIMIT [--mode M] [--port N] [--db FILE]``:
``LIMIT`` is keyed requests per minute per IP or ``off``; ``--mode`` the
window's shape (``bucket``, ``fixed``, ``sliding``); ``--port`` a fixed port
(a collector restarted on it keeps its URL); ``--db`` an SQLite file that
keeps the stored events across restarts (default: in memory).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import subprocess
import sys
import threading
from types import TracebackType
from typing import IO, Any
from urllib.parse import urlsplit

import attrs

from bench import _proc

PEER_PATHS = frozenset({"/v1/batch", "/batch", "/batch/"})
SERVER_KEY = "sk_bench_local_0000"
_START_SECONDS = 20.0


def _serve(
    rate_limit: int | None, mode: str = "bucket", port: int = 0, db: str | None = None
) -> int:
    from produl_server.collector import CollectorServer, MemoryStore, SqliteStore
    from produl_server.collector._http import CollectorHandler

    statuses: collections.Counter[int] = collections.Counter()
    peer = {"events": 0, "requests": 0}
    lock = threading.Lock()

    class BenchHandler(CollectorHandler):
        def _record(self, status: int | None) -> None:
            with lock:
                statuses[-1 if status is None else status] += 1
            super()._record(status)

        def do_POST(self) -> None:  # noqa: N802 - http.server names it so
            if urlsplit(self.path).path not in PEER_PATHS:
                super().do_POST()
                return
            length = int(self.headers.get("Content-Length", "0") or 0)
            body = self.rfile.read(length)
            if "gzip" in self.headers.get("Content-Encoding", ""):
                body = gzip.decompress(body)
            try:
                count = len(json.loads(body).get("batch", []))
            except (ValueError, AttributeError):
                count = 0
            if not self.collector.pause_before_answer():
                self._drop()
                return
            with lock:
                peer["events"] += count
                peer["requests"] += 1
            self._reply(200, {"status": 1})

    server = CollectorServer(
        store=MemoryStore() if db is None else SqliteStore(db),
        server_key=SERVER_KEY,
        port=port,
        rate_limit=rate_limit,
        keyless_rate_limit=None,
        rate_limit_mode=mode,
        record_requests=False,
    )
    server.start()
    httpd = server._httpd
    if httpd is None:  # pragma: no cover - start() sets it or raises
        raise RuntimeError("the collector did not start")
    # Nothing has connected yet: the URL is not printed until after this.
    httpd.RequestHandlerClass = BenchHandler

    def reply(data: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()

    reply({"url": server.url, "key": SERVER_KEY, "pid": os.getpid()})
    try:
        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            if command == "stats":
                with lock:
                    answers = {str(k): v for k, v in sorted(statuses.items())}
                    reply(
                        {
                            "events": server.store.count(),
                            "statuses": answers,
                            "peer_events": peer["events"],
                            "peer_requests": peer["requests"],
                            "held": server.held,
                        }
                    )
                continue
            if command == "latency":
                server.faults.latency = float(argument)
            elif command == "hang":
                server.faults.released.clear()
            elif command == "release":
                server.faults.released.set()
            elif command == "reset":
                server.store.clear()
                server.reset_limits()
                with lock:
                    statuses.clear()
                    peer.update(events=0, requests=0)
            elif command == "quit":
                break
            else:
                reply({"error": f"unknown command {command!r}"})
                continue
            reply({"ok": True})
    finally:
        server.stop()
        server.store.close()
    return 0


@attrs.frozen
class CollectorStats:
    """What the collector has seen since it started or was reset."""

    events: int
    statuses: dict[int, int]
    peer_events: int
    peer_requests: int
    held: int

    @property
    def rate_limited(self) -> int:
        """How many requests were answered ``429``."""
        return self.statuses.get(429, 0)


class CollectorProcess:
    """Start, drive and stop a ``bench._collector`` process.

    Args:
        rate_limit: Keyed requests per minute per IP; ``None`` for no limit.
        latency: Seconds added before each answer.
        mode: The rate limit's window shape: ``bucket``, ``fixed`` or ``sliding``.
        port: A fixed port (so that a restart keeps the URL); 0 picks a free one.
        db: An SQLite file for the stored events (kept across restarts);
            ``None`` keeps them in memory.
    """

    def __init__(
        self,
        *,
        rate_limit: int | None = None,
        latency: float = 0.0,
        mode: str = "bucket",
        port: int = 0,
        db: str | None = None,
    ) -> None:
        self._rate_limit = rate_limit
        self._latency = latency
        self._mode = mode
        self._port = port
        self._db = db
        self._proc: subprocess.Popen[str] | None = None
        self._reader: _proc.LineReader | None = None
        self._lock = threading.Lock()
        self.url = ""
        self.key = ""

    def __enter__(self) -> CollectorProcess:
        argv = [
            sys.executable,
            "-m",
            "bench._collector",
            "off" if self._rate_limit is None else str(self._rate_limit),
            "--mode",
            self._mode,
            "--port",
            str(self._port),
        ]
        if self._db is not None:
            argv += ["--db", self._db]
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_proc.child_env(sdk=False),
            cwd=_proc.ROOT,
        )
        if self._proc.stdout is not None:
            self._reader = _proc.LineReader(self._proc.stdout)
        try:
            hello = self._read(_START_SECONDS)
            self.url, self.key = hello["url"], hello["key"]
            if self._latency:
                self.command(f"latency {self._latency}")
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

    @property
    def pid(self) -> int:
        """The collector's process id."""
        if self._proc is None:
            raise RuntimeError("the collector is not running")
        return self._proc.pid

    def _read(self, timeout: float) -> dict[str, Any]:
        if self._proc is None or self._reader is None:
            raise RuntimeError("the collector is not running")
        line = self._reader.readline(timeout)
        if not line:
            raise RuntimeError(f"the collector ended or went silent (exit {self._proc.poll()})")
        data: dict[str, Any] = json.loads(line)
        return data

    def command(self, text: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send one command; return its JSON answer."""
        with self._lock:
            if self._proc is None or self._proc.stdin is None:
                raise RuntimeError("the collector is not running")
            stdin: IO[str] = self._proc.stdin
            stdin.write(text + "\n")
            stdin.flush()
            answer = self._read(timeout)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def stats(self) -> CollectorStats:
        """The collector's counters now."""
        data = self.command("stats")
        return CollectorStats(
            events=data["events"],
            statuses={int(k): v for k, v in data["statuses"].items()},
            peer_events=data["peer_events"],
            peer_requests=data["peer_requests"],
            held=data["held"],
        )

    def close(self) -> None:
        """Stop the collector; kill it if it does not stop promptly. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None and proc.poll() is None:
                proc.stdin.write("quit\n")
                proc.stdin.flush()
                proc.stdin.close()
        except OSError:
            pass
        _proc.stop(proc, grace=8.0)
        if proc.stdout is not None:
            proc.stdout.close()


def _main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._collector")
    parser.add_argument("limit", help="keyed requests per minute per IP, or off")
    parser.add_argument("--mode", default="bucket", choices=("bucket", "fixed", "sliding"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--db")
    args = parser.parse_args()
    limit = None if args.limit == "off" else int(args.limit)
    return _serve(limit, args.mode, args.port, args.db)


if __name__ == "__main__":
    sys.exit(_main())
