"""The ledger: what happened to every event a client accepted.

Every event gets a sequence number when it is accepted, and is *handled*
exactly once: sent, or dropped for a reason. ``flush()`` waits, on one
:class:`threading.Condition`, until every event up to a target number is
handled. Events finish out of order (several requests in flight, a retry),
so the ledger keeps a low-water mark: every number up to it is handled, and
the few handled above it wait in a set until the gap closes.

The counters only ever grow, so a snapshot is consistent at any moment:
``queued == sent + dropped_total + pending``.
"""

from __future__ import annotations

import collections
import threading

import attrs


@attrs.frozen(kw_only=True)
class Stats:
    """A snapshot of one client's delivery counters.

    Every event a ``track_*`` call hands over is counted once in
    :attr:`queued`, and ends counted once in :attr:`sent`, :attr:`spooled`
    or :attr:`dropped`; until then it is :attr:`pending`. So, at any moment,
    ``queued == sent + spooled + dropped_total + pending``, and after a
    shutdown ``pending == 0``.

    Attributes:
        queued: Events handed over by ``track_*`` calls since the client
            started, including those refused at the door (``invalid`` with
            ``raise_on_invalid=False``, ``queue_full``, after shutdown), and
            events this client took from the spool to deliver.
        sent: Events the collector acknowledged (2xx).
        retried: Attempts that failed and were scheduled again (429, 5xx,
            timeouts, connection errors).
        dropped: Events given up, by reason: ``invalid``, ``queue_full``,
            ``rejected``, ``unauthorized``, ``retries_exhausted``,
            ``shutdown``; ``before_send`` (the hook returned ``None``) and
            ``before_send_error`` (the hook raised).
        pending: Events queued or waiting for a retry right now.
        spooled: Events written to (or left in) the spool for a later
            client to deliver: at the shutdown deadline, when the queue was
            full, or out of retry time in an outage.
        quota: Where the pacing window is kept: ``memory`` (this process
            alone), ``host`` (every process of this host) or ``redis`` (a
            fleet, with ``redis_url``; ``host`` or ``memory`` while Redis
            does not answer, as of the sender's last call to it).
        quota_used: Requests in that window as last seen: fleet-wide with
            ``redis``, host-wide with ``host``.
    """

    queued: int
    sent: int
    retried: int
    dropped: dict[str, int]
    pending: int
    spooled: int = 0
    quota: str = "memory"
    quota_used: int = 0

    @property
    def dropped_total(self) -> int:
        """All dropped events, whatever the reason."""
        return sum(self.dropped.values())


class Ledger:
    """Counters and the flush condition of one client."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._accepted = 0
        #: Every sequence number up to this one is handled.
        self._low = 0
        self._above: set[int] = set()
        self._sent = 0
        self._retried = 0
        self._dropped: collections.Counter[str] = collections.Counter()
        self._spooled = 0
        self._waiters = 0

    def accept(self) -> int:
        """Count one event in; return its sequence number (from 1)."""
        with self._lock:  # the caller's path: the bare lock is the cheapest
            self._accepted += 1
            return self._accepted

    @property
    def accepted(self) -> int:
        """The last sequence number given out: a flush waits up to it."""
        return self._accepted

    def finish(self, seq: int, dropped: str | None = None, *, spooled: bool = False) -> bool:
        """Mark one event handled: sent, spooled, or dropped for *dropped*.

        Returns:
            False when the event was handled already (given up at the
            shutdown deadline while its request was still in flight).
        """
        with self._cond:
            if seq <= self._low or seq in self._above:
                return False
            if spooled:
                self._spooled += 1
            elif dropped is None:
                self._sent += 1
            else:
                self._dropped[dropped] += 1
            if seq == self._low + 1:
                low = seq
                above = self._above
                while low + 1 in above:
                    low += 1
                    above.discard(low)
                self._low = low
            else:
                self._above.add(seq)
            if self._waiters:
                self._cond.notify_all()
            return True

    def is_handled(self, seq: int) -> bool:
        """Whether event *seq* was handled already."""
        with self._lock:
            return seq <= self._low or seq in self._above

    def refuse(self, reason: str) -> None:
        """Count an event that was accepted and dropped at once (at the door)."""
        self.finish(self.accept(), reason)

    def count_retry(self) -> None:
        with self._cond:
            self._retried += 1

    def abandon(self, reason: str) -> int:
        """Drop every event not handled yet; return how many there were."""
        with self._cond:
            left = self._accepted - self._low - len(self._above)
            if left:
                self._dropped[reason] += left
            self._low = self._accepted
            self._above.clear()
            self._cond.notify_all()
            return left

    def wait(self, target: int, timeout: float | None) -> bool:
        """Wait until every event up to *target* is handled, or *timeout*."""
        with self._cond:
            self._waiters += 1
            try:
                return self._cond.wait_for(lambda: self._low >= target, timeout)
            finally:
                self._waiters -= 1

    def done_through(self, target: int) -> bool:
        """Whether every event up to *target* is handled."""
        return self._low >= target

    @property
    def pending(self) -> int:
        with self._cond:
            return self._accepted - self._low - len(self._above)

    def stats(self) -> Stats:
        """A consistent snapshot of the counters."""
        with self._cond:
            return Stats(
                queued=self._accepted,
                sent=self._sent,
                retried=self._retried,
                dropped=dict(self._dropped),
                pending=self._accepted - self._low - len(self._above),
                spooled=self._spooled,
            )
