"""The spool: events that could not be sent in time, kept on disk for later.

When the sender cannot deliver an event in time (the shutdown deadline
passed, the queue was full, retries ran out in an outage), it hands the
encoded event to a :class:`Spool` instead of dropping it. Any later process
with the same spool directory, including this one, claims the events back,
sends them, and acknowledges them.

Design, in plain words:

* One SQLite file, ``<directory>/produl-spool.sqlite3``, in WAL mode, holds
  the events of every API URL and server key that use the directory. Each
  row carries a ``key`` (the API URL) and an ``owner``: the fingerprint of
  the server key that tracked it (:func:`~._config.key_fingerprint`, never
  the key), so an event only ever goes back to the collector it was meant
  for, under the key that tracked it. Rows of other URLs and keys are never
  touched. Rows spooled before owners existed (schema 1) have none: no
  client takes them by itself; ``produl-server drain --adopt-unowned``
  sends them under its key, on purpose.
* The directory is created with mode ``0o700`` and the file with ``0o600``:
  the events may carry visitor ids. A directory or file that another user
  owns or may write (group or others) is refused: a shared, world-writable
  spool would let another local user read the events, or plant events that
  leave under this key. A file of ours that others may read is made
  private (``0o600``).
* A row that cannot be sent as it is (a body that is not a BLOB, a visitor
  id that is not text) never holds up the others: a claim moves it to the
  ``quarantine`` table, with the reason, and it is counted there.
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

An event stored by a spool opened with ``max_age`` carries its expiry, and
:meth:`Spool.expire` drops the events (of every URL and key) whose time is
up: the default spool's bound in time (issue #22). Others never expire.

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
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from ._private import RefusedError, check_private_dir, check_private_file
from .exceptions import ProdulError

log = logging.getLogger("produl_server")

__all__ = ["FILENAME", "Spool", "SpoolError", "SpooledEvent"]

FILENAME = "produl-spool.sqlite3"
DEFAULT_MAX_EVENTS = 1_000_000
DEFAULT_BUSY_TIMEOUT = 2.0

#: "PRDL": marks the file as a produl spool (``PRAGMA application_id``).
_APPLICATION_ID = 0x5052444C
_SCHEMA_VERSION = 3
_SCHEMA_1 = """
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
#: From schema 1 to 2: who tracked each event, and a quarantine for bad rows.
_SCHEMA_2 = """
ALTER TABLE events ADD COLUMN owner TEXT;
CREATE INDEX events_by_owner ON events (key, owner, id);
CREATE TABLE quarantine (
    id INTEGER PRIMARY KEY,
    key TEXT,
    owner TEXT,
    body BLOB,
    visitor TEXT,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
"""
#: From schema 2 to 3: when each event may be dropped unsent (issue #22: the
#: default spool keeps events for a bounded time; ``NULL``: never).
_SCHEMA_3 = """
ALTER TABLE events ADD COLUMN expires REAL;
CREATE INDEX events_by_expiry ON events (expires) WHERE expires IS NOT NULL
"""
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26
_MINE = "key = ? AND owner IS ?"
_CLAIMABLE = f"{_MINE} AND (lease_until IS NULL OR lease_until <= ?)"

#: Connections inherited through fork(): never used, only kept referenced so
#: that garbage collection does not close them while the child runs (closing
#: one may run cleanup that pulls the file from under the parent).
_INHERITED: list[sqlite3.Connection] = []


class SpoolError(ProdulError):
    """The spool could not be opened, written or read.

    The message is one line for a user: what failed, the directory, and the
    reason the OS or SQLite gave. It never holds event contents.
    """


