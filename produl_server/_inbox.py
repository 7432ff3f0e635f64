"""The inbox: what ``track_*`` callers hand over, until a sender takes it.

Callers and the sender meet here and nowhere else, under one lock held for
a few list operations, never for I/O. Two lines, both bounded by
``max_queue_size``:

- the queue of encoded bodies, with their sequence numbers and the times
  of its first and last enqueue (the batch triggers of :mod:`._schedule`
  read them);
- the overflow: events a full queue refused, that the sender thread will
  spool (a caller never waits on Redis or on another process's SQLite
  lock, issue #18).

A queued event costs its body and one slot of a deque, nothing else (issue
#22, P4: a ``(body, visitor, seq)`` tuple per event cost 110 bytes more).
What the sender needs besides the body is made when it takes the event:

- its visitor id is read back from the body (:func:`._event.visitor_of`:
  the encoder writes ``"vi"`` first);
- its sequence number comes from the queue's *runs*. The ledger numbers
  events in order, and the queue numbers its own under its lock, so its
  numbers only grow; other numbers are given out meanwhile (an event refused
  at the door, or by the full queue, one taken from the spool), so they may
  skip. A run is where a number skips: the position in the queue's stream
  of its first event and that event's number; the events after it are
  numbered on, up to the next run. A steady stream is one run; the worst, an
  event accepted and one refused in turn, costs 16 bytes per queued event
  (a pair of machine integers), against the 96 of a tuple and an int.
"""

from __future__ import annotations

import array
import collections
import threading
from collections.abc import Callable

from ._event import visitor_of

__all__ = ["Inbox", "Item"]

#: Runs handed out before the array of runs is compacted (see Inbox._hand_out).
_COMPACT_AFTER = 64


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


def _items(bodies: list[bytes], runs: list[tuple[int, int]]) -> list[Item]:
    """Items of *bodies*, numbered by *runs* of ``(first number, count)``."""
    items = []
    index = 0
    for first, count in runs:
        for seq in range(first, first + count):
            body = bodies[index]
            items.append(Item(body, visitor_of(body), seq))
            index += 1
    return items


class Inbox:
    """The bounded queue between callers and the sender (any thread).

    Args:
        size: ``max_queue_size``: the bound of each line.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._queue: collections.deque[bytes] = collections.deque()
        #: The runs, flat: position, first number, position, first number...
        #: A position counts the events queued since the queue was last
        #: empty; ``_taken`` of them were taken.
        self._runs = array.array("q")
        #: Where the oldest run still queued starts in ``_runs``.
        self._head = 0
        self._taken = 0
        #: The number that goes on from the newest run (0: none, a new run starts).
        self._next = 0
        self._overflow: collections.deque[Item] = collections.deque()
        self._first_at = 0.0
        self._last_at = 0.0

    def put(self, body: bytes, accept: Callable[[], int], now: float) -> int:
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
            seq = accept()
            if seq != self._next:
                self._runs.extend((self._taken + waiting, seq))
            self._next = seq + 1
            self._queue.append(body)
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

    def take(self, most: int) -> list[Item]:
        """Take up to *most* events, oldest first (their items are made after the lock)."""
        with self._lock:
            queue = self._queue
            count = min(most, len(queue))
            bodies = [queue.popleft() for _ in range(count)]
            runs = self._hand_out(count)
        return _items(bodies, runs)

    def take_all(self) -> list[Item]:
        """Take every queued event (the end)."""
        with self._lock:
            bodies = list(self._queue)
            self._queue.clear()
            runs = self._hand_out(len(bodies))
        return _items(bodies, runs)

    def _hand_out(self, count: int) -> list[tuple[int, int]]:
        """The numbers of the *count* oldest events, just taken: ``(first, count)`` runs.

        Under the lock. Runs wholly taken are left behind ``_head``; the
        array is emptied when the queue is, and compacted once most of it
        lies behind.
        """
        runs, head = self._runs, self._head
        start = self._taken
        end = start + count
        handed = []
        while start < end:
            position, first = runs[head], runs[head + 1]
            after = head + 2
            stop = runs[after] if after < len(runs) and runs[after] < end else end
            handed.append((first + start - position, stop - start))
            start = stop
            if after < len(runs) and runs[after] == stop:
                head = after
        if not self._queue:
            del runs[:]
            self._head = self._taken = self._next = 0
        else:
            if head >= _COMPACT_AFTER and 2 * head >= len(runs):
                del runs[:head]
                head = 0
            self._head, self._taken = head, end
        return handed

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
