"""The spool as the sender sees it: one :class:`Outbox` protocol, two homes.

What cannot be sent in time is written to a spool instead of being
dropped, and any later client that opens it delivers it first. The sender
uses every spool through :class:`Outbox`, whatever holds it:

- :class:`SqliteOutbox`: ``spool_dir``, an SQLite file (:mod:`._spool`);
- :class:`~._default_spool.DefaultOutbox`: no ``spool_dir``: the user's
  default spool, an SQLite file too, that only the exit writes to (#22);
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
from collections.abc import Iterable
from typing import Any, Protocol

from ._config import MAX_SECONDS
from ._spool import Census, Spool, SpooledEvent, SpoolError
from .exceptions import ConfigurationError

log = logging.getLogger("produl_server")

#: How long a claimed spooled event stays this sender's; after it, another
#: process may take it (this one died): the cost is a duplicate, never a loss.
#: ``PRODUL_SPOOL_LEASE`` changes it (seconds).
SPOOL_LEASE = 60.0
LEASE_ENV = "PRODUL_SPOOL_LEASE"
#: Spooled events taken per claim.
SPOOL_BATCH = 50


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
