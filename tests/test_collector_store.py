"""The event stores, the rate limiter, and a collector restarted on its SQLite file."""

from __future__ import annotations

import json
import pathlib
import sqlite3
import threading
from collections.abc import Iterator

import pytest
import urllib3

from produl_server._protocol import KEY_HEADER
from produl_server.collector import (
    MemoryStore,
    Query,
    RateLimiter,
    SqliteStore,
    Store,
    StoreError,
)
from produl_server.testing import LocalCollector

PV = {"t": "pv", "p": "/pricing", "vi": "u1"}
SIGNUP = {"t": "ev", "n": "signup", "vi": "u1", "pr": {"plan": "pro", "seats": 3}}
PAID = {"t": "ev", "n": "invoice_paid", "vi": "u2"}


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[Store]:
    made: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "e.db")
    yield made
    made.close()


def test_store_keeps_events_and_filters_newest_first(store: Store) -> None:
    for at, event in enumerate([PV, SIGNUP, PAID, SIGNUP]):
        store.add(dict(event), float(at))

    everything = store.query()
    assert [s.event for s in everything] == [SIGNUP, PAID, SIGNUP, PV]
    assert [s.received_at for s in everything] == [3.0, 2.0, 1.0, 0.0]
    assert len({s.id for s in everything}) == 4
    assert [s.event for s in store.query(Query(type="pv"))] == [PV]
    assert [s.received_at for s in store.query(Query(name="signup"))] == [3.0, 1.0]
    assert [s.event for s in store.query(Query(visitor_id="u2"))] == [PAID]
    assert [s.received_at for s in store.query(Query(limit=2))] == [3.0, 2.0]
    assert store.query(Query(type="ev", visitor_id="u1", limit=1))[0].received_at == 3.0
    assert store.count() == 4
    assert store.counts() == {"signup": 2, "invoice_paid": 1, "pageview": 1}

    store.clear()
    assert store.count() == 0
    assert store.query() == []


def test_store_is_thread_safe(store: Store) -> None:
    def add(worker: int) -> None:
        for i in range(100):
            store.add({"t": "ev", "n": f"w{worker}", "pr": {"i": i}}, 0.0)

    threads = [threading.Thread(target=add, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert store.count() == 400
    assert len({s.id for s in store.query()}) == 400


def test_sqlite_uses_wal_and_survives_reopening(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "events.sqlite3"
    first = SqliteStore(path)
    first.add(dict(SIGNUP), 1.5)
    first.close()
    first.close()  # idempotent

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    again = SqliteStore(path)
    try:
        assert [(s.event, s.received_at) for s in again.query()] == [(SIGNUP, 1.5)]
        again.add(dict(PV), 2.0)
        assert again.count() == 2
    finally:
        again.close()


def test_sqlite_readonly_reads_and_refuses_missing_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "events.sqlite3"
    with pytest.raises(StoreError, match="no event database"):
        SqliteStore(path, readonly=True)
    writer = SqliteStore(path)
    writer.add(dict(PAID), 3.0)
    reader = SqliteStore(path, readonly=True)
    try:
        assert [s.event for s in reader.query()] == [PAID]
        with pytest.raises(StoreError, match="readonly"):
            reader.add(dict(PV), 4.0)
    finally:
        reader.close()
        writer.close()


@pytest.mark.parametrize("content", [b"this is not a database" * 100, "sqlite-other"])
def test_sqlite_refuses_files_it_does_not_own(tmp_path: pathlib.Path, content: object) -> None:
    path = tmp_path / "other.db"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE customers (id INTEGER)")
        db.close()
    with pytest.raises(StoreError, match=str(path.name)):
        SqliteStore(path)


def test_sqlite_refuses_an_unopenable_path(tmp_path: pathlib.Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        SqliteStore(tmp_path / "missing-dir" / "e.db")


def test_local_collector_on_a_db_keeps_events_across_restarts(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "events.sqlite3"
    pool = urllib3.PoolManager(retries=False, timeout=10.0)
    try:
        for event in (SIGNUP, PV):
            with LocalCollector(db_path=path) as collector:
                response = pool.request(
                    "POST",
                    collector.url + "/api/collect",
                    body=json.dumps(event).encode(),
                    headers={KEY_HEADER: collector.server_key},
                )
                assert response.status == 204
        # Stopped, the collector still answers from the file.
        assert collector.events == [SIGNUP, PV]
    finally:
        pool.clear()
    reader = SqliteStore(path, readonly=True)
    try:
        assert reader.count() == 2
    finally:
        reader.close()


def test_rate_limiter_refills_at_limit_per_minute() -> None:
    now = [0.0]
    limiter = RateLimiter(120, clock=lambda: now[0])  # 2 tokens per second

    assert [limiter.acquire("a") for _ in range(120)] == [None] * 120
    assert limiter.acquire("a") == 1
    assert limiter.acquire("b") is None  # per key
    now[0] += 0.5
    assert limiter.acquire("a") is None  # one token refilled
    assert limiter.acquire("a") == 1
    now[0] += 3600
    assert [limiter.acquire("a") for _ in range(121)].count(None) == 120  # capped at the limit
    limiter.reset()
    assert limiter.acquire("a") is None


def test_rate_limiter_retry_after_is_whole_seconds() -> None:
    now = [0.0]
    limiter = RateLimiter(1, clock=lambda: now[0])
    assert limiter.acquire("ip") is None
    assert limiter.acquire("ip") == 60
    now[0] += 59.5
    assert limiter.acquire("ip") == 1
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(0)


def test_sqlite_and_memory_stores_flag_the_same_events(tmp_path) -> None:
    from produl_server.collector import MemoryStore, SqliteStore
    from produl_server.collector._store import REFERENCE_REQUIRED, Store, missing_required

    events = [
        {"t": "pv", "p": "/a", "u": "https://s/a", "vi": "v", "sk": "s"},
        {"t": "pv", "p": "/a", "u": "https://s/a", "vi": "v"},
        {"t": "ev", "n": "x"},
        {"t": "ev", "n": "x", "p": "/a", "u": "https://s/a", "vi": "v", "sk": "s", "pr": {"u": 1}},
    ]
    for key in REFERENCE_REQUIRED:  # each required key alone is enough to flag
        complete = dict(events[0])
        del complete[key]
        events.append(complete)
    expected = sum(1 for event in events if missing_required(event))
    assert expected == 2 + len(REFERENCE_REQUIRED)
    sqlite = SqliteStore(tmp_path / "e.db")
    stores: list[Store] = [MemoryStore(), sqlite]
    for store in stores:
        for event in events:
            store.add(event, 0.0)
        assert store.flagged() == expected
        assert Store.flagged(store) == expected  # the generic count agrees
    sqlite.close()
