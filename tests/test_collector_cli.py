"""The collector hardening, through the real ``produl-server`` command (issue #9).

Every test here runs ``python -m produl_server`` in a subprocess and talks to
it over HTTP on 127.0.0.1; output is read line by line with deadlines.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.client import HTTPResponse

import pytest
import urllib3

from produl_server._protocol import KEY_HEADER
from produl_server.collector import SqliteStore

pytestmark = pytest.mark.slow

TIMEOUT = 30.0
KEY = "sk_cli_secret_abcdef123456"
ROOT = pathlib.Path(__file__).resolve().parent.parent
ESC = "\x1b"
#: The issue's repro, plus a C1 CSI and a bidi override in other fields.
HOSTILE_REFERRER = "https://x/\x1b]0;pwned\x07\x1b[2J\x1b[31mFAKE"
HOSTILE = {
    "t": "pv",
    "p": "/a\x1b[2Jb",
    "vi": "v\x9b31m",
    "sk": "s\r\nFAKE LINE",
    "ti": "t\u202etxt.exe",
    "r": HOSTILE_REFERRER,
}


def produl_server(*args: str) -> list[str]:
    return [sys.executable, "-m", "produl_server", *args]


class Running:
    """A ``produl-server collector`` subprocess; stdout read on a thread."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self.expect("PRODUL_API_URL=").split("=", 1)[1]
        self.expect("Ctrl-C")
        self.port = int(self.url.rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, text: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} not printed; got {self.seen}")

    def stop(self) -> tuple[int, str, str]:
        """SIGINT; the exit status, all of stdout and all of stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(TIMEOUT)
        while (line := self.lines.get(timeout=TIMEOUT)) is not None:
            self.seen.append(line)
        assert self.proc.stderr is not None
        stderr = self.proc.stderr.read()
        for stream in (self.proc.stdout, self.proc.stderr):
            assert stream is not None
            stream.close()
        return self.proc.returncode, "\n".join(self.seen), stderr


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    pool = urllib3.PoolManager(retries=False, timeout=10.0)
    yield pool
    pool.clear()


def post(http: urllib3.PoolManager, url: str, event: dict, key: str = KEY) -> int:  # type: ignore[type-arg]
    body = json.dumps(event).encode()
    return http.request("POST", url + "/api/collect", body=body, headers={KEY_HEADER: key}).status


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        produl_server(*args), check=False, capture_output=True, text=True, timeout=TIMEOUT
    )


def assert_no_raw_controls(text: str) -> None:
    bad = [c for c in text if c not in "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F)]
    assert bad == [], f"raw control characters printed: {bad!r}"
    assert "\u202e" not in text


# -- item 11: terminal escape injection ---------------------------------------------


def test_console_and_events_print_control_characters_escaped(
    tmp_path: pathlib.Path, http: urllib3.PoolManager
) -> None:
    db = tmp_path / "events.sqlite3"
    collector = Running(
        produl_server("collector", "--port", "0", "--db", str(db), "--server-key", KEY)
    )
    try:
        assert post(http, collector.url, HOSTILE) == 204
        assert (
            post(http, collector.url, {"t": "ev", "n": "n\x1b[2J", "pr": {"x": "\x9b\x07"}}) == 204
        )
        collector.expect("pageview")
        collector.expect("event")
    finally:
        status, stdout, stderr = collector.stop()
    assert status == 0, stderr
    listed = run("events", "--db", str(db))
    assert listed.returncode == 0, listed.stderr

    for output in (stdout, listed.stdout):
        assert_no_raw_controls(output)
        assert r"ref=https://x/\x1b]0;pwned\x07\x1b[2J\x1b[31mFAKE" in output
        assert r"pageview /a\x1b[2Jb" in output
        assert r"visitor=v\x9b31m" in output
        assert r"session=s\x0d\x0aFAKE LINE" in output
        assert r"title=t\u202etxt.exe" in output
        assert r"event n\x1b[2J" in output
        assert r"\x9b" in output.split("event n", 1)[1]
    # What is stored stays exactly what was sent: only printing escapes.
    store = SqliteStore(db, readonly=True)
    try:
        assert store.query()[-1].event == HOSTILE
    finally:
        store.close()


# -- item 9: Host check and a token for the inspection API --------------------------


def raw_status(port: int, data: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        response = HTTPResponse(sock)
        response.begin()
        response.read()
        return response.status


def test_the_command_refuses_foreign_hosts_and_guards_the_events(
    tmp_path: pathlib.Path, http: urllib3.PoolManager
) -> None:
    collector = Running(produl_server("collector", "--port", "0", "--db", str(tmp_path / "e.db")))
    try:
        # The generated key, printed (before "Ctrl-C") for the user to paste.
        printed = next(line for line in collector.seen if "PRODUL_SERVER_KEY=" in line)
        key = printed.split("=", 1)[1]
        assert post(http, collector.url, {"t": "ev", "n": "signup"}, key) == 204
        # The repro: it answered 204 and wiped the events.
        rebinding = (
            f"DELETE /api/events HTTP/1.1\r\nHost: attacker.example:{collector.port}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n"
        ).encode()
        assert raw_status(collector.port, rebinding) == 421
        events_url = collector.url + "/api/events"
        assert http.request("GET", events_url).status == 401
        assert http.request("DELETE", events_url).status == 401
        listed = http.request("GET", events_url, headers={KEY_HEADER: key})
        assert listed.status == 200
        assert json.loads(listed.data)["total"] == 1
    finally:
        status, _, stderr = collector.stop()
    assert status == 0, stderr
    assert "Traceback" not in stderr


# -- item 10: a full file system and a corrupted database ---------------------------

#: A file may grow to 64 KiB: enough to create the database and its WAL
#: (about 33 KiB), not for long. Writing beyond it fails with EFBIG, as a
#: full disk fails with ENOSPC (Python ignores SIGXFSZ, so nothing is killed).
FILE_SIZE_LIMIT = 64 * 1024
_LIMITED = (
    "import os, resource, sys\n"
    f"resource.setrlimit(resource.RLIMIT_FSIZE, ({FILE_SIZE_LIMIT}, {FILE_SIZE_LIMIT}))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'produl_server', *sys.argv[1:]])\n"
)


@pytest.mark.skipif(not hasattr(os, "execv") or sys.platform == "win32", reason="POSIX rlimits")
def test_a_full_file_system_gets_503_and_one_error_line(
    tmp_path: pathlib.Path, http: urllib3.PoolManager
) -> None:
    db = tmp_path / "events.sqlite3"
    collector = Running(
        [
            sys.executable,
            "-c",
            _LIMITED,
            "-v",  # level names on each line, to count the ERROR ones
            "collector",
            "--port",
            "0",
            "--db",
            str(db),
            "--server-key",
            KEY,
        ],
        # Not measured by coverage: under the file-size limit its data file
        # cannot be written either, and it would say so on stderr.
        env={k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")},
    )
    try:
        statuses: list[int] = []
        for n in range(200):  # bounded: a few KiB per event fill 31 KiB fast
            statuses.append(post(http, collector.url, {"t": "ev", "n": "fill", "pr": {"n": n}}))
            if statuses[-1] != 204:
                break
        assert statuses[-1] == 503, statuses
        refused = [
            http.request(
                "POST",
                collector.url + "/api/collect",
                body=json.dumps({"t": "ev", "n": "more"}).encode(),
                headers={KEY_HEADER: KEY},
            )
            for _ in range(5)
        ]
        assert [r.status for r in refused] == [503] * 5
        assert json.loads(refused[0].data)["error"] == "storage_unavailable"
        assert http.request("GET", collector.url + "/healthz").status == 200  # reads still work
    finally:
        status, stdout, stderr = collector.stop()
    assert status == 0, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, stderr  # once, though six POSTs failed
    assert "storage failure" in errors[0]
    assert "disk I/O error" in errors[0]
    assert "Traceback" not in stderr
    assert KEY not in stdout + stderr
    assert statuses.count(204) >= 1


def corrupt_a_data_page(db: pathlib.Path) -> None:
    """Overwrite the events table's root page (page 2) on disk."""
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with db.open("r+b") as f:
        f.seek(page_size)
        f.write(b"\xff" * page_size)


