"""Where the collector keeps accepted events: in memory or in SQLite.

Both stores have the same interface (:class:`Store`), so the test helper
:class:`~produl_server.testing.LocalCollector` and the ``produl-server
collector`` command share one server. Both are thread safe: the HTTP server
answers each connection on its own thread.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any, Final
from urllib.parse import quote

import attrs

from produl_server.exceptions import ProdulError

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    t TEXT NOT NULL,
    n TEXT,
    vi TEXT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_n ON events (n);
CREATE INDEX IF NOT EXISTS events_vi ON events (vi);
"""


class StoreError(ProdulError):
    """The event store cannot be opened or used.

    Raised when opening (bad path, not a database) and, by
    :class:`SqliteStore`, when a read or write fails later (disk full,
    database corrupted or removed while running).
    """


@attrs.frozen
class StoredEvent:
    """One accepted event as the collector stored it.

    Attributes:
        id: Increasing number, unique within the store.
        received_at: When it was accepted, in Unix seconds.
        event: The wire dict (PROTOCOL.md) exactly as it was posted.
    """

    id: int
    received_at: float
    event: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """The shape ``GET /api/events`` and ``produl-server events --json`` use.

        Returns:
            ``{"id": ..., "received_at": ..., "event": {...}, "warnings": [...]}``,
            where ``warnings`` names each field the API reference's table marks
            required that the event lacks (see ``missing_required``).
        """
        return {
            "id": self.id,
            "received_at": self.received_at,
            "event": self.event,
            "warnings": [f"missing {key}" for key in missing_required(self.event)],
        }


#: The keys the API reference's field table marks required. The server-side
#: page calls ``vi`` only recommended and ``sk`` optional, and the SDK sends
#: events without them, but Produl may drop such events even after a 2xx.
REFERENCE_REQUIRED = ("u", "p", "vi", "sk")


def missing_required(event: dict[str, Any]) -> list[str]:
    """The keys of ``REFERENCE_REQUIRED`` that ``event`` lacks, in order.

    Args:
        event: A wire dict.

    Returns:
        The missing keys; empty when the event has them all.
    """
    return [key for key in REFERENCE_REQUIRED if key not in event]


@attrs.frozen(kw_only=True)
class Query:
    """A filter on stored events; every field that is not ``None`` must match.

    Attributes:
        type: ``"pv"`` or ``"ev"`` (the wire key ``t``).
        name: The event name (``n``).
        visitor_id: The visitor id (``vi``).
        limit: At most this many events, newest first; ``None`` for all.
    """

    type: str | None = None
    name: str | None = None
    visitor_id: str | None = None
    limit: int | None = None

    def matches(self, event: dict[str, Any]) -> bool:
        """Whether ``event`` passes the type/name/visitor filters.

        Args:
            event: A wire dict.

        Returns:
            ``True`` when every given filter matches.
        """
        pairs = (("t", self.type), ("n", self.name), ("vi", self.visitor_id))
        return all(want is None or event.get(key) == want for key, want in pairs)


class Store(abc.ABC):
    """The interface the collector stores events through."""

    @abc.abstractmethod
    def add(self, event: dict[str, Any], received_at: float) -> StoredEvent:
        """Store one accepted event durably before the collector answers 204.

        Args:
            event: A validated wire dict.
            received_at: Unix seconds.

        Returns:
            The stored record.
        """

    @abc.abstractmethod
    def query(self, query: Query | None = None) -> list[StoredEvent]:
        """Events matching ``query``, newest first.

        Args:
            query: Filters and limit; ``None`` returns everything.

        Returns:
            Matching events, newest first.
        """

    @abc.abstractmethod
    def count(self) -> int:
        """How many events are stored.

        Returns:
            The number of stored events.
        """

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """How many events are stored per event name; pageviews under ``"pageview"``.

        Returns:
            Name to count, most frequent first.
        """

    def flagged(self) -> int:
        """How many stored events lack a field the API reference marks required.

        The default reads every event; stores override it with a cheaper count.

        Returns:
            The number of events that lack one of ``u``, ``p``, ``vi``, ``sk``.
        """
        return sum(1 for stored in self.query() if missing_required(stored.event))

    @abc.abstractmethod
    def clear(self) -> None:
        """Forget every stored event."""

    def close(self) -> None:  # noqa: B027 -- optional hook, a no-op by default
        """Release the store's resources; idempotent."""


def _count_key(event: dict[str, Any]) -> str:
    return str(event.get("n", "pageview")) if event.get("t") == "ev" else "pageview"


