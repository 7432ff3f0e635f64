"""One thread that runs a callback for every watched call still running at its deadline.

A socket timeout bounds each wait, not a call: a peer that drips one byte
per wait holds a call as long as it likes. A call that must end on time
registers its deadline and what ends it (shutting its socket down); past
the deadline this thread runs that, and the call fails at once. The thread
is a daemon, started on first use in each process (after ``fork()`` too),
and woken only for a deadline earlier than the one it waits for.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

from ._threads import start_thread

__all__ = ["Deadlines", "Watch"]


class Watch:
    """One call being watched: its deadline and what ends it."""

    __slots__ = ("deadline", "end", "expired")

    def __init__(self, deadline: float, end: Callable[[], object]) -> None:
        self.deadline = deadline
        self.end = end
        self.expired = False


class Deadlines:
    """The watchdog: :meth:`start` before a call, :meth:`stop` after it.

    Args:
        name: The thread's name.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._watches: set[Watch] = set()
        self._pid = 0
        self._next_wake = 0.0
        self._watching = False

    def start(self, seconds: float, end: Callable[[], object]) -> Watch:
        """Watch a call that must end within *seconds*; *end* ends it if not."""
        watch = Watch(time.monotonic() + seconds, end)
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._watches = set()
                self._wake = threading.Condition(self._lock)
                self._next_wake = 0.0
                self._watching = start_thread(self._run, self._name)
            if not self._watching:
                # No thread could start (interpreter exit on Python 3.12+):
                # the call is bounded by its socket timeouts alone.
                return watch
            self._watches.add(watch)
            if watch.deadline < self._next_wake:
                self._next_wake = watch.deadline
                self._wake.notify()
        return watch

    def stop(self, watch: Watch) -> None:
        """The call ended (in time or not)."""
        with self._lock:
            self._watches.discard(watch)

    def _run(self) -> None:
        pid = os.getpid()
        while True:
            with self._lock:
                if self._pid != pid:
                    return
                now = time.monotonic()
                due = [watch for watch in self._watches if watch.deadline <= now]
                for watch in due:
                    self._watches.discard(watch)
                    watch.expired = True
                if not due:
                    self._next_wake = min(
                        (watch.deadline for watch in self._watches), default=now + 60
                    )
                    self._wake.wait(max(self._next_wake - now, 0.001))
                    continue
            for watch in due:  # outside the lock: ending a call may take a moment
                with contextlib.suppress(Exception):  # ending it is best effort
                    watch.end()
