"""The spool as the sender sees it: one :class:`Outbox` protocol, two homes.

What cannot be sent in time is written to a spool instead of being
dropped, and any later client that opens it delivers it first. The sender
uses every spool through :class:`Outbox`, whatever holds it:

- :class:`SqliteOutbox`: ``spool_dir``, an SQLite file (:mod:`._spool`);
- :class:`DefaultOutbox`: no ``spool_dir``: the user's default spool, an
  SQLite file too, that only the exit writes to (issue #22): what it could
  not send. It is bounded in time and size, opened only when it has
  something to give or take, and a failure to use it never stops the app;
- :class:`~._redis.FleetOutbox`: ``redis_url``, a Stream in Redis, with
  ``spool_dir`` as its fallback while Redis does not answer.

Failures are logged, never raised. Reached only from the sender (and the
exit path), never from a ``track_*`` call, except the local spool when the
queue is full.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterable
from typing import Any, Protocol

from urllib3.util import parse_url

from ._config import MAX_SECONDS, Config, is_loopback, key_fingerprint
from ._spool import FILENAME, Census, Spool, SpooledEvent, SpoolError
from .exceptions import ConfigurationError

log = logging.getLogger("produl_server")

#: How long a claimed spooled event stays this sender's; after it, another
#: process may take it (this one died): the cost is a duplicate, never a loss.
#: ``PRODUL_SPOOL_LEASE`` changes it (seconds).
SPOOL_LEASE = 60.0
LEASE_ENV = "PRODUL_SPOOL_LEASE"
#: Spooled events taken per claim.
SPOOL_BATCH = 50

#: The default spool's bounds (issue #22): an event waits at most a week
#: (an hour for a collector on this machine, whose keys are throwaway: the
#: local collector makes one URL per run, and nobody would ever claim their
#: leftovers); the file holds at most 100,000 events and 64 MiB, all keys
#: together. Beyond them, events are dropped, counted and logged.
DEFAULT_SPOOL_MAX_AGE = 7 * 86_400.0
DEFAULT_SPOOL_MAX_AGE_LOOPBACK = 3_600.0
DEFAULT_SPOOL_MAX_EVENTS = 100_000
DEFAULT_SPOOL_MAX_BYTES = 64 * 1024 * 1024
#: A busy default spool is waited on for at most this long per call, so an
#: exit that many processes share still ends in time.
DEFAULT_SPOOL_BUSY = 1.0


class Outbox(Protocol):
    """What the sender needs of a spool."""

    #: Where the events are kept, for log lines.
    directory: str
    #: Seconds a claim stays this sender's.
    lease: float
    #: Events this outbox moved to the quarantine.
    quarantined: int
    #: True: only the exit writes to it (the default spool), so a full
    #: queue or an outage drops events as it would without a spool.
    exit_only: bool

    def keep(self, items: Iterable[tuple[bytes, str | None]], *, caller: bool = False) -> int:
        """Spool events; return how many were kept (*caller*: on a ``track_*`` thread)."""

    def take(self) -> list[SpooledEvent]:
        """Claim the next few spooled events for this sender."""

    def done(self, ids: list[Any]) -> None:
        """Remove delivered (or refused) events."""

    def give_back(self, ids: list[Any]) -> None:
        """Return claimed events unsent, for whoever comes next."""

    def count(self) -> int:
        """Events spooled now (0 when it cannot tell)."""

    def worth_a_look(self) -> bool:
        """Whether a new client should start its sender to look in the spool at once.

        Asked on the constructing thread: a spool that cannot answer at once
        (Redis) says yes and lets the sender look.
        """

    def problem(self) -> str | None:
        """Why the spool's contents cannot be told now, or None."""

    def census(self) -> Census | None:
        """What the spool holds for this key and for others (None if it cannot tell)."""

    def adopt_unowned(self) -> int:
        """Make this key's the events of its URL that no key owns; return how many."""

    def after_fork_in_child(self) -> None:
        """Reopen what a forked child must not share."""

    def close(self) -> None:
        """Close the spool (the client has finished)."""


class SqliteOutbox:
    """The ``spool_dir`` spool as the sender uses it: failures are logged, never raised.

    Args:
        spool: The open spool.
    """

    exit_only = False

    def __init__(self, spool: Spool, lease: float = SPOOL_LEASE) -> None:
        self._spool: Spool | None = spool
        self.lease = lease
        self.directory = str(spool.directory)
        #: Rows this outbox moved to the quarantine.
        self.quarantined = 0
        self._reported: set[str] = set()

    @property
    def spool(self) -> Spool:
        """The open spool (raises :class:`SpoolError` when it cannot be had)."""
        if self._spool is None:  # pragma: no cover - only DefaultOutbox opens late
            raise SpoolError(f"the spool at {self.directory} is not open")
        return self._spool

    def keep(self, items: Iterable[tuple[bytes, str | None]], *, caller: bool = False) -> int:
        """Write events to the spool; return how many it took (0 on failure).

        Args:
            items: (body, visitor id) pairs.
            caller: Called on a ``track_*`` caller's thread (a full queue).
        """
        try:
            return self.spool.add(items)
        except SpoolError as exc:
            self._report(exc)
            return 0

    def take(self) -> list[SpooledEvent]:
        """Claim the next few spooled events for this sender."""
        try:
            events = self.spool.claim(SPOOL_BATCH, self.lease)
        except SpoolError as exc:
            self._report(exc)
            return []
        for reason in self.spool.quarantined_now:
            self.quarantined += 1
            self._report_once(
                f"a spooled event cannot be sent ({reason}); it was moved to the quarantine "
                f"table of {self.spool.path}, and the others go on"
            )
        return events

    def done(self, ids: list[Any]) -> None:
        """Remove delivered (or refused) events."""
        try:
            self.spool.ack(ids)
        except SpoolError as exc:
            self._report(exc)

    def give_back(self, ids: list[Any]) -> None:
        """Return claimed events unsent, for whoever comes next."""
        try:
            self.spool.release(ids)
        except SpoolError as exc:
            self._report(exc)

    def count(self) -> int:
        try:
            return self.spool.count()
        except SpoolError as exc:
            self._report(exc)
            return 0

    def worth_a_look(self) -> bool:
        return self.count() > 0

    def problem(self) -> str | None:
        """Why the spool's contents cannot be told now, or None (SQLite: never)."""
        return None

    def census(self) -> Census | None:
        """What the spool holds for this key and for others (None if it cannot tell)."""
        try:
            return self.spool.census()
        except SpoolError as exc:
            self._report(exc)
            return None

    def adopt_unowned(self) -> int:
        """Make this key's the events of its URL that no key owns; return how many."""
        try:
            return self.spool.adopt_unowned()
        except SpoolError as exc:
            self._report(exc)
            return 0

    def after_fork_in_child(self) -> None:
        self.spool.after_fork_in_child()

    def close(self) -> None:
        """Close the database (the client has finished)."""
        self.spool.close()

    def _report(self, exc: SpoolError) -> None:
        self._report_once(str(exc))

    def _report_once(self, text: str) -> None:
        # One line per distinct cause: a full disk fails every write.
        if text not in self._reported:
            self._reported.add(text)
            log.error("produl_server: %s", text)


