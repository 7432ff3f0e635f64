"""The spool: events that could not be sent in time, kept on disk for later.

When the sender cannot deliver an event in time (the shutdown deadline
passed, the queue was full, retries ran out in an outage), it hands the
encoded event to a :class:`Spool` instead of dropping it. Any later process
with the same spool directory, including this one, claims the events back,
sends them, and acknowledges them.

Design, in plain words:

* One SQLite file, ``<directory>/produl-spool.sqlite3``, in WAL mode, holds
  the events of every API URL that uses the directory. Each row carries a
  ``key`` (the API URL), so an event only ever goes back to the collector it
  was meant for. The directory is created with mode ``0o700`` and the file
  with ``0o600``: the events may carry visitor ids.
* Several processes may share one spool. Every change runs in its own short
  transaction; :meth:`Spool.claim` starts with ``BEGIN IMMEDIATE``, which takes
  the file's write lock before it reads, so two claimers never take the same
  row. A busy file is waited on for at most ``busy_timeout`` seconds (2 s by
  default), then the call fails with :class:`SpoolError`.
* A claim is a lease, not a removal: the rows stay in the file, marked with
  the claimer's id (one uuid per :class:`Spool` object and per process) and
  ``lease_until``. Delivered (or definitively refused) events are deleted by
  :meth:`Spool.ack`; events the sender could not send are given back at once
  by :meth:`Spool.release`. A process that dies after claiming (``SIGKILL``,
  power cut) gives nothing back, so once its lease has run out the events are
  claimable again by anyone.

Guarantee: **at least once**. An event that :meth:`Spool.add` stored stays in
the file until someone acknowledges it. It may be sent twice: when a sender
dies (or stalls past its lease) after sending but before acknowledging, the
next claimer sends it again. The duplicates are bounded by what that sender
had claimed and not yet acknowledged, so a sender should claim one request's
worth at a time and choose a lease well above its request timeout.

Leases use the wall clock (``time.time()``), the only clock that means the
same in every process. A clock stepped forward expires leases early (more
duplicates, never a loss); one stepped back delays re-claiming.

Bounds: at most ``max_events`` events in the file (all keys together, one
million by default); :meth:`Spool.add` stores what fits and returns how many
it stored. ``max_bytes``, when given, caps the database file itself (through
SQLite's ``max_page_count``); an :meth:`Spool.add` that would pass it stores
nothing and raises a :class:`SpoolError` that says the spool is full, as a
full disk does. Deleted rows leave free pages that later events reuse; the
file does not shrink by itself. The WAL file is trimmed back to 4 MiB after
each checkpoint.

Forks: an SQLite connection must never be used, or even closed, in a child
process. :meth:`Spool.after_fork_in_child` (also run by itself when a call
notices that the process id changed) parks the inherited connection without
touching it, takes a fresh claimer id, and opens a new connection on the
next call.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from .exceptions import ProdulError

__all__ = ["FILENAME", "Spool", "SpoolError", "SpooledEvent"]

FILENAME = "produl-spool.sqlite3"
DEFAULT_MAX_EVENTS = 1_000_000
DEFAULT_BUSY_TIMEOUT = 2.0

#: "PRDL": marks the file as a produl spool (``PRAGMA application_id``).
_APPLICATION_ID = 0x5052444C
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    body BLOB NOT NULL,
    visitor TEXT,
    claimer TEXT,
    lease_until REAL
);
CREATE INDEX events_by_key ON events (key, id);
CREATE TABLE totals (one INTEGER PRIMARY KEY CHECK (one = 1), events INTEGER NOT NULL);
INSERT INTO totals VALUES (1, 0);
CREATE TRIGGER events_added AFTER INSERT ON events
    BEGIN UPDATE totals SET events = events + 1; END;
CREATE TRIGGER events_removed AFTER DELETE ON events
    BEGIN UPDATE totals SET events = events - 1; END;
"""
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26
_CLAIMABLE = "key = ? AND (lease_until IS NULL OR lease_until <= ?)"

#: Connections inherited through fork(): never used, only kept referenced so
#: that garbage collection does not close them while the child runs (closing
#: one may run cleanup that pulls the file from under the parent).
_INHERITED: list[sqlite3.Connection] = []


class SpoolError(ProdulError):
    """The spool could not be opened, written or read.

    The message is one line for a user: what failed, the directory, and the
    reason the OS or SQLite gave. It never holds event contents.
    """


class SpooledEvent(NamedTuple):
    """One claimed event: its id (for ack/release), body and visitor id.

    The id is a row's (an ``int``) here, a Stream entry's (a ``str``) in Redis.
    """

    id: int | str
    body: bytes
    visitor: str | None


