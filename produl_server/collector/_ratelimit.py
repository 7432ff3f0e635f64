"""Per-client request limits in the three shapes Produl might run.

Produl documents its limits (2,000 keyed and 200 keyless requests per minute
per IP) but not the shape of the window (issue #11), so the collector can run
each of them:

``"bucket"`` (the default)
    A token bucket per client: it holds at most N tokens and refills at N per
    window (N/60 per second for a minute). A client may burst N requests,
    then sustain the rate.
``"fixed"``
    A fixed window per client: it opens at the client's first request, allows
    N requests, and its count drops to zero at once when it ends. Up to 2N
    requests fit in any 60 s that straddles two windows.
``"sliding"``
    A rolling window: a request is allowed when fewer than N of the client's
    requests were allowed in the window before it.

Refused requests never count against the quota in any shape, so a client
that retries politely always gets through eventually.
"""

from __future__ import annotations

import abc
import collections
import math
import threading
import time
from collections.abc import Callable
from typing import Final, Literal, get_args

RateLimitMode = Literal["fixed", "sliding", "bucket"]
#: The window shapes, in the order the CLI lists them.
RATE_LIMIT_MODES: Final[tuple[str, ...]] = get_args(RateLimitMode)
DEFAULT_RATE_LIMIT_MODE: Final = "bucket"
#: Produl's limits are per minute.
DEFAULT_WINDOW: Final = 60.0


class _Quota(abc.ABC):
    """One client's quota: ``limit`` requests per ``window`` seconds."""

    def __init__(self, limit: int, window: float, now: float) -> None:
        self.limit = limit
        self.window = window
        #: When the client was last seen; idle quotas are forgotten.
        self.seen = now

    @abc.abstractmethod
    def take(self, now: float) -> float | None:
        """Count one request, or refuse it.

        Returns:
            ``None`` when allowed, else the seconds until one would be.
        """

    def idle(self, now: float) -> bool:
        """Whether the quota is as good as new and can be forgotten."""
        return now - self.seen > max(self.window * 2, 120.0)


class _Bucket(_Quota):
    def __init__(self, limit: int, window: float, now: float) -> None:
        super().__init__(limit, window, now)
        self.tokens = float(limit)
        self.rate = limit / window

    def take(self, now: float) -> float | None:
        # max(): a clock that steps back must not drain the bucket.
        elapsed = max(0.0, now - self.seen)
        self.tokens = min(float(self.limit), self.tokens + elapsed * self.rate)
        self.seen = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return (1.0 - self.tokens) / self.rate


class _FixedWindow(_Quota):
    def __init__(self, limit: int, window: float, now: float) -> None:
        super().__init__(limit, window, now)
        self.opened = now
        self.count = 0

    def take(self, now: float) -> float | None:
        self.seen = now
        if now >= self.opened + self.window:
            self.opened, self.count = now, 0
        if self.count < self.limit:
            self.count += 1
            return None
        return self.opened + self.window - now


class _SlidingWindow(_Quota):
    def __init__(self, limit: int, window: float, now: float) -> None:
        super().__init__(limit, window, now)
        self.allowed: collections.deque[float] = collections.deque()

    def take(self, now: float) -> float | None:
        self.seen = now
        while self.allowed and self.allowed[0] <= now - self.window:
            self.allowed.popleft()
        if len(self.allowed) < self.limit:
            self.allowed.append(now)
            return None
        return self.allowed[0] + self.window - now


_SHAPES: Final[dict[str, type[_Quota]]] = {
    "bucket": _Bucket,
    "fixed": _FixedWindow,
    "sliding": _SlidingWindow,
}


class RateLimiter:
    """A quota per key (a client IP): ``limit`` requests per ``window`` seconds.

    Thread safe. The module docstring describes the three ``mode`` shapes.

    Args:
        limit: Requests per window per key; must be positive.
        mode: ``"bucket"`` (default), ``"fixed"`` or ``"sliding"``.
        window: The window in seconds: 60 like Produl; shorter ones make
            tests of the limit quick.
        clock: Monotonic seconds; replaceable for tests.

    Raises:
        ValueError: If ``limit`` or ``window`` is not positive, or ``mode``
            is unknown.
    """

    def __init__(
        self,
        limit: int,
        *,
        mode: str = DEFAULT_RATE_LIMIT_MODE,
        window: float = DEFAULT_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit <= 0:
            raise ValueError(f"rate limit must be positive, not {limit}")
        if not window > 0:
            raise ValueError(f"rate limit window must be positive, not {window}")
        if mode not in _SHAPES:
            raise ValueError(f"rate limit mode must be one of {RATE_LIMIT_MODES}, not {mode!r}")
        self.limit = limit
        self.mode = mode
        self.window = float(window)
        self._shape = _SHAPES[mode]
        self._clock = clock
        self._lock = threading.Lock()
        self._quotas: dict[str, _Quota] = {}
        self._last_sweep = clock()

    def acquire(self, key: str) -> int | None:
        """Count one request from ``key``, or refuse it.

        Args:
            key: Who is asking, usually the client IP.

        Returns:
            ``None`` when the request may proceed, otherwise the whole number
            of seconds (at least 1) after which one will be allowed,
            suitable for a ``Retry-After`` header.
        """
        with self._lock:
            now = self._clock()
            self._sweep(now)
            quota = self._quotas.get(key)
            if quota is None:
                quota = self._quotas[key] = self._shape(self.limit, self.window, now)
            wait = quota.take(now)
        if wait is None:
            return None
        # The epsilon keeps float noise (19.000000001) from adding a second.
        return max(1, math.ceil(wait - 1e-9))

    def reset(self) -> None:
        """Forget every client: each starts again with a full quota."""
        with self._lock:
            self._quotas.clear()

    def _sweep(self, now: float) -> None:
        # Without this, a collector bound to a public interface would keep one
        # entry per client IP forever.
        if now - self._last_sweep < 120.0:
            return
        self._last_sweep = now
        for key in [k for k, quota in self._quotas.items() if quota.idle(now)]:
            del self._quotas[key]
