"""Pacing: the :class:`Quota` protocol and the rolling window.

Pure: nothing here reads a clock, sleeps or does I/O. Each call takes
``now``, seconds on the sender's monotonic clock, and answers in seconds.

- :class:`RollingQuota`: at most N requests in any rolling window (the
  API's "2,000 requests per minute per IP"). A burst of up to N goes out at
  once; request N+1 waits until the oldest one leaves the window.

The quotas shared beyond the process meet the same protocol: the host's
(:class:`~._hostquota.HostWideQuota`, which places ``now`` on the wall
clock the host's processes share) and a fleet's in Redis
(:class:`~._redis.FleetQuota`, whose window Redis stamps with its own
clock; ``now`` paces its fallback while Redis does not answer).
"""

from __future__ import annotations

import collections
from typing import Any, Protocol

__all__ = ["QUOTA_WINDOW", "Quota", "RollingQuota", "kept_in"]

#: The quota window, with a margin for the request's trip to the collector:
#: a request sent just inside our window may arrive just outside the API's.
QUOTA_WINDOW = 61.0


class RollingQuota:
    """At most *limit* requests in any rolling *window* seconds."""

    #: What ``stats.quota`` shows: this process's own window.
    kind = "memory"

    def __init__(self, limit: int | None, window: float = QUOTA_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._sent: collections.deque[float] = collections.deque()

    def wait(self, now: float) -> float:
        """Seconds until one more request fits (0: it fits now)."""
        if self.limit is None:
            return 0.0
        sent = self._sent
        horizon = now - self.window
        while sent and sent[0] <= horizon:
            sent.popleft()
        if len(sent) < self.limit:
            return 0.0
        return sent[0] - horizon

    def take(self, now: float) -> float:
        """Use one request of the quota if it fits; else the seconds to wait."""
        wait = self.wait(now)
        if not wait and self.limit is not None:
            self._sent.append(now)
        return wait

    @property
    def used(self) -> int:
        """Requests counted in the window (as of the last call)."""
        return len(self._sent)


class Quota(Protocol):
    """What the schedule needs of a quota: this one, the host's, or a fleet's in Redis."""

    @property
    def kind(self) -> str:
        """``memory``, ``host`` or ``redis``: where the window is kept."""

    def take(self, now: float) -> float:
        """0 and one request used, or the seconds to wait first.

        Args:
            now: The sender's clock (monotonic seconds). A quota kept beyond
                the process says how it places this on a clock it shares.
        """

    @property
    def used(self) -> int:
        """Requests counted in the window."""


def kept_in(quota: Any) -> str:
    """What ``stats.quota`` shows: where the window is kept right now.

    The host's quota paces this process alone while its lock is held by a
    stopped process or its file was given up; ``stats`` then says
    ``memory``, not ``host`` (#18, item 14). With Redis down, the same
    holds for its fallback.
    """
    kind: str = quota.kind
    if kind == "host":
        host = getattr(quota, "fallback", quota)
        if getattr(host, "shared", True) is False:
            return "memory"
    return kind
