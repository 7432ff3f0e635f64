"""What a client shares beyond its own process: the host's quota and the spool.

- The quota. By default every client of this user on this host that sends
  to the same ``api_url`` paces against one rolling window, kept in a small
  file (``_hostquota``), because the API's limit is per IP address, not per
  process. ``shared_quota=False`` paces the process alone; ``quota_dir``
  moves the file (a volume shared by containers behind one address).
- The spool (``spool_dir``). What cannot be sent in time is written to an
  SQLite outbox (``_spool``) instead of being dropped, and any later client
  that opens the same directory delivers it first.

Both are reached only from the sender (and the exit path), never from a
``track_*`` call, except the spool when the queue is full.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable
from typing import Any

from urllib3.util import parse_url

from ._config import MAX_SECONDS, Config, is_loopback, key_fingerprint, mask_url
from ._hostquota import HostQuota
from ._schedule import Quota, RollingQuota
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

    def __init__(self, spool: Spool, lease: float = SPOOL_LEASE) -> None:
        self.spool = spool
        self.lease = lease
        self.directory = str(spool.directory)
        #: Rows this outbox moved to the quarantine.
        self.quarantined = 0
        self._reported: set[str] = set()

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
        return None
    lease = lease_from_env()
    try:
        owner = key_fingerprint(config.server_key)
        return Outbox(Spool(config.spool_dir, config.api_url, owner), lease)
    except SpoolError as exc:
        raise ConfigurationError(
            f"spool_dir cannot be used for {mask_url(config.api_url)}: {exc}"
        ) from None