def test_events_on_a_corrupted_database_is_one_line_not_a_traceback(
    tmp_path: pathlib.Path,
) -> None:
    db = tmp_path / "events.sqlite3"
    store = SqliteStore(db)
    for n in range(20):
        store.add({"t": "ev", "n": "x", "pr": {"n": n}}, 1.0)
    store.close()
    corrupt_a_data_page(db)

    for args in (("events", "--db", str(db)), ("events", "--db", str(db), "--json")):
        result = run(*args)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "malformed" in result.stderr
        assert result.stdout == ""


# -- issue 23: the tutorial shows what the command prints ------------------------------


def _normalized(lines: list[str]) -> list[str]:
    rules = [
        (r"127\.0\.0\.1:\d+", "127.0.0.1:PORT"),
        (r"#token=[A-Za-z0-9_-]+", "#token=TOKEN"),
        (r"sk_local_[0-9a-f]+", "sk_local_KEY"),
        (r"events in:  \S+", "events in:  DB"),
    ]
    out = []
    for line in lines:
        text = line
        for pattern, placeholder in rules:
            text = re.sub(pattern, placeholder, text)
        out.append(text.strip())
    return out


def test_the_tutorial_shows_what_the_collector_prints(tmp_path: pathlib.Path) -> None:
    tutorial = (ROOT / "docs" / "tutorial.rst").read_text(encoding="utf-8")
    block = tutorial.split("(.venv) $ produl-server collector\n", 1)[1].split("\n\n", 1)[0]
    shown = _normalized(block.splitlines())
    collector = Running(produl_server("collector", "--port", "0", "--db", str(tmp_path / "e.db")))
    try:
        printed = _normalized(collector.seen)
    finally:
        collector.stop()
    assert shown == printed
    # The page the tutorial sends the reader to is the one printed, with its
    # token: the bare address answers "locked".
    assert re.findall(r"http://127\.0\.0\.1:8787/(?!#token=)", tutorial) == []


