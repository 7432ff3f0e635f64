"""Lanes: extra connections for a backlog at real latency.

With a backlog and requests that take a while, the sender thread hands
events to lane threads (``produl-server.sender-N``, at most
``max_in_flight``, more while the process exits) and keeps that many
requests in flight, never two of one visitor, so each visitor's events
arrive in order. A lane only sends: it reports each outcome back as a
message, and the sender thread settles it. Everything here runs on the
sender thread but the lanes' own loop and what :class:`LaneThreads` does
under its lock: :meth:`Lanes.close` and :meth:`Lanes.start_ahead` may run
on another.

Lanes started ahead. While the process exits the sender opens more lanes
(:func:`~._config.exit_lanes`), but on Python 3.12 no thread can start
then (:data:`~._threads.STARTS_AT_EXIT`): there the exit's lanes are
started before it, and wait on the job queue until it needs them. Two
moments start them:

- Each event that leaves ``flush_at`` or more waiting (when the caller
  nudges the sender) starts one more lane, on the caller's thread, up to
  the exit's cap, unless requests are known to take under
  :data:`LANE_LATENCY` (then the exit would not use them). A script that
  tracks a burst and ends may end before the sender thread first runs
  (1,000 calls take about 3 ms, less than the interpreter's 5 ms thread
  switch interval): only the caller is sure to run before the exit. One
  per event spreads the cost (a thread start, 0.2 to 0.5 ms) over the
  burst, and a short burst starts few.
- The first time the sender opens lanes during normal running (a backlog
  at latency), it starts them all: a later burst, or a spooled backlog
  (no caller queues that), finds them there.

A lane started ahead costs a stack while it waits, and nothing else: the
sender hands out at most as many requests as :meth:`Lanes.limit` allows
(``max_in_flight`` while the process runs), whichever lane takes them, so
the quota, the order of each visitor's events and the connections in use
are those of a Python that starts lanes at exit.
"""

from __future__ import annotations

import collections
import math
import queue
import threading
from collections.abc import Callable

from ._accounts import Accounts
from ._config import exit_lanes
from ._inbox import Item
from ._threads import STARTS_AT_EXIT, start_thread
from ._transport import Outcome, Transport

__all__ = ["LANE_LATENCY", "LaneThreads", "Lanes"]

#: Lanes pay off once a request takes this long: on a faster link the
#: extra threads cost more CPU than they save time.
LANE_LATENCY = 0.003


class LaneThreads:
    """The lane threads of one sender: started, opened, ended (any thread, under a lock).

    Args:
        run: What each lane thread runs.
        cap: The most lanes: :func:`~._config.exit_lanes`.
    """

    def __init__(self, run: Callable[[], object], cap: int) -> None:
        self._run = run
        self._cap = cap
        #: Reentrant: a finalizer that tracks an event while this thread
        #: starts a lane comes back here.
        self._lock = threading.RLock()
        #: Threads started, and lanes open: the most the sender has wanted at
        #: once. Threads started ahead wait for the exit to open them.
        self._started = 0
        self._opened = 0
        #: Closed: no more threads. Refused: one could not start (interpreter exit).
        self._closed = False
        self._refused = False
        #: Whether the last request was faster than LANE_LATENCY.
        self._fast = False

    def grow(self, wanted: int, *, ahead: bool) -> None:
        """Open lanes up to *wanted*, starting those not running; *ahead*: all of them.

        One start per hold of the lock: a caller starting one ahead waits
        for one start at most, never for all.
        """
        target = max(wanted, self._cap) if ahead else wanted
        while True:
            with self._lock:
                if self._started >= target or not self._start():
                    self._opened = max(self._opened, min(wanted, self._started))
                    return

    def one_ahead(self) -> None:
        """Start one more lane for the exit, unless the link is fast or all are there."""
        with self._lock:
            if not self._fast and self._started < self._cap:
                self._start()

    def link_is_fast(self, fast: bool) -> None:
        """Whether the last request was faster than LANE_LATENCY (on each change)."""
        with self._lock:
            self._fast = fast

    def _start(self) -> bool:
        """Start one lane thread, under the lock; False if none may start."""
        if self._closed or self._refused:
            return False
        self._started += 1  # first: a reentrant call names the next one
        if not start_thread(self._run, f"produl-server.sender-{self._started}"):
            # At interpreter exit no thread can start: carry on with the
            # lanes there are, or with the sender alone.
            self._started -= 1
            self._refused = True
            return False
        return True

    def opened(self) -> int:
        """Lanes open: the most the sender has wanted at once."""
        with self._lock:
            return self._opened

    def usable(self, wanted: int) -> int:
        """*wanted*, or the lanes started once no more can start."""
        with self._lock:
            return min(wanted, self._started) if self._refused else wanted

    def close(self) -> int:
        """Start no more; how many threads there are to end."""
        with self._lock:
            self._closed = True
            return self._started


