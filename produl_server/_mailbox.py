"""What crosses threads at the sender thread, each under its own lock.

- :class:`Mailbox`: messages to the sender (a flush, the exit deadline, a
  look in the spool) and what it tells back (it is resting; what it found
  in the spool, for a flush that waits on the backlog).
- :class:`Hands`: the events the sender holds, waiting or in flight. The
  sender changes them; the thread that finishes at the deadline reads them.

Every field here is read and written under its object's lock, never
through the GIL alone, and never copied and retried (issue #19).
"""

from __future__ import annotations

import collections
import threading
from typing import Protocol

from ._inbox import Item

__all__ = ["Hands", "Mailbox"]


class Mailbox:
    """Requests to the sender thread, and its answers (any thread)."""

    def __init__(self, backlog: bool = False) -> None:
        # Entered as the bare lock (a C call; the sender reads the mail
        # several times per event), waited on as the condition.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._flush_to = 0
        self._deadline: float | None = None
        self._spool_asked = False
        self._resting = False
        #: Whether the sender's last look in the spool found events, and the
        #: last sequence number it gave them.
        self._backlog = backlog
        self._taken_to = 0

    def flush(self, target: int) -> None:
        """Send every event up to *target* now."""
        with self._lock:
            self._flush_to = max(self._flush_to, target)

    def set_deadline(self, deadline: float | None) -> None:
        """The exit deadline: send what is left until then."""
        with self._lock:
            self._deadline = deadline

    def deadline(self) -> float | None:
        """The exit deadline, if the exit has begun."""
        with self._lock:
            return self._deadline

    def ask_spool(self) -> None:
        """Look in the spool at the next step."""
        with self._lock:
            self._spool_asked = True

    def read(self) -> tuple[int, float | None, bool]:
        """``(flush_to, deadline, spool asked)`` for this step (sender thread).

        The sender is awake: it rests no more, and the spool request is taken.
        """
        with self._lock:
            asked, self._spool_asked = self._spool_asked, False
            self._resting = False
            return self._flush_to, self._deadline, asked

    def rest(self) -> None:
        """The sender waits for time or lanes now, not for events (sender thread)."""
        with self._lock:
            self._resting = True

    def resting(self) -> bool:
        """Whether one more event would change nothing for the sender."""
        with self._lock:
            return self._resting

    def looked(self, taken_to: int) -> None:
        """The sender looked in the spool: it took events up to *taken_to*, or none (0)."""
        with self._lock:
            self._backlog = bool(taken_to)
            if taken_to:
                self._taken_to = taken_to
            self._cond.notify_all()

    def backlog_after(self, target: int, timeout: float | None) -> int | None:
        """Whether a flush up to *target* must go on with events taken from the spool.

        Waits (at most *timeout*) until the sender has looked in the spool
        after taking events up to *target*, if it had a backlog.

        Returns:
            The new target (the last event taken from the spool), *target*
            itself when there is nothing more to wait for, or None at the
            timeout.
        """
        with self._lock:
            if not self._cond.wait_for(
                lambda: not self._backlog or self._taken_to > target, timeout
            ):
                return None
            return max(target, self._taken_to)


class _Lanes(Protocol):
    @property
    def any_busy(self) -> bool: ...

    def is_free(self, visitor: str | None) -> bool: ...


class Hands:
    """The events a sender holds: waiting (in order) and in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: collections.deque[Item] = collections.deque()
        self._in_flight: list[Item] = []

    def add(self, items: list[Item]) -> None:
        """Hold more events, after those held."""
        if items:
            with self._lock:
                self._pending.extend(items)

    def waiting(self) -> int:
        """Events held and not under way."""
        with self._lock:
            return len(self._pending)

    def in_flight(self) -> int:
        """Events with a request under way."""
        with self._lock:
            return len(self._in_flight)

    def idle(self) -> bool:
        """Whether nothing is held."""
        with self._lock:
            return not self._pending and not self._in_flight

    def next_ready(self, lanes: _Lanes) -> int | None:
        """The first waiting event that may go now without overtaking its visitor."""
        with self._lock:
            if not lanes.any_busy:
                return 0 if self._pending else None
            for index, item in enumerate(self._pending):
                if lanes.is_free(item.visitor):
                    return index
            return None

    def start(self, index: int) -> tuple[Item, bool]:
        """Move one waiting event in flight; return it, and whether it is alone there."""
        with self._lock:
            item = self._pending[index]
            del self._pending[index]
            alone = not self._in_flight
            self._in_flight.append(item)
            return item, alone

    def settled(self, item: Item, *, again: bool) -> None:
        """Its request is over; *again*: back in front of all not yet sent, in queue order."""
        with self._lock:
            self._in_flight.remove(item)
            if again:
                pending = self._pending
                position = 0
                while position < len(pending) and pending[position].seq < item.seq:
                    position += 1
                pending.insert(position, item)

    def snapshot(self) -> tuple[list[Item], list[Item]]:
        """``(waiting, in flight)``: what is still held (any thread)."""
        with self._lock:
            return list(self._pending), list(self._in_flight)
