"""The inbox: what ``track_*`` callers hand over, until a sender takes it.

Callers and the sender meet here and nowhere else, under one lock held for
a few list operations, never for I/O. Two lines, both bounded by
``max_queue_size``:

- the queue of :data:`Queued` tuples, with the times of its first and last
  enqueue (the batch triggers of :mod:`._schedule` read them);
- the overflow: events a full queue refused, that the sender thread will
  spool (a caller never waits on Redis or on another process's SQLite
  lock, issue #18).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

__all__ = ["Inbox", "Item", "Queued"]

#: What the queue holds: ``(body, visitor, seq)``. A tuple of a bytes, a str
#: and an int, which the garbage collector stops tracking the first time it
#: sees it: a queue of 100,000 events costs a full collection about 4 ms,
#: not the 18 ms of as many objects (issue #22, P6). The sender makes each
#: one an :class:`Item` when it takes it.
Queued = tuple[bytes, "str | None", int]


class Item:
    """One event in a sender's hands, with what the caller knew about it."""

    __slots__ = ("body", "failing_since", "seq", "spool_id", "visitor")

    def __init__(self, body: bytes, visitor: str | None, seq: int) -> None:
        self.body = body
        self.visitor = visitor
        self.seq = seq
        #: Its row in the spool, for an event this sender took from there.
        self.spool_id: int | str | None = None
        #: When this event's retry time started running (None: it has not).
        self.failing_since: float | None = None


class Inbox:
    """The bounded queue between callers and the sender (any thread).

    Args:
        size: ``max_queue_size``: the bound of each line.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._queue: collections.deque[Queued] = collections.deque()
        self._overflow: collections.deque[Item] = collections.deque()
        self._first_at = 0.0
        self._last_at = 0.0

    def put(self, body: bytes, visitor: str | None, accept: Callable[[], int], now: float) -> int:
        """Queue one event, numbered by *accept* only once it has room.

        One lock per call on the caller's path: a full queue is found and
        refused here, before any number or object is made for the event.

        Returns:
            How many wait now; 0 when the queue is full and nothing was
            queued or numbered.
        """
        with self._lock:
            waiting = len(self._queue)
            if waiting >= self.size:
                return 0
            self._queue.append((body, visitor, accept()))
            if not waiting:
                self._first_at = now
            self._last_at = now
            return waiting + 1

    def waiting(self) -> int:
        """Events queued and not taken yet."""
        with self._lock:
            return len(self._queue)

    def times(self) -> tuple[int, float, float]:
        """``(waiting, first_at, last_at)``: what the batch triggers need, read at once."""
        with self._lock:
            return len(self._queue), self._first_at, self._last_at

    def take(self, most: int) -> list[Queued]:
        """Take up to *most* events, oldest first."""
        with self._lock:
            queue = self._queue
            count = min(most, len(queue))
            return [queue.popleft() for _ in range(count)]

    def take_all(self) -> list[Queued]:
        """Take every queued event (the end)."""
        with self._lock:
            taken = list(self._queue)
            self._queue.clear()
            return taken

    def refused(self, item: Item) -> int:
        """Keep an event the full queue refused, for the sender to spool.

        Returns:
            How many wait to be spooled now, or 0 when that line is full too.
        """
        with self._lock:
            if len(self._overflow) >= self.size:
                return 0
            self._overflow.append(item)
            return len(self._overflow)

    def has_refused(self) -> bool:
        """Whether refused events wait to be spooled."""
        with self._lock:
            return bool(self._overflow)

    def take_refused(self) -> list[Item]:
        """Take every refused event."""
        with self._lock:
            taken = list(self._overflow)
            self._overflow.clear()
            return taken
