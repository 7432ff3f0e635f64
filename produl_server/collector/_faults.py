"""Faults a test can inject into the collector's answers to ``POST``."""

from __future__ import annotations

import collections
import threading

import attrs


@attrs.frozen
class Fault:
    """What to do with one ``POST``: answer ``status``, or drop the connection.

    Attributes:
        status: The status to answer; ``None`` means close without answering.
        retry_after: Seconds for a ``Retry-After`` header, if any.
    """

    status: int | None
    retry_after: float | None = None


class Faults:
    """A thread-safe queue of faults plus the latency and hang switches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: collections.deque[Fault] = collections.deque()
        self.latency = 0.0
        #: Set while POSTs may be answered; cleared by :meth:`hang`.
        self.released = threading.Event()
        self.released.set()

    def add(self, fault: Fault, count: int) -> None:
        """Queue ``fault`` for the next ``count`` POSTs, after those already queued.

        Args:
            fault: The fault.
            count: How many POSTs it applies to.

        Raises:
            ValueError: If ``count`` is negative.
        """
        if count < 0:
            raise ValueError(f"count must not be negative, not {count}")
        with self._lock:
            self._queue.extend([fault] * count)

    def take(self) -> Fault | None:
        """The fault for the POST being answered now, if any.

        Returns:
            The next queued fault, or ``None`` to answer normally.
        """
        with self._lock:
            return self._queue.popleft() if self._queue else None

    def clear(self) -> None:
        """Forget queued faults, latency and any hang."""
        with self._lock:
            self._queue.clear()
            self.latency = 0.0
            self.released.set()