class Spool:
    """Events kept on disk, for one API URL, in a directory that may be shared.

    Safe to use from several threads (one lock serialises the calls) and from
    several processes at once (SQLite's file locks).

    Args:
        directory: Where the database lives; created (mode ``0o700``) if missing.
        key: The API URL these events belong to.
        max_events: The most events the file holds, all keys together.
        max_bytes: If given, the largest the database file may grow.
        busy_timeout: Seconds to wait for another process's transaction.

    Raises:
        SpoolError: If the directory cannot be created or written, or the file
            is damaged or is not a produl spool.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        key: str,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_bytes: int | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> None:
        if max_events < 0 or (max_bytes is not None and max_bytes <= 0) or busy_timeout < 0:
            raise ValueError("max_events, max_bytes and busy_timeout must be positive")
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, FILENAME)
        self.key = key
        self.max_events = max_events
        self._max_bytes = max_bytes
        self._busy_timeout = busy_timeout
        self._closed = False
        self._db: sqlite3.Connection | None = None
        self._after_fork()
        with self._lock:
            self._db = self._open()

    # -- the API -------------------------------------------------------------

    def add(self, items: Iterable[tuple[bytes, str | None]]) -> int:
        """Store events ``(body, visitor_id)`` in order, in one transaction.

        Stores at most as many as fit under ``max_events``; the rest of
        ``items`` is not stored (nor consumed). Returns how many were stored.
        """
        with self._transaction("store events in") as db:
            total = int(db.execute("SELECT events FROM totals").fetchone()[0])
            stored = 0
            for body, visitor in items:
                if total + stored >= self.max_events:
                    break
                db.execute(
                    "INSERT INTO events (key, body, visitor) VALUES (?, ?, ?)",
                    (self.key, body, visitor),
                )
                stored += 1
            return stored

    def claim(self, limit: int, lease: float, now: float | None = None) -> list[SpooledEvent]:
        """Take up to ``limit`` events, oldest first, for ``lease`` seconds.

        Events nobody holds, and those whose lease has run out (their claimer
        died or stalled), can be claimed. Until :meth:`ack` or :meth:`release`,
        or the lease ends, no other claimer gets them.
        """
        if limit < 1 or lease <= 0:
            raise ValueError("claim() needs limit >= 1 and lease > 0")
        now = time.time() if now is None else now
        with self._transaction("claim events from") as db:
            rows = db.execute(
                f"SELECT id, body, visitor FROM events WHERE {_CLAIMABLE} ORDER BY id LIMIT ?",  # noqa: S608
                (self.key, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE events SET claimer = ?, lease_until = ? WHERE id = ?",
                [(self._claimer, now + lease, row[0]) for row in rows],
            )
        return [SpooledEvent(int(i), bytes(body), visitor) for i, body, visitor in rows]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete events that were delivered (or refused for good); return how many.

        Deletes them whoever holds them now: an event delivered late, after
        its lease ran out, needs no second delivery.
        """
        with self._transaction("remove sent events from") as db:
            cursor = db.executemany(
                "DELETE FROM events WHERE id = ? AND key = ?", [(i, self.key) for i in ids]
            )
            return max(cursor.rowcount, 0)

    def release(self, ids: Iterable[int]) -> int:
        """Give back claimed events unsent, for anyone to claim now.

        Only events this spool still holds are released; returns how many.
        """
        with self._transaction("release events in") as db:
            cursor = db.executemany(
                "UPDATE events SET claimer = NULL, lease_until = NULL WHERE id = ? AND claimer = ?",
                [(i, self._claimer) for i in ids],
            )
            return max(cursor.rowcount, 0)

    def extend(self, ids: Iterable[int], lease: float, now: float | None = None) -> int:
        """Renew the lease on events this spool still holds; return how many.

        Fewer than asked means some lease ran out and another claimer took
        the events: they may be sent twice.
        """
        if lease <= 0:
            raise ValueError("extend() needs lease > 0")
        until = (time.time() if now is None else now) + lease
        with self._transaction("extend claims in") as db:
            cursor = db.executemany(
                "UPDATE events SET lease_until = ? WHERE id = ? AND claimer = ?",
                [(until, i, self._claimer) for i in ids],
            )
            return max(cursor.rowcount, 0)

    def count(self) -> int:
        """Events stored for this key, claimed or not."""
        with self._using("count events in") as db:
            sql = "SELECT count(*) FROM events WHERE key = ?"
            return int(db.execute(sql, (self.key,)).fetchone()[0])

    def pending_count(self, now: float | None = None) -> int:
        """Events for this key that a claim could take right now."""
        now = time.time() if now is None else now
        with self._using("count events in") as db:
            sql = f"SELECT count(*) FROM events WHERE {_CLAIMABLE}"  # noqa: S608
            return int(db.execute(sql, (self.key, now)).fetchone()[0])

    def close(self) -> None:
        """Close the connection; later calls raise :class:`SpoolError`. Idempotent."""
        self._check_pid()
        with self._lock:
            self._closed = True
            if self._db is not None:
                db, self._db = self._db, None
                with contextlib.suppress(sqlite3.Error):
                    db.close()

    def after_fork_in_child(self) -> None:
        """Forget the parent's connection, lock and claimer id, without using them.

        The inherited connection is parked, never used nor closed (either
        could damage the parent's view of the file); the next call opens a
        connection of the child's own. Claims the parent holds stay the
        parent's.
        """
        if self._db is not None:
            _INHERITED.append(self._db)
        self._db = None
        self._after_fork()

    # -- the machinery -------------------------------------------------------

    def _after_fork(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._claimer = uuid.uuid4().hex

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            self.after_fork_in_child()

    @contextlib.contextmanager
    def _using(self, doing: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock and a connection; turn database failures into SpoolError."""
        self._check_pid()
        with self._lock:
            if self._closed:
                raise SpoolError(f"cannot {doing} the spool at {self.directory}: it is closed")
            if self._db is None:
                self._db = self._open()
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise _failure(doing, self.directory, exc) from None

    @contextlib.contextmanager
    def _transaction(self, doing: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed, or rolled back on error."""
        with self._using(doing) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise

    def _open(self) -> sqlite3.Connection:
        """Make the directory and file, connect, and check (or create) the schema."""
        _make_directory(self.directory)
        _make_file(self.path, self.directory)
        try:
            db = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise _failure("open", self.directory, exc) from None
        try:
            self._prepare(db)
        except BaseException as exc:
            db.close()
            if isinstance(exc, sqlite3.Error):
                raise _failure("open", self.directory, exc) from None
            raise
        return db

    def _prepare(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed event survives the process dying;
        # only an OS crash or a power cut may lose the last few.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA journal_size_limit={4 * 1024 * 1024}")
        if self._max_bytes is not None:
            page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
            db.execute(f"PRAGMA max_page_count={max(self._max_bytes // page_size, 1)}")
        db.execute("BEGIN IMMEDIATE")
        try:
            self._check_schema(db)
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def _check_schema(self, db: sqlite3.Connection) -> None:
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if app_id == _APPLICATION_ID and version == _SCHEMA_VERSION:
            return
        empty = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        if not (empty and app_id == 0 and version == 0):
            raise SpoolError(
                f"cannot open the spool at {self.directory}: {self.path} is not"
                " a produl spool (or is from another version); move it away"
            )
        for statement in _SCHEMA.split(";\n"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA application_id={_APPLICATION_ID}")
        db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")


def _make_directory(directory: str) -> None:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except FileExistsError:
        pass  # a file in the way: reported just below
    except OSError as exc:
        raise _os_failure(f"cannot create the spool directory {directory}", exc) from None
    if not os.path.isdir(directory):
        reason = os.strerror(errno.ENOTDIR)
        raise SpoolError(f"cannot use {directory} as the spool directory: {reason}")


def _make_file(path: str, directory: str) -> None:
    """Create the database file (mode 0o600) here, where the OS's reason is at hand."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise _os_failure(f"cannot open the spool at {directory}", exc) from None
    os.close(fd)


def _os_failure(what: str, exc: OSError) -> SpoolError:
    return SpoolError(f"{what}: {exc.strerror or exc.__class__.__name__}")


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _failure(doing: str, directory: str, exc: sqlite3.Error) -> SpoolError:
    """One line from an SQLite error; a full disk (or ``max_bytes``) says "full"."""
    reason = " ".join(str(exc).split()) or exc.__class__.__name__
    # sqlite_errorcode is new in Python 3.11; before it, the message tells.
    code = getattr(exc, "sqlite_errorcode", None)
    if code == _SQLITE_FULL or "is full" in reason:
        return SpoolError(f"the spool at {directory} is full: {reason}")
    if code == _SQLITE_NOTADB or "not a database" in reason:
        reason = f"{os.path.join(directory, FILENAME)} is damaged or not a database ({reason})"
    return SpoolError(f"cannot {doing} the spool at {directory}: {reason}")
