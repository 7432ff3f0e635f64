"""How fast requests arrive: a short per-second history for the live page's chart.

Issue #11, part 5 ("See the pace"): pacing, bursts and a quota shared by
several processes are easier to believe when seen. The collector counts
each answered request to the collection API, and each ``429`` among them,
per wall-clock second, for the last few minutes.

Memory is fixed: one slot per second of the window, reused in a ring. A
slot remembers which second it counts, so a slot left over from an earlier
turn of the ring (or from before the clock stepped) is never mistaken for
a recent one.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

#: Seconds of history the collector keeps (five minutes).
DEFAULT_PACE_WINDOW: Final = 300


@dataclass(frozen=True)
class PaceSecond:
    """What one second saw.

    Attributes:
        t: The second, as whole Unix seconds.
        requests: Requests answered in it, ``429``\\ s included.
        rate_limited: How many of them were answered ``429``.
    """

    t: int
    requests: int
    rate_limited: int

    def as_json(self) -> dict[str, int]:
        """The second as the JSON object ``/api/pace`` lists."""
        return {"t": self.t, "requests": self.requests, "rate_limited": self.rate_limited}


class _Slot:
    __slots__ = ("rate_limited", "requests", "t")

    def __init__(self) -> None:
        self.t = -1
        self.requests = 0
        self.rate_limited = 0


class PaceHistory:
    """Answered requests and ``429``\\ s per second, for the last ``window`` seconds.

    Thread safe; memory does not grow with traffic.

    Args:
        window: Seconds of history to keep; at least 1.
        clock: Unix seconds (``time.time``); replaceable for tests.

    Raises:
        ValueError: If ``window`` is less than 1.
    """

    def __init__(
        self, window: int = DEFAULT_PACE_WINDOW, *, clock: Callable[[], float] = time.time
    ) -> None:
        if window < 1:
            raise ValueError(f"the pace window must be at least one second, not {window}")
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._slots = [_Slot() for _ in range(window)]

    def now(self) -> int:
        """The current second, as whole Unix seconds."""
        return math.floor(self._clock())

    def count(self, *, rate_limited: bool = False) -> None:
        """Count one answered request in the current second.

        Args:
            rate_limited: Whether it was answered ``429``.
        """
        second = self.now()
        with self._lock:
            slot = self._slots[second % self.window]
            if slot.t != second:
                slot.t, slot.requests, slot.rate_limited = second, 0, 0
            slot.requests += 1
            if rate_limited:
                slot.rate_limited += 1

    def seconds(self) -> tuple[int, list[PaceSecond]]:
        """The current second and the busy seconds of the window, oldest first.

        Returns:
            ``(now, seconds)``: seconds without requests are left out, and so
            is any second outside ``(now - window, now]``.
        """
        now = self.now()
        with self._lock:
            found = [
                PaceSecond(slot.t, slot.requests, slot.rate_limited)
                for slot in self._slots
                if now - self.window < slot.t <= now and slot.requests
            ]
        found.sort(key=lambda second: second.t)
        return now, found

    def clear(self) -> None:
        """Forget every second."""
        with self._lock:
            for slot in self._slots:
                slot.t, slot.requests, slot.rate_limited = -1, 0, 0