class Lanes:
    """The lane threads of one sender, and what they tell it.

    Args:
        accounts: The sender's accounts (the clock, the attempt, the config).
        wake: The sender's wake-up event, set when a lane is done.
    """

    def __init__(self, accounts: Accounts, wake: threading.Event) -> None:
        self._acc = accounts
        self._wake = wake
        self._jobs: queue.SimpleQueue[tuple[Transport, Item, float | None] | None] = (
            queue.SimpleQueue()
        )
        #: What the lanes finished: (item, outcome, seconds it took).
        self._done: collections.deque[tuple[Item, Outcome, float]] = collections.deque()
        cap = exit_lanes(accounts.config.max_in_flight)
        self._threads = LaneThreads(self._lane, cap)
        #: Whether the exit's lanes start ahead: no thread can start at exit
        #: here, and the exit may open more than one (set once).
        self.ahead = not STARTS_AT_EXIT and cap > 1
        #: Whether the last request was fast, as last told to the threads
        #: (sender thread only).
        self._fast = False
        #: Requests in flight per visitor (sender thread only).
        self._busy: collections.Counter[str] = collections.Counter()
        #: Smoothed seconds per request, and the last one (sender thread only).
        self._latency = 0.0
        self._last_latency = 0.0

    @property
    def round_trip(self) -> float:
        """What a request takes, as far as the sender knows: the larger estimate."""
        return max(self._latency, self._last_latency)

    def is_free(self, visitor: str | None) -> bool:
        """Whether an event of *visitor* may go now without overtaking another."""
        return visitor is None or not self._busy[visitor]

    @property
    def any_busy(self) -> bool:
        """Whether any lane has a visitor's request in flight."""
        return bool(self._busy)

    def timed(
        self, transport: Transport, item: Item, timeout: float | None
    ) -> tuple[Outcome, float]:
        """One attempt, and the seconds it took."""
        clock = self._acc.clock
        started = clock()
        outcome = self._acc.attempt(transport, item, timeout)
        return outcome, clock() - started

    def record(self, seconds: float) -> None:
        """Learn from one request's round trip (sender thread)."""
        self._last_latency = seconds
        self._latency += (seconds - self._latency) * 0.2
        if self.ahead:
            fast = self.round_trip < LANE_LATENCY
            if fast is not self._fast:
                self._fast = fast
                self._threads.link_is_fast(fast)

    def hand(self, item: Item, timeout: float | None) -> None:
        """Give one event to the next free lane (sender thread)."""
        if item.visitor is not None:
            self._busy[item.visitor] += 1
        self._jobs.put((self._acc.get_transport(), item, timeout))

    def collect(self) -> list[tuple[Item, Outcome]]:
        """What the lanes finished since the last call (sender thread)."""
        done = self._done
        finished = []
        while done:
            item, outcome, seconds = done.popleft()
            self.record(seconds)
            if item.visitor is not None:
                self._busy[item.visitor] -= 1
                if not self._busy[item.visitor]:
                    del self._busy[item.visitor]
            finished.append((item, outcome))
        return finished

    def grow(self, wanted: int) -> None:
        """Open lanes up to *wanted* (sender thread); with :attr:`ahead`, start all."""
        self._threads.grow(wanted, ahead=self.ahead)

    def start_ahead(self) -> None:
        """A full batch waits: start one more lane for the exit (any thread).

        Only with :attr:`ahead`; see the module's docstring.
        """
        self._threads.one_ahead()

    def count(self) -> int:
        """Lanes open: the most the sender has wanted at once (sender thread)."""
        return self._threads.opened()

    def close(self) -> None:
        """End every lane once its request is done (any thread)."""
        for _lane in range(self._threads.close()):
            self._jobs.put(None)

    def limit(self, backlog: int, exit_left: float | None) -> int:
        """How many requests may be in flight now.

        With a backlog at real latency, up to ``max_in_flight``; without one,
        or on a fast link, one, so one kept-alive connection carries it all.
        While the process exits (*exit_left* seconds left), more: see
        :meth:`_exit_lanes`.
        """
        latency = self.round_trip
        if latency < LANE_LATENCY:
            return 1
        config = self._acc.config
        if exit_left is not None and config.max_in_flight > 1:
            wanted = self._exit_lanes(backlog, latency, exit_left)
        elif backlog <= config.flush_at:
            return 1
        else:
            wanted = min(config.max_in_flight, math.ceil(latency / LANE_LATENCY))
        return max(1, self._threads.usable(wanted))

    def _exit_lanes(self, backlog: int, latency: float, left: float) -> int:
        """Lanes while exiting: enough to send the backlog in half the time left.

        Half, for a margin (the ramp, slower answers, visitors with many
        events in a row), up to :func:`~._config.exit_lanes`. Lanes already
        open stay in use to the end, the last few events included: the time
        left shrinks with the backlog, so "just enough" never finishes. (Open,
        not started: lanes started ahead wait to be opened like any other.)
        """
        config = self._acc.config
        needed = math.ceil(backlog * latency / (max(left, 0.002) / 2))
        normal = min(config.max_in_flight, math.ceil(latency / LANE_LATENCY))
        return min(max(needed, normal, self.count()), exit_lanes(config.max_in_flight))

    def _lane(self) -> None:
        """One lane: sends what the sender hands it, reports back."""
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:  # closed
                return
            transport, item, timeout = job
            self._done.append((item, *self.timed(transport, item, timeout)))
            self._wake.set()
