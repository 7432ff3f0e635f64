"""``produl-server`` run as users run it: real subprocesses, real HTTP."""

from __future__ import annotations

import json
import os
import pathlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import urllib3

from produl_server._protocol import KEY_HEADER
from produl_server.cli import is_loopback, main
from produl_server.collector import SqliteStore
from produl_server.testing import LocalCollector

pytestmark = pytest.mark.slow
TIMEOUT = 60


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    for name in ("PRODUL_SERVER_KEY", "PRODUL_API_URL"):
        if env is None or name not in env:
            full_env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "produl_server", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=full_env,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert text in lines[0]


@pytest.fixture
def env(produl_collector: LocalCollector) -> dict[str, str]:
    return {
        "PRODUL_SERVER_KEY": produl_collector.server_key,
        "PRODUL_API_URL": produl_collector.url,
    }


def test_event_is_delivered_with_typed_props(
    produl_collector: LocalCollector, env: dict[str, str]
) -> None:
    result = run(
        "event",
        "invoice_paid",
        "--prop",
        "amount_cents=4900",
        "--prop",
        "paid=true",
        "--prop",
        "plan=pro",
        "--prop",
        "code=007",
        "--props-json",
        '{"lines": [1, 2], "plan": "free"}',
        "--visitor-id",
        "cus_1",
        "--path",
        "/billing",
        "--session-key",
        "s9",
        env=env,
    )

    assert result.returncode == 0, result
    assert "delivered event 'invoice_paid'" in result.stdout
    assert produl_collector.server_key not in result.stdout + result.stderr
    event = produl_collector.assert_event("invoice_paid", visitor_id="cus_1")
    assert event["pr"] == {
        "amount_cents": 4900,
        "paid": True,
        "plan": "pro",
        "code": "007",
        "lines": [1, 2],
    }
    assert (event["p"], event["u"], event["sk"]) == ("/billing", "https://server/billing", "s9")


def test_pageview_is_delivered(produl_collector: LocalCollector) -> None:
    result = run(
        "pageview",
        "/pricing",
        "--visitor-id",
        "u1",
        "--title",
        "Pricing",
        "--referrer",
        "https://example.com/",
        "--server-key",
        produl_collector.server_key,
        "--api-url",
        produl_collector.url,
    )
    assert result.returncode == 0, result
    produl_collector.assert_pageview(
        "/pricing", visitor_id="u1", title="Pricing", referrer="https://example.com/"
    )


def test_wrong_key_fails_in_one_line_without_showing_it(produl_collector: LocalCollector) -> None:
    secret = "sk_live_0123456789abcdef_wxyz"
    result = run(
        "event", "signup", env={"PRODUL_SERVER_KEY": secret, "PRODUL_API_URL": produl_collector.url}
    )

    assert_one_line_error(result, 1, "refused the server key (HTTP 401)")
    assert secret not in result.stdout + result.stderr
    assert produl_collector.events == []


def test_rejected_by_the_collector_fails(
    produl_collector: LocalCollector, env: dict[str, str]
) -> None:
    produl_collector.fail_next(1, 400)
    result = run("event", "signup", env=env)
    assert_one_line_error(result, 1, "not delivered")


def test_unreachable_collector_fails_within_the_timeout() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    started = time.monotonic()
    result = run(
        "event",
        "signup",
        "--timeout",
        "1",
        env={"PRODUL_SERVER_KEY": "sk_test_x", "PRODUL_API_URL": f"http://127.0.0.1:{port}"},
    )
    # One bound and one message, with the cause (issue #23).
    assert_one_line_error(
        result, 1, f"not delivered within 1 s to http://127.0.0.1:{port}: ConnectionRefusedError"
    )
    assert time.monotonic() - started < 30


def test_a_collector_that_never_answers_fails_within_the_timeout_with_the_cause(
    produl_collector: LocalCollector, env: dict[str, str]
) -> None:
    produl_collector.hang()
    try:
        result = run("event", "signup", "--timeout", "1", env=env)
    finally:
        produl_collector.release()
    assert_one_line_error(result, 1, f"not delivered within 1 s to {produl_collector.url}: ")
    assert "timed out" in result.stderr.lower() or "timeout" in result.stderr.lower()


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["event", "x", "--prop", "novalue"], "bad --prop 'novalue'"),
        (["event", "x", "--prop", "=v"], "bad --prop '=v'"),
        (["event", "x", "--props-json", "{nope"], "--props-json is not valid JSON"),
        (["event", "x", "--props-json", "[1]"], "must be a JSON object"),
        (["event", "x" * 201], "invalid input"),
        (["pageview", "/p"], "--visitor-id"),
        (["pageview", "no-slash", "--visitor-id", "u"], "invalid input"),
        (["event", "x", "--timeout", "soon"], "--timeout"),
        # Issue #9, item 4: a huge timeout used to pass, then overflow a wait.
        (["event", "x", "--timeout", "1e10"], "at most 86400, not '1e10'"),
        (["event", "x", "--timeout", "nan"], "--timeout"),
        (["event", "x", "--timeout", "0"], "more than 0"),
        (["collector", "--port", "99999"], "port"),
        (["collector", "--rate-limit", "lots"], "'off'"),
        (["events", "--limit", "0"], "positive"),
        ([], "required"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], text: str, env: dict[str, str]) -> None:
    assert_one_line_error(run(*args, env=env), 2, text)


