"""What a client shares beyond its own process: the host's quota and the spool.

- The quota. By default every client of this user on this host that sends
  to the same ``api_url`` paces against one rolling window, kept in a small
  file (``_hostquota``), because the API's limit is per IP address, not per
  process. ``shared_quota=False`` paces the process alone; ``quota_dir``
  moves the file (a volume shared by containers behind one address).
- The spool (``spool_dir``). What cannot be sent in time is written to an
  SQLite outbox (``_spool``) instead of being dropped, and any later client
  that opens the same directory delivers it first.
- The default spool (no ``spool_dir``; issue #22). Only the exit writes to
  it, what it could not send; the next client with the same key and URL
  delivers it first. It is bounded in time and size, opened only when it
  has something to give or take, and a failure to use it never stops the
  app: the exit's loss line says what happened.

Both are reached only from the sender (and the exit path), never from a
``track_*`` call, except the spool when the queue is full.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from urllib3.util import parse_url

from ._config import MAX_SECONDS, Config, is_loopback, key_fingerprint, mask_url
from ._hostquota import HostQuota
from ._schedule import Quota, RollingQuota
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
#: local collector makes one per run, and nobody would ever claim their
#: leftovers); the file holds at most 100,000 events and 64 MiB, all keys
#: together. Beyond them, events are dropped, counted and logged.
DEFAULT_SPOOL_MAX_AGE = 7 * 86_400.0
DEFAULT_SPOOL_MAX_AGE_LOOPBACK = 3_600.0
DEFAULT_SPOOL_MAX_EVENTS = 100_000
DEFAULT_SPOOL_MAX_BYTES = 64 * 1024 * 1024
#: A busy default spool is waited on for at most this long per call, so an
#: exit that many processes share still ends in time.
DEFAULT_SPOOL_BUSY = 1.0


class HostWideQuota:
    """A :class:`~._hostquota.HostQuota` on the wall clock, as the schedule calls it.

    Processes compare their request times in the shared file, so they need a
    clock they share: the wall clock, not each process's monotonic one.
    """

    kind = "host"

    def __init__(self, host: HostQuota) -> None:
        self.host = host

    def take(self, now: float) -> float:
        return self.host.take(time.time())

    @property
    def used(self) -> int:
        return self.host.used

    @property
    def shared(self) -> bool:
        return self.host.shared

    def after_fork_in_child(self) -> None:
        self.host.after_fork_in_child()


def make_quota(config: Config) -> Quota:
    """The quota a client paces against: the host's, or its own."""
    limit = config.max_requests_per_minute
    if limit is None or not config.shared_quota:
        return RollingQuota(limit)
    if config.quota_dir is None and is_loopback(parse_url(config.api_url).host or ""):
        # A collector on this machine is not Produl's API: a test suite's many
        # clients would wait on each other for a quota nobody enforces.
        # quota_dir (PRODUL_QUOTA_DIR) shares it anyway.
        return RollingQuota(limit)
    return HostWideQuota(HostQuota(limit, config.api_url, config.quota_dir))


class Outbox:
    """The spool as the sender uses it: failures are logged, never raised.

    Args:
        spool: The open spool.
    """

    #: True: only the exit writes to it (the default spool), so a full
    #: queue or an outage drops events as it would without a spool.
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


class DefaultOutbox(Outbox):
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


def open_outbox(config: Config) -> Outbox | None:
    """Open the configured spool, or None without one.

    Raises:
        ConfigurationError: The directory cannot hold a spool (read-only,
            a file, a damaged database); the message is one line.
    """
    if config.spool_dir is None:
        if config.default_spool_dir is None:
            return None
        return DefaultOutbox(config, config.default_spool_dir, lease_from_env())
    lease = lease_from_env()
    try:
        owner = key_fingerprint(config.server_key)
        return Outbox(Spool(config.spool_dir, config.api_url, owner), lease)
    except SpoolError as exc:
        raise ConfigurationError(
            f"spool_dir cannot be used for {mask_url(config.api_url)}: {exc}"
        ) from None