class Census(NamedTuple):
    """What a spool holds, seen from one API URL and owner."""

    #: Rows of this URL and owner.
    mine: int
    #: Rows of this URL spooled before owners existed: no client takes them.
    unowned: int
    #: Rows of other URLs or other keys: never touched.
    others: int
    #: Rows moved aside because they cannot be sent (all keys).
    quarantined: int


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
        owner: The fingerprint of the server key that tracks them; ``None``
            stands for the rows spooled before owners existed (adopting them).
        max_events: The most events the file holds, all keys together.
        max_bytes: If given, the largest the database file may grow.
        busy_timeout: Seconds to wait for another process's transaction.
        max_age: If given, the seconds an event stored by :meth:`add` may
            wait; :meth:`expire` drops it after that, sent or not.

    Raises:
        SpoolError: If the directory cannot be created or written, or the file
            is damaged or is not a produl spool.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        key: str,
        owner: str | None = None,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_bytes: int | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        max_age: float | None = None,
    ) -> None:
        if (
            max_events < 0
            or (max_bytes is not None and max_bytes <= 0)
            or (max_age is not None and max_age <= 0)
            or busy_timeout < 0
        ):
            raise ValueError("max_events, max_bytes, max_age and busy_timeout must be positive")
        self.max_age = max_age
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, FILENAME)
        self.key = key
        self.owner = owner
        self.max_events = max_events
        self._max_bytes = max_bytes
        self._busy_timeout = busy_timeout
        self._closed = False
        self._db: sqlite3.Connection | None = None
        #: The reasons of the rows the last claim moved to the quarantine.
        self.quarantined_now: list[str] = []
        self._after_fork()
        with self._lock:
            self._db = self._open()

    # -- the API -------------------------------------------------------------

    def add(self, items: Iterable[tuple[bytes, str | None]]) -> int:
        """Store events ``(body, visitor_id)`` in order, in one transaction.

        Stores at most as many as fit under ``max_events``; the rest of
        ``items`` is not stored (nor consumed). Returns how many were stored.
        """
        expires = None if self.max_age is None else time.time() + self.max_age
        with self._transaction("store events in") as db:
            total = int(db.execute("SELECT events FROM totals").fetchone()[0])
            stored = 0
            for body, visitor in items:
                if total + stored >= self.max_events:
                    break
                db.execute(
                    "INSERT INTO events (key, owner, body, visitor, expires)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (self.key, self.owner, body, visitor, expires),
                )
                stored += 1
            return stored

    def claim(self, limit: int, lease: float, now: float | None = None) -> list[SpooledEvent]:
        """Take up to ``limit`` events, oldest first, for ``lease`` seconds.

        Events nobody holds, and those whose lease has run out (their claimer
        died or stalled), can be claimed. Until :meth:`ack` or :meth:`release`,
        or the lease ends, no other claimer gets them. A row that cannot be
        sent as it is goes to the quarantine instead (see :meth:`quarantine`);
        the others of its batch are claimed as usual.
        """
        if limit < 1 or lease <= 0:
            raise ValueError("claim() needs limit >= 1 and lease > 0")
        now = time.time() if now is None else now
        with self._transaction("claim events from") as db:
            rows = db.execute(
                f"SELECT id, body, visitor FROM events WHERE {_CLAIMABLE} ORDER BY id LIMIT ?",  # noqa: S608
                (self.key, self.owner, now, limit),
            ).fetchall()
            good = [row for row in rows if _unsendable(row) is None]
            bad = [(row[0], _unsendable(row)) for row in rows if _unsendable(row) is not None]
            db.executemany(
                "UPDATE events SET claimer = ?, lease_until = ? WHERE id = ?",
                [(self._claimer, now + lease, row[0]) for row in good],
            )
            for row_id, reason in bad:
                db.execute(
                    "INSERT INTO quarantine (id, key, owner, body, visitor, reason, at)"
                    " SELECT id, key, owner, body, visitor, ?, ? FROM events WHERE id = ?",
                    (reason, time.time(), row_id),
                )
                db.execute("DELETE FROM events WHERE id = ?", (row_id,))
        self.quarantined_now = [reason for _, reason in bad if reason is not None]
        return [SpooledEvent(int(i), bytes(body), visitor) for i, body, visitor in good]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete events that were delivered (or refused for good); return how many.

        Deletes them whoever holds them now: an event delivered late, after
        its lease ran out, needs no second delivery.
        """
        with self._transaction("remove sent events from") as db:
            cursor = db.executemany(
                f"DELETE FROM events WHERE id = ? AND {_MINE}",  # noqa: S608
                [(i, self.key, self.owner) for i in ids],
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

    def expire(self, now: float | None = None) -> int:
        """Drop the events of every URL and key whose time is up; return how many.

        Only events stored with a ``max_age`` have one (the default spool's).
        """
        now = time.time() if now is None else now
        with self._transaction("drop old events from") as db:
            cursor = db.execute("DELETE FROM events WHERE expires <= ?", (now,))
            return max(cursor.rowcount, 0)

    def count(self) -> int:
        """Events stored for this URL and owner, claimed or not."""
        with self._using("count events in") as db:
            sql = f"SELECT count(*) FROM events WHERE {_MINE}"  # noqa: S608
            return int(db.execute(sql, (self.key, self.owner)).fetchone()[0])

    def adopt_unowned(self) -> int:
        """Give this spool's owner the rows of its URL that have none; return how many.

        Those were spooled before rows carried an owner, so nobody can tell
        which key tracked them: only a person may decide they are this key's
        (``produl-server drain --adopt-unowned``).
        """
        if self.owner is None:
            raise ValueError("adopt_unowned() needs a spool with an owner")
        with self._transaction("adopt events in") as db:
            cursor = db.execute(
                "UPDATE events SET owner = ? WHERE key = ? AND owner IS NULL",
                (self.owner, self.key),
            )
            return max(cursor.rowcount, 0)

    def census(self) -> Census:
        """What the file holds for this URL and owner, for others, and in quarantine."""
        with self._using("count events in") as db:
            mine, unowned, total = db.execute(
                "SELECT coalesce(sum(key = ? AND owner IS ?), 0),"
                " coalesce(sum(key = ? AND owner IS NULL), 0), count(*) FROM events",
                (self.key, self.owner, self.key),
            ).fetchone()
            quarantined = db.execute("SELECT count(*) FROM quarantine").fetchone()[0]
        unowned = 0 if self.owner is None else int(unowned)
        return Census(int(mine), unowned, int(total) - int(mine) - unowned, int(quarantined))

    def pending_count(self, now: float | None = None) -> int:
        """Events for this key that a claim could take right now."""
        now = time.time() if now is None else now
        with self._using("count events in") as db:
            sql = f"SELECT count(*) FROM events WHERE {_CLAIMABLE}"  # noqa: S608
            return int(db.execute(sql, (self.key, self.owner, now)).fetchone()[0])

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
        """Make the directory and file, connect, and check (or create) the schema.

        A file that SQLite finds damaged is moved aside (see
        :func:`_move_aside`) and a fresh spool is started in its place.
        """
        try:
            return self._connect()
        except _DamagedError as exc:
            moved = _move_aside(self.path)
            log.warning(
                "produl_server: the spool at %s was damaged (%s); it was moved to %s and a "
                "new spool started. Events in it are not delivered: inspect it with sqlite3",
                self.directory,
                exc,
                moved,
            )
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        _make_directory(self.directory)
        _check_private(self.directory, self.path)
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
                if _damaged(exc):
                    raise _DamagedError(" ".join(str(exc).split())) from None
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
        if empty and app_id == 0 and version == 0:
            _run(db, _SCHEMA_1)
            db.execute(f"PRAGMA application_id={_APPLICATION_ID}")
        elif app_id != _APPLICATION_ID or version not in (1, 2):
            raise SpoolError(
                f"cannot open the spool at {self.directory}: {self.path} is not"
                " a produl spool (or is from another version); move it away"
            )
        if version < 2:
            # Schema 1 to 2: its rows keep no owner, and no client takes them.
            _run(db, _SCHEMA_2)
        # Schema 2 to 3: rows stored before keep no expiry.
        _run(db, _SCHEMA_3)
        db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")


class _DamagedError(Exception):
    """SQLite says the file is damaged or not a database at all."""


_SQLITE_CORRUPT = 11


def _damaged(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    return code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or any(
        sign in text for sign in ("malformed", "not a database")
    )


def _move_aside(path: str) -> str:
    """Rename a damaged database (and its WAL files) out of the way; return the new name."""
    moved = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(path + suffix, moved + suffix)
    return moved


def _check_private(directory: str, path: str) -> None:
    """Refuse a spool that another user owns, may write, or (the file) may read."""
    try:
        check_private_dir(directory, follow=True)
        for suffix in ("", "-wal", "-shm"):
            check_private_file(path + suffix)
    except RefusedError as exc:
        raise SpoolError(
            f"cannot use the spool at {directory}: {exc}. A spool must be private to this "
            "user (chmod 700 on the directory, 600 on its files), or another local user "
            "could read its events or plant some that leave under your key"
        ) from None
    except OSError as exc:
        raise _os_failure(f"cannot use the spool directory {directory}", exc) from None


def _run(db: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";\n"):
        if statement.strip():
            db.execute(statement)


def _unsendable(row: tuple[object, ...]) -> str | None:
    """Why a row ``(id, body, visitor)`` cannot be sent as it is, or None."""
    _, body, visitor = row
    if not isinstance(body, bytes):
        return f"its body is {type(body).__name__}, not bytes (BLOB)"
    if visitor is not None and not isinstance(visitor, str):
        return f"its visitor id is {type(visitor).__name__}, not text"
    return None


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
