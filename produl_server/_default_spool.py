"""The user's default spool: what the exit could not send, kept for the next run (issue #22).

With no ``spool_dir`` (and no ``redis_url``), a client's exit writes what it
could not send before ``shutdown_timeout`` to an SQLite spool in the user's
state directory (``Config.default_spool_dir``), and the next client with the
same key and URL sends it first. Only the exit writes to it: a running
client's full queue and outages drop as without a spool. It is bounded in
time and size, opened only when it has something to give or take, and a
failure to use it never stops the app: it is logged once, and the exit's
loss line says the events are lost.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

from urllib3.util import parse_url

from ._config import Config, is_loopback, key_fingerprint
from ._outbox import SPOOL_LEASE, SqliteOutbox
from ._spool import FILENAME, Census, Spool, SpooledEvent, SpoolError

log = logging.getLogger("produl_server")

__all__ = ["DefaultOutbox"]

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
