"""Lanes: extra connections for a backlog at real latency.

With a backlog and requests that take a while, the sender thread hands
events to lane threads (``produl-server.sender-N``, at most
``max_in_flight``, more while the process exits) and keeps that many
requests in flight, never two of one visitor, so each visitor's events
arrive in order. A lane only sends: it reports each outcome back as a
message, and the sender thread settles it. Everything here but the lane
threads' own loop runs on the sender thread; :meth:`Lanes.close` may run on
another, under the lock that guards the lane list.
"""

from __future__ import annotations

import collections
import math
import queue
import threading

from ._accounts import Accounts
from ._config import exit_lanes
from ._inbox import Item
from ._threads import signals_blocked
from ._transport import Outcome, Transport

__all__ = ["LANE_LATENCY", "Lanes"]

#: Lanes pay off once a request takes this long: on a faster link the
#: extra threads cost more CPU than they save time.
LANE_LATENCY = 0.003


class Lanes:
    """The lane threads of one sender, and what they tell it.

    Args:
        accounts: The sender's accounts (the clock, the attempt, the config).
        wake: The sender's wake-up event, set when a lane is done.
    """

    def __init__(self, accounts: Accounts, wake: threading.Event) -> None:
        self._acc = accounts
        self._wake = wake
        self._jobs: queue.SimpleQueue[tuple[Item, float | None] | None] = queue.SimpleQueue()
        #: What the lanes finished: (item, outcome, seconds it took).
        self._done: collections.deque[tuple[Item, Outcome, float]] = collections.deque()
        #: Guards the thread list and the two flags below (close() may run elsewhere).
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        #: Set when a lane could not start (interpreter exit): no more tries.
        self._no_new = False
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

    def hand(self, item: Item, timeout: float | None) -> None:
        """Give one event to the next free lane (sender thread)."""
        if item.visitor is not None:
            self._busy[item.visitor] += 1
        self._jobs.put((item, timeout))

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

    def grow(self, wanted: int, transport: Transport) -> None:
        """Start lanes up to *wanted* (sender thread)."""
        with self._lock:
            while len(self._threads) < wanted and not (self._no_new or self._closed):
                lane = threading.Thread(
                    target=self._lane,
                    args=(transport,),
                    name=f"produl-server.sender-{len(self._threads) + 1}",
                    daemon=True,
                )
                try:
                    with signals_blocked():
                        lane.start()
                except RuntimeError:
                    # At interpreter exit no thread can start: carry on with
                    # the lanes there are, or with the sender alone.
                    self._no_new = True
                    return
                self._threads.append(lane)

    def count(self) -> int:
        """Lanes started."""
        with self._lock:
            return len(self._threads)

    def close(self) -> None:
        """End every lane once its request is done (any thread)."""
        with self._lock:
            self._closed = True
            for _lane in self._threads:
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
        if self._no_new:
            wanted = min(wanted, self.count())
        return max(1, wanted)

    def _exit_lanes(self, backlog: int, latency: float, left: float) -> int:
        """Lanes while exiting: enough to send the backlog in half the time left.

        Half, for a margin (the ramp, slower answers, visitors with many
        events in a row), up to :func:`~._config.exit_lanes`. Lanes already
        running stay in use to the end, the last few events included: the
        time left shrinks with the backlog, so "just enough" never finishes.
        """
        config = self._acc.config
        needed = math.ceil(backlog * latency / (max(left, 0.002) / 2))
        normal = min(config.max_in_flight, math.ceil(latency / LANE_LATENCY))
        return min(max(needed, normal, self.count()), exit_lanes(config.max_in_flight))

    def _lane(self, transport: Transport) -> None:
        """One lane: sends what the sender hands it, reports back."""
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:  # closed
                return
            item, timeout = job
            self._done.append((item, *self.timed(transport, item, timeout)))
            self._wake.set()