def test_sigterm_ends_the_process_soon_after_stopped(tmp_path: pathlib.Path) -> None:
    # Issue 23: the collector was reported alive 1.5 s after printing
    # "Stopped". Open an idle keep-alive connection and a half-sent request,
    # store an event, then SIGTERM: "Stopped" and the exit must both come.
    collector = Running(
        produl_server(
            "collector", "--port", "0", "--db", str(tmp_path / "e.db"), "--server-key", KEY
        )
    )
    held: list[socket.socket] = []
    pool = urllib3.PoolManager(retries=False, timeout=10.0)
    try:
        event = {"t": "pv", "p": "/", "u": "https://x/", "vi": "v1"}
        assert post(pool, collector.url, event) == 204
        for body in (
            b"",
            b"POST /api/collect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99\r\n\r\n{",
        ):
            sock = socket.create_connection(("127.0.0.1", collector.port), timeout=10.0)
            sock.sendall(body)
            held.append(sock)
        collector.proc.send_signal(signal.SIGTERM)
        collector.expect("Stopped")
        # Generous for a loaded machine; it took about 0.02 s here.
        collector.proc.wait(10.0)
    finally:
        pool.clear()  # its kept-alive connection, closed now rather than by the GC
        for sock in held:
            sock.close()
        collector.stop()
    assert collector.proc.returncode == 0


# -- issue #20 item 7: --strict -------------------------------------------------------


def test_strict_refuses_events_without_a_required_field_naming_it(
    tmp_path: pathlib.Path, http: urllib3.PoolManager
) -> None:
    command = produl_server(
        "collector", "--port", "0", "--db", str(tmp_path / "e.db"), "--server-key", KEY, "--strict"
    )
    collector = Running(command)
    try:
        assert any("strict:" in line for line in collector.seen)
        complete = {"t": "pv", "p": "/a", "u": "https://server/a", "vi": "u1", "sk": "s1"}
        assert post(http, collector.url, complete) == 204
        no_session = {"t": "pv", "p": "/a", "u": "https://server/a", "vi": "u1"}
        body = json.dumps(no_session).encode()
        answer = http.request(
            "POST", collector.url + "/api/collect", body=body, headers={KEY_HEADER: KEY}
        )
        assert answer.status == 400
        error = json.loads(answer.data)
        assert (error["error"], error["field"]) == ("missing_field", "sk")
        assert "sk" in error["message"]
        assert "--strict" in error["message"]
        listed = http.request("GET", collector.url + "/api/events", headers={KEY_HEADER: KEY})
        assert json.loads(listed.data)["total"] == 1  # the refused one was not stored
    finally:
        status, _, stderr = collector.stop()
    assert status == 0, stderr
