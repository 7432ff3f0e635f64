"""What the collector prints is safe for a terminal (issue #9, item 11).

``test_collector_cli.py`` proves it through the real command; these pin the
rules and the access log, in process.
"""

from __future__ import annotations

import json
import logging
import socket

import pytest

from produl_server.collector._format import describe, escape_controls, terminal_json
from produl_server.testing import LocalCollector, format_events


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "https://x/\x1b]0;pwned\x07\x1b[2J\x1b[31mFAKE",
            r"https://x/\x1b]0;pwned\x07\x1b[2J\x1b[31mFAKE",
        ),
        ("a\x00b\x7fc\x9bd", r"a\x00b\x7fc\x9bd"),
        ("line\r\nbreak\u2028x", r"line\x0d\x0abreak\u2028x"),
        ("invoice\u202egnp.exe", r"invoice\u202egnp.exe"),
        ("x\ud800", r"x\ud800"),
        ("café ☕ 日本 \N{PARTY POPPER}", "café ☕ 日本 \N{PARTY POPPER}"),
    ],
)
def test_escape_controls(text: str, shown: str) -> None:
    assert escape_controls(text) == shown


def test_every_printed_field_is_escaped() -> None:
    event = {
        "t": "ev",
        "n": "n\x1b",
        "p": "/p\x1b",
        "vi": "v\x1b",
        "sk": "s\x1b",
        "pr": {"k\x1b": "v\x9b"},
    }
    line = describe(event)
    assert "\x1b" not in line
    assert "\x9b" not in line
    assert line.count(r"\x1b") == 4
    assert r"\x9b" in line
    pageview = describe({"t": "pv", "p": "/", "vi": "v", "ti": "t\x07", "r": "r\x07"})
    assert pageview == r"pageview / visitor=v title=t\x07 ref=r\x07"
    # Assertion messages of the test helpers use the same lines.
    assert "\x1b" not in format_events([event])


def test_the_access_log_escapes_the_request_line(
    produl_collector: LocalCollector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="produl_server.collector")
    with socket.create_connection(("127.0.0.1", produl_collector.port), timeout=10) as sock:
        sock.sendall(
            b"GET /x\x1b]0;pwned\x07 HTTP/1.1\r\n"
            + f"Host: 127.0.0.1:{produl_collector.port}\r\nConnection: close\r\n\r\n".encode()
        )
        while sock.recv(4096):
            pass
    messages = [r.getMessage() for r in caplog.records]
    assert any(r"/x\x1b]0;pwned\x07" in m for m in messages), messages
    assert not any("\x1b" in m or "\x07" in m for m in messages)


def test_terminal_json_is_valid_equal_and_safe() -> None:
    stored = [
        {"id": 1, "event": {"t": "pv", "p": "/\x1b[2J", "r": "r\x9b\x7f\u202e", "ti": "café"}}
    ]
    text = terminal_json(stored, indent=2)
    assert json.loads(text) == stored
    assert "café" in text  # readable, not \u00e9
    assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F for c in text)
    assert "\u202e" not in text