class DefaultOutbox(SqliteOutbox):
    """The user's default spool: written only at exit, bounded, opened lazily.

    Nothing is opened (nor created) until there is something to keep, or
    the file exists and may hold this key's leftovers: a client that never
    leaves any costs one ``stat``. Opening it drops the events whose time
    is up (all keys), and says how many. A failure (a read-only or full
    disk, another user's directory) is logged once, and the client goes on
    without it.

    Args:
        config: The client's configuration.
        directory: Its ``default_spool_dir``.
        lease: The claim lease, in seconds.
    """

    exit_only = True

    def __init__(self, config: Config, directory: str, lease: float = SPOOL_LEASE) -> None:
        self.directory = directory
        self.lease = lease
        self.quarantined = 0
        #: Events this client dropped from the spool because their time was up.
        self.expired = 0
        self._reported: set[str] = set()
        self._config = config
        local = is_loopback(parse_url(config.api_url).host or "")
        self.max_age = DEFAULT_SPOOL_MAX_AGE_LOOPBACK if local else DEFAULT_SPOOL_MAX_AGE
        self._spool: Spool | None = None
        self._failure: str | None = None
        self._open_lock = threading.Lock()

    @property
    def spool(self) -> Spool:
        """The open spool; opened on first use. Raises SpoolError."""
        with self._open_lock:
            if self._spool is None:
                self._spool = self._open()
            return self._spool

    def _open(self) -> Spool:
        if self._failure is not None:
            raise SpoolError(self._failure)
        try:
            spool = Spool(
                self.directory,
                self._config.api_url,
                key_fingerprint(self._config.server_key),
                max_events=DEFAULT_SPOOL_MAX_EVENTS,
                max_bytes=DEFAULT_SPOOL_MAX_BYTES,
                busy_timeout=DEFAULT_SPOOL_BUSY,
                max_age=self.max_age,
            )
            expired = spool.expire()
        except SpoolError as exc:
            # Once: an exit that cannot write it must not try again per event.
            self._failure = str(exc)
            raise
        if expired:
            self.expired += expired
            log.warning(
                "produl_server: %d event(s) older than the default spool's bound (a week; "
                "an hour for a collector on this machine) were dropped from %s unsent",
                expired,
                self.directory,
            )
        return spool

    def _exists(self) -> bool:
        return self._spool is not None or os.path.exists(os.path.join(self.directory, FILENAME))

    def keep(self, items: Iterable[tuple[bytes, str | None]], *, caller: bool = False) -> int:
        rows = list(items)
        kept = super().keep(rows, caller=caller)
        if 0 < kept < len(rows):
            log.warning(
                "produl_server: the default spool at %s is full (%d events, all keys): "
                "%d event(s) could not be kept",
                self.directory,
                DEFAULT_SPOOL_MAX_EVENTS,
                len(rows) - kept,
            )
        return kept

    def take(self) -> list[SpooledEvent]:
        return super().take() if self._exists() else []

    def count(self) -> int:
        return super().count() if self._exists() else 0

    def census(self) -> Census | None:
        return super().census() if self._exists() else Census(0, 0, 0, 0)

    def adopt_unowned(self) -> int:
        return super().adopt_unowned() if self._exists() else 0

    def after_fork_in_child(self) -> None:
        self._open_lock = threading.Lock()
        if self._spool is not None:
            self._spool.after_fork_in_child()

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()

    def _report(self, exc: SpoolError) -> None:
        self._report_once(
            f"{exc}. Events the exit could not send are not kept; set spool_dir "
            "(PRODUL_SPOOL_DIR) to a writable directory, or spool_dir=False "
            "(PRODUL_SPOOL_DIR=off) to go without"
        )


def lease_from_env() -> float:
    """The spool lease: ``PRODUL_SPOOL_LEASE`` seconds, else :data:`SPOOL_LEASE`.

    Raises:
        ConfigurationError: The variable is not a number of seconds in range.
    """
    text = os.environ.get(LEASE_ENV)
    if text is None:
        return SPOOL_LEASE
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_SECONDS:
        raise ConfigurationError(
            f"{LEASE_ENV} must be seconds, more than 0 and at most {MAX_SECONDS:g}"
        )
    return value
