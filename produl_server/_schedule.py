"""When to send: pure scheduling rules, with the time passed in.

Nothing here sleeps, reads a clock or does I/O: every method takes ``now``
(seconds on a monotonic clock) and answers with a number of seconds. The
sender reads the clock and sleeps; the unit tests pass numbers and check
the answers, so every rule is tested in microseconds.

- :class:`Batching`: a batch is due at ``flush_at`` queued events, or
  ``flush_interval`` after the last enqueue, capped at ``max_delay`` after
  the first.
- :class:`Schedule`: the triggers, the quota (:mod:`._quota`), the
  backoff (exponential, full jitter, ``Retry-After`` first) and the outage
  clock behind ``max_retry_time``.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable

from ._config import Config
from ._quota import Quota, RollingQuota

__all__ = ["Batching", "Schedule", "Verdict"]


class Batching:
    """The three batch triggers."""

    def __init__(self, flush_at: int, flush_interval: float, max_delay: float) -> None:
        self.flush_at = flush_at
        self.flush_interval = flush_interval
        self.max_delay = max_delay

    def due_in(self, now: float, waiting: int, first_at: float, last_at: float) -> float | None:
        """0 when a batch is due; else the seconds until one is, or None for never.

        Args:
            now: The current time.
            waiting: Events queued and not yet taken by the sender.
            first_at: When the oldest of them was queued.
            last_at: When the newest of them was queued.
        """
        if waiting >= self.flush_at:
            return 0.0
        if not waiting:
            return None
        due_at = min(last_at + self.flush_interval, first_at + self.max_delay)
        return max(0.0, due_at - now)


class Verdict(enum.Enum):
    """What to do with an event after a failed attempt."""

    RETRY = "retry"
    GIVE_UP = "give_up"


class Schedule:
    """Batching, pacing, backoff and the outage clock of one sender.

    Args:
        config: The client's configuration.
        uniform: The jitter source, ``random.uniform`` by default.
        quota: The pacing quota; a :class:`RollingQuota` of
            ``max_requests_per_minute`` by default.
    """

    def __init__(
        self,
        config: Config,
        uniform: Callable[[float, float], float] = random.uniform,
        quota: Quota | None = None,
    ) -> None:
        self.batching = Batching(config.flush_at, config.flush_interval, config.max_delay)
        self.quota: Quota = quota or RollingQuota(config.max_requests_per_minute)
        self._initial = config.retry_initial_delay
        self._max = config.retry_max_delay
        self._max_retry_time = config.max_retry_time
        self._uniform = uniform
        #: Consecutive failures: the backoff grows with them.
        self.failures = 0
        #: No request before this time (a backoff or a Retry-After).
        self.not_before = 0.0
        #: When the quota last said it would have room again (for the loss line).
        self.quota_free_at = 0.0
        #: When the collector stopped answering; None while it answers.
        self.outage_since: float | None = None

    def gate(self, now: float) -> float:
        """0 and one request of the quota used, or the seconds to wait first."""
        if now < self.not_before:
            return self.not_before - now
        wait = self.quota.take(now)
        if wait > 0:
            self.quota_free_at = now + wait
        return wait

    def answered(self) -> None:
        """The collector answered (2xx, or a definitive 4xx): no outage."""
        self.failures = 0
        self.outage_since = None

    def failed(
        self,
        now: float,
        *,
        rate_limited: bool,
        retry_after: float | None,
        failing_since: float | None,
    ) -> tuple[Verdict, float, float | None]:
        """Judge one failed attempt of an event that has failed since *failing_since*.

        A 429 never uses up retry time: the collector asked for patience. Any
        other failure starts the outage clock, and an event's retry time runs
        from the start of the outage it failed in, so in a long outage each
        later event gets one attempt and the queue keeps draining.

        Returns:
            The verdict, the pause before the next attempt, and the event's
            new ``failing_since`` (None while its clock does not run).
        """
        if rate_limited:
            self.outage_since = None
        else:
            if self.outage_since is None:
                self.outage_since = now
            if failing_since is None:
                failing_since = self.outage_since
            if now - failing_since >= self._max_retry_time:
                return Verdict.GIVE_UP, 0.0, failing_since
        self.failures += 1
        if retry_after is not None:
            pause = retry_after
        else:
            pause = self.backoff()
            if failing_since is not None:
                # The last try falls when the retry time runs out, not up to
                # one backoff after it: max_retry_time is the bound a user
                # sees (the CLI's --timeout 3 took 5 s).
                pause = min(pause, max(0.0, failing_since + self._max_retry_time - now))
        self.not_before = max(self.not_before, now + pause)
        return Verdict.RETRY, pause, failing_since

    def backoff(self) -> float:
        """Full jitter under a ceiling that doubles per failure, up to ``retry_max_delay``."""
        ceiling = self._initial * 2 ** min(max(self.failures - 1, 0), 30)
        return self._uniform(0.0, min(self._max, ceiling))