def test_missing_key_is_a_usage_error() -> None:
    assert_one_line_error(run("event", "signup"), 2, "PRODUL_SERVER_KEY")


NON_ASCII_KEY = "sk_live_SECRET\u2013PART_4321"  # an en dash, pasted from a web page


def assert_key_not_shown(result: subprocess.CompletedProcess[str]) -> None:
    for text in (result.stdout, result.stderr):
        assert NON_ASCII_KEY not in text
        assert "SECRET" not in text
        assert "4321" not in text


def test_a_key_outside_printable_ascii_is_one_line_without_the_key(
    produl_collector: LocalCollector,
) -> None:
    """Issue #9, item 1: it used to fail on every send, with the header in the error."""
    common = ["--visitor-id", "u1", "--api-url", produl_collector.url, "--timeout", "1"]
    by_flag = run("event", "signup", "--server-key", NON_ASCII_KEY, *common)
    by_env = run("event", "signup", *common, env={"PRODUL_SERVER_KEY": NON_ASCII_KEY})
    # Bytes that are not UTF-8 arrive as lone surrogates (surrogateescape).
    undecodable = run("event", "signup", "--server-key", "sk_live_SECRET\udce9_4321", *common)
    for result, code in ((by_flag, "U+2013"), (by_env, "U+2013"), (undecodable, "U+DCE9")):
        assert_one_line_error(result, 2, f"server_key has {code}")
        assert "at position 14; a key is printable ASCII" in result.stderr
        assert_key_not_shown(result)
    assert not produl_collector.requests


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["event", "caf\udce9", "--visitor-id", "u1"], "name: contains a lone surrogate U+DCE9"),
        (["event", "e", "--visitor-id", "\udcff"], "visitor_id: contains a lone surrogate"),
        (["event", "e", "--prop", "k=caf\udce9"], 'properties["k"]: contains a lone'),
        (["event", "e", "--prop", "caf\udce9=1"], 'properties["caf\\udce9"]: the key'),
        (["pageview", "/p", "--visitor-id", "u", "--title", "\udce9"], "title: contains a"),
        (["event", "e", "--props-json", '{"n": 1e999}'], 'properties["n"]: inf is not a finite'),
    ],
)
def test_undecodable_bytes_in_argv_are_one_line_and_exit_2(
    args: list[str], text: str, produl_collector: LocalCollector, env: dict[str, str]
) -> None:
    """Issue #9, item 3: a byte that is not UTF-8 used to print a traceback."""
    result = run(*args, env=env)
    assert_one_line_error(result, 2, f"invalid input: {text}")
    assert not produl_collector.requests


def test_credentials_in_the_api_url_are_one_line_without_the_password(env: dict[str, str]) -> None:
    """Issue #9, item 2: refused, and the password is not repeated."""
    url = "http://user:Pr0xyPassw0rd@127.0.0.1:9"
    result = run("event", "signup", "--visitor-id", "u1", "--api-url", url, env=env)
    assert_one_line_error(result, 2, "api_url must not contain user:password@")
    assert "'http://user:***@127.0.0.1:9'" in result.stderr
    assert "Pr0xyPassw0rd" not in result.stdout + result.stderr


def test_help_and_version() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("collector", "event", "pageview", "events", "demo", "doctor"):
        assert command in result.stdout
    assert run("--version").stdout.startswith("produl-server ")


def test_demo_runs_offline_and_loses_nothing() -> None:
    result = run("demo")
    assert result.returncode == 0, result
    assert "invoice_paid" in result.stdout
    assert "<- 429" in result.stdout
    assert "session=s1 lang=en-GB" in result.stdout
    assert "All 29 events arrived, none lost." in result.stdout
    assert "dropped=0" in result.stdout
    assert "Traceback" not in result.stderr