class MemoryStore(Store):
    """Events kept in a list; gone when the process ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[StoredEvent] = []
        self._next_id = 1

    def add(self, event: dict[str, Any], received_at: float) -> StoredEvent:
        with self._lock:
            stored = StoredEvent(self._next_id, received_at, event)
            self._next_id += 1
            self._events.append(stored)
            return stored

    def query(self, query: Query | None = None) -> list[StoredEvent]:
        query = query or Query()
        with self._lock:
            found = [s for s in reversed(self._events) if query.matches(s.event)]
        found = found if query.limit is None else found[: query.limit]
        # Callers get copies: mutating a returned dict must not alter the store.
        return [StoredEvent(s.id, s.received_at, json.loads(json.dumps(s.event))) for s in found]

    def count(self) -> int:
        with self._lock:
            return len(self._events)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(_count_key(s.event) for s in self._events).most_common())

    def flagged(self) -> int:
        with self._lock:
            return sum(1 for s in self._events if missing_required(s.event))

    def clear(self) -> None:
        with self._lock:
            self._events.clear()


class SqliteStore(Store):
    """Events in an SQLite file (WAL mode); a restart on the same file keeps them.

    Each event is committed before :meth:`add` returns, so an event the
    collector acknowledged survives the collector process crashing.

    Args:
        path: The database file; created when missing unless ``readonly``.
        readonly: Open an existing file for reading only (``produl-server events``).

    Raises:
        StoreError: If the file cannot be opened, is not an SQLite database,
            or holds some other schema.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        try:
            if readonly:
                if not os.path.isfile(self.path):
                    raise StoreError(f"no event database at {self.path}")
                uri = "file:" + _uri_path(self.path) + "?mode=ro"
                self._db = sqlite3.connect(
                    uri, uri=True, check_same_thread=False, isolation_level=None
                )
            else:
                self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open event database {self.path}: {exc}") from exc
        try:
            self._prepare(readonly)
        except (sqlite3.Error, StoreError) as exc:
            self._db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot use event database {self.path}: {exc}") from exc

    def _prepare(self, readonly: bool) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master")}
        if version not in (0, _SCHEMA_VERSION) or (version == 0 and tables):
            raise StoreError(f"{self.path} is not a produl-server event database")
        if readonly:
            if version != _SCHEMA_VERSION:
                raise StoreError(f"{self.path} is not a produl-server event database")
            return
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed event survives the process dying;
        # only an OS crash or power cut may lose the last few.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA + f"PRAGMA user_version={_SCHEMA_VERSION};")

    def add(self, event: dict[str, Any], received_at: float) -> StoredEvent:
        body = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        row = (received_at, event["t"], event.get("n"), event.get("vi"), body)
        with self._using("store the event"):
            cursor = self._db.execute(
                "INSERT INTO events (received_at, t, n, vi, body) VALUES (?, ?, ?, ?, ?)", row
            )
        return StoredEvent(int(cursor.lastrowid or 0), received_at, event)

    def query(self, query: Query | None = None) -> list[StoredEvent]:
        query = query or Query()
        sql = "SELECT id, received_at, body FROM events"
        where, args = [], []
        for column, value in (("t", query.type), ("n", query.name), ("vi", query.visitor_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if query.limit is not None:
            sql += " LIMIT ?"
            args.append(str(query.limit))
        with self._using("read events"):
            rows = self._db.execute(sql, args).fetchall()
            return [StoredEvent(r[0], r[1], json.loads(r[2])) for r in rows]

    def count(self) -> int:
        with self._using("count events"):
            return int(self._db.execute("SELECT count(*) FROM events").fetchone()[0])

    def counts(self) -> dict[str, int]:
        sql = (
            "SELECT CASE WHEN t = 'ev' THEN n ELSE 'pageview' END AS k, count(*) AS c"
            " FROM events GROUP BY k ORDER BY c DESC, k"
        )
        with self._using("count events"):
            return {str(k): int(c) for k, c in self._db.execute(sql)}

    def flagged(self) -> int:
        with self._using("count events"):
            return int(self._db.execute(_FLAGGED_SQL).fetchone()[0])

    def clear(self) -> None:
        with self._using("delete events"):
            self._db.execute("DELETE FROM events")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _using(self, doing: str) -> Iterator[None]:
        """Hold the lock; turn a database failure into a :class:`StoreError`."""
        with self._lock:
            try:
                yield
            # ValueError: a row that is not JSON (the file was tampered with).
            except (sqlite3.Error, ValueError) as exc:
                raise StoreError(f"cannot {doing} in {self.path}: {exc}") from exc


# json_type() is NULL only for a key that is absent (a JSON null is 'null').
# Spelt out, not built from REFERENCE_REQUIRED; a test checks they agree.
_FLAGGED_SQL: Final = (
    "SELECT count(*) FROM events WHERE json_type(body, '$.u') IS NULL"
    " OR json_type(body, '$.p') IS NULL OR json_type(body, '$.vi') IS NULL"
    " OR json_type(body, '$.sk') IS NULL"
)


def _uri_path(path: str) -> str:
    return quote(os.path.abspath(path))
