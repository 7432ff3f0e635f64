"""Per-client token buckets, the way the collector limits request rates."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

#: Buckets idle this long are full again and can be forgotten.
_FORGET_AFTER = 120.0


class RateLimiter:
    """A token bucket per key (a client IP): ``limit`` requests per minute.

    Each bucket holds at most ``limit`` tokens and refills at ``limit / 60``
    tokens per second, so a client may burst up to ``limit`` requests and
    then sustain the per-minute rate. Thread safe.

    Args:
        limit: Requests per minute per key; must be positive.
        clock: Monotonic seconds; replaceable for tests.

    Raises:
        ValueError: If ``limit`` is not positive.
    """

    def __init__(self, limit: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if limit <= 0:
            raise ValueError(f"rate limit must be positive, not {limit}")
        self.limit = limit
        self._rate = limit / 60.0
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (tokens, time of last update)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._last_sweep = clock()

    def acquire(self, key: str) -> int | None:
        """Take one token from ``key``'s bucket.

        Args:
            key: Who is asking, usually the client IP.

        Returns:
            ``None`` when the request may proceed, otherwise the whole number
            of seconds (at least 1) after which a token will be available,
            suitable for a ``Retry-After`` header.
        """
        with self._lock:
            now = self._clock()
            self._sweep(now)
            tokens, last = self._buckets.get(key, (float(self.limit), now))
            tokens = min(float(self.limit), tokens + (now - last) * self._rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return None
            self._buckets[key] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self._rate))

    def reset(self) -> None:
        """Refill every bucket (forget every client)."""
        with self._lock:
            self._buckets.clear()

    def _sweep(self, now: float) -> None:
        # Without this, a collector bound to a public interface would keep one
        # entry per client IP forever.
        if now - self._last_sweep < _FORGET_AFTER:
            return
        self._last_sweep = now
        idle = [k for k, (_, last) in self._buckets.items() if now - last > _FORGET_AFTER]
        for key in idle:
            del self._buckets[key]