class Collector:
    """A ``produl-server collector`` subprocess whose stdout is read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "produl_server", "collector", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, text: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
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

    def stop(self, sig: int | None = signal.SIGINT) -> tuple[int, str]:
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        while (line := self.lines.get_nowait()) is not None:
            self.seen.append(line)
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        stderr = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode, stderr


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    pool = urllib3.PoolManager(retries=False, timeout=10.0)
    yield pool
    pool.clear()


def test_collector_stores_prints_and_survives_a_restart(
    tmp_path: pathlib.Path, http: urllib3.PoolManager
) -> None:
    db = tmp_path / "events.sqlite3"
    first = Collector("--db", str(db))
    try:
        url = first.expect("PRODUL_API_URL=").split("=", 1)[1]
        key = first.expect("PRODUL_SERVER_KEY=").split("=", 1)[1]
        first.expect("Ctrl-C")
        assert key.startswith("sk_local_")
        assert len(key) > 20

        event = {"t": "ev", "n": "signup", "vi": "u1", "pr": {"plan": "pro"}}
        response = http.request(
            "POST", url + "/api/collect", body=json.dumps(event).encode(), headers={KEY_HEADER: key}
        )
        assert response.status == 204
        assert "event signup visitor=u1" in first.expect("event signup")
        assert (
            http.request(
                "POST", url + "/api/collect", body=b"{}", headers={KEY_HEADER: "sk_bad"}
            ).status
            == 401
        )
    finally:
        status, stderr = first.stop()
    assert status == 0, stderr
    assert "Traceback" not in stderr
    assert any("Stopped; 1 event(s) stored" in line for line in first.seen)
    assert sum(key in line for line in first.seen) == 1  # printed once, to paste

    second = Collector("--db", str(db), "--server-key", "sk_mine_abcdef123456")
    try:
        second.expect("(1 stored)")
        assert "sk_…3456" in second.expect("PRODUL_SERVER_KEY=")
        second.expect("Ctrl-C")
    finally:
        status, _ = second.stop()
    assert status == 0
    assert not any("sk_mine_abcdef123456" in line for line in second.seen)

    listed = run("events", "--db", str(db))
    assert listed.returncode == 0
    assert "event signup visitor=u1" in listed.stdout
    as_json = json.loads(run("events", "--db", str(db), "--json").stdout)
    assert [item["event"] for item in as_json] == [event]


def test_collector_stops_on_sigterm(tmp_path: pathlib.Path) -> None:
    collector = Collector("--db", str(tmp_path / "e.db"))
    collector.expect("Ctrl-C")
    status, stderr = collector.stop(signal.SIGTERM)
    assert status == 0, stderr
    assert any("Stopped; 0 event(s)" in line for line in collector.seen)


def test_collector_port_in_use_is_one_line(tmp_path: pathlib.Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("collector", "--port", str(port), "--db", str(tmp_path / "e.db"))
    assert_one_line_error(result, 1, f"cannot listen on 127.0.0.1:{port}")


def test_collector_refuses_an_unusable_db(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not a database\n" * 200)
    assert_one_line_error(run("collector", "--port", "0", "--db", str(bad)), 1, "notes.txt")


def test_events_on_a_missing_db_is_one_line(tmp_path: pathlib.Path) -> None:
    assert_one_line_error(run("events", "--db", str(tmp_path / "none.db")), 1, "no event database")


def test_events_filters_and_limit(tmp_path: pathlib.Path) -> None:
    db = tmp_path / "e.db"
    store = SqliteStore(db)
    for i in range(5):
        store.add({"t": "ev", "n": "tick", "vi": f"v{i}"}, float(i))
    store.add({"t": "pv", "p": "/x", "vi": "v9"}, 9.0)
    store.close()

    last_two = run("events", "--db", str(db), "--limit", "2", "--type", "ev").stdout.splitlines()
    assert [line.split()[-1] for line in last_two] == ["visitor=v3", "visitor=v4"]  # oldest first
    assert "pageview /x" in run("events", "--db", str(db), "--visitor-id", "v9").stdout
    empty = run("events", "--db", str(db), "--name", "nothing")
    assert empty.returncode == 0
    assert "no events" in empty.stderr


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("192.168.1.4")
    assert not is_loopback("example.com")


def test_main_in_process_returns_the_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["events", "--db", "/nonexistent/dir/e.db"]) == 1
    assert "no event database" in capsys.readouterr().err
    assert main(["--version"]) == 0


def test_every_option_of_every_subcommand_has_a_description():
    # Issue #23: --path, --url, --visitor-id ... showed in --help with no text.
    import argparse

    from produl_server.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {action.dest}"
        for name, sub in subparsers.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert missing == []


def test_argument_errors_start_as_the_docs_say():
    result = run("event")
    assert result.returncode == 2
    assert result.stderr.startswith("produl-server: error: event: "), result.stderr
    assert "name" in result.stderr


def test_an_explicit_command_sends_even_with_the_apps_off_switch(produl_collector):
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "PRODUL_ENABLED": "0",
        "PRODUL_SERVER_KEY": produl_collector.server_key,
        "PRODUL_API_URL": produl_collector.url,
    }
    result = subprocess.run(
        [sys.executable, "-m", "produl_server", "event", "cli_sent", "--visitor-id", "v"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert [e["n"] for e in produl_collector.events] == ["cli_sent"]
