"""The collector answers its own failures (issue #9, item 10), over real HTTP.

Malformed requests go over raw sockets; the storage failures are real: an
SQLite file corrupted on disk while the collector runs (here), and a full
file system (``test_collector_cli.py``, in a subprocess).
"""

from __future__ import annotations

import json
import logging
import pathlib
import socket
import sqlite3
from collections.abc import Iterator
from http.client import HTTPResponse
from typing import Any

import pytest
import urllib3

from produl_server._protocol import KEY_HEADER
from produl_server.collector import CollectorServer, MemoryStore, Query, StoredEvent
from produl_server.testing import LocalCollector

EVENT = {"t": "ev", "n": "signup", "vi": "u1"}


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    pool = urllib3.PoolManager(maxsize=1, retries=False, timeout=10.0)
    yield pool
    pool.clear()


def post_raw(collector: LocalCollector, body: bytes) -> urllib3.BaseHTTPResponse:
    pool = urllib3.PoolManager(retries=False, timeout=10.0)
    try:
        return pool.request(
            "POST",
            collector.url + "/api/collect",
            body=body,
            headers={KEY_HEADER: collector.server_key, "Content-Type": "application/json"},
        )
    finally:
        pool.clear()


def get_events(collector: LocalCollector, query: str = "") -> urllib3.BaseHTTPResponse:
    pool = urllib3.PoolManager(retries=False, timeout=10.0)
    try:
        return pool.request(
            "GET",
            collector.url + "/api/events" + query,
            headers={"Authorization": f"Bearer {collector.access_token}"},
        )
    finally:
        pool.clear()


def exchange(port: int, data: bytes) -> tuple[int, dict[str, Any]]:
    """Send raw bytes; read one JSON answer (it must come, not a closed socket)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        response = HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


# -- numbers are ASCII digits ----------------------------------------------------


@pytest.mark.parametrize("value", [b"\xb2", b"\xb9\xb2", b"-1", b"1_0", b" ", b"9" * 5000])
def test_a_non_ascii_content_length_gets_400_not_a_closed_socket(
    produl_collector: LocalCollector, value: bytes
) -> None:
    # b"\xb2" is "²" once the headers are decoded as Latin-1: isdigit() said
    # yes and int() raised inside the handler.
    head = (
        f"POST /api/collect HTTP/1.1\r\nHost: 127.0.0.1:{produl_collector.port}\r\n"
        f"{KEY_HEADER}: {produl_collector.server_key}\r\n"
    ).encode()
    status, body = exchange(
        produl_collector.port, head + b"Content-Length: " + value + b"\r\n\r\n{}"
    )
    assert status == 400
    assert body["error"] == "bad_request"
    assert "Content-Length" in body["message"]


@pytest.mark.parametrize("chunk_size", [b"0x5", b"+5", b"5_0", b"\xb2"])
def test_a_bad_chunk_size_gets_400(produl_collector: LocalCollector, chunk_size: bytes) -> None:
    head = (
        f"POST /api/collect HTTP/1.1\r\nHost: 127.0.0.1:{produl_collector.port}\r\n"
        f"{KEY_HEADER}: {produl_collector.server_key}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    status, body = exchange(produl_collector.port, head + chunk_size + b"\r\nhello\r\n0\r\n\r\n")
    assert (status, body["error"]) == (400, "bad_request")


@pytest.mark.parametrize("limit", ["%C2%B2", "%D9%A3", "%EF%BC%95", "+5", "5_0"])
def test_a_limit_in_other_digits_gets_400(produl_collector: LocalCollector, limit: str) -> None:
    # "²" crashed the handler; Arabic-Indic 3 and fullwidth 5 were taken as numbers.
    response = get_events(produl_collector, f"?limit={limit}")
    assert response.status == 400
    assert json.loads(response.data)["field"] == "limit"


# -- invalid Unicode -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (r'{"t":"ev","n":"x\ud800"}', "n"),
        (r'{"t":"pv","p":"/","vi":"\udfff"}', "vi"),
        (r'{"t":"ev","n":"x","pr":{"a":["ok","\ud83d"]}}', "pr"),
        (r'{"t":"ev","n":"x","pr":{"\udc00":1}}', "pr"),
        (r'{"t":"ev","n":"x","\ud800":1}', r"\ud800"),
    ],
)
@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_a_lone_surrogate_gets_400_and_breaks_nothing(
    tmp_path: pathlib.Path, text: str, field: str, storage: str
) -> None:
    db = tmp_path / "e.db" if storage == "sqlite" else None
    with LocalCollector(db_path=db) as collector:
        refused = post_raw(collector, text.encode())
        assert refused.status == 400
        assert json.loads(refused.data)["error"] == "invalid_unicode"
        assert json.loads(refused.data)["field"] == field
        # The store and the API are fine afterwards.
        assert post_raw(collector, json.dumps(EVENT).encode()).status == 204
        listed = get_events(collector)
        assert listed.status == 200
        assert [item["event"] for item in json.loads(listed.data)["events"]] == [EVENT]


def test_a_valid_surrogate_pair_is_accepted(produl_collector: LocalCollector) -> None:
    response = post_raw(produl_collector, rb'{"t":"ev","n":"party \ud83c\udf89"}')
    assert response.status == 204
    assert produl_collector.events == [{"t": "ev", "n": "party \N{PARTY POPPER}"}]


# -- storage failures: 503 and one ERROR line ------------------------------------


def corrupt_schema(db: pathlib.Path) -> None:
    """Corrupt the database through a second connection, as a crash or a stray
    tool might: the events table's root page points outside the file."""
    other = sqlite3.connect(db, isolation_level=None)
    try:
        version = other.execute("PRAGMA schema_version").fetchone()[0]
        other.execute("PRAGMA writable_schema=ON")
        other.execute("UPDATE sqlite_master SET rootpage=9999 WHERE name='events'")
        # A new schema cookie makes the collector's connection read it again.
        other.execute(f"PRAGMA schema_version={version + 1}")
    finally:
        other.close()


def test_a_database_corrupted_while_running_gets_503_logged_once(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "events.sqlite3"
    caplog.set_level(logging.DEBUG, logger="produl_server.collector")
    with LocalCollector(db_path=db) as collector:
        assert post_raw(collector, json.dumps(EVENT).encode()).status == 204
        corrupt_schema(db)

        answers = [post_raw(collector, json.dumps(EVENT).encode()) for _ in range(3)]
        listed = get_events(collector)
        with urllib3.PoolManager(retries=False) as pool:
            health = pool.request("GET", collector.url + "/healthz")

    for answer in [*answers, listed, health]:
        assert answer.status == 503
        assert json.loads(answer.data)["error"] == "storage_unavailable"
        assert "malformed" in json.loads(answer.data)["message"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    # One line for one cause, though inserts, reads and counts all failed.
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "malformed" in errors[0].getMessage()
    assert collector.server_key not in caplog.text


class _BrokenStore(MemoryStore):
    """A store with a bug: the kind of failure nobody planned for."""

    def query(self, query: Query | None = None) -> list[StoredEvent]:
        raise RuntimeError("a bug in a store")


def test_an_unexpected_error_gets_500_and_a_logged_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = CollectorServer(store=_BrokenStore(), server_key="sk_test_local_secret")
    server.start()
    try:
        pool = urllib3.PoolManager(retries=False, timeout=10.0)
        auth = {"Authorization": f"Bearer {server.access_token}"}
        answers = [pool.request("GET", server.url + "/api/events", headers=auth) for _ in range(2)]
        healthy = pool.request("GET", server.url + "/healthz")
        pool.clear()
    finally:
        server.stop()

    assert [a.status for a in answers] == [500, 500]
    assert json.loads(answers[0].data)["error"] == "internal_error"
    assert healthy.status == 200  # the collector serves on
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert "a bug in a store" in caplog.text
    assert "sk_test_local_secret" not in caplog.text
