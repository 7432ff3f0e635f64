"""The ledger: what happened to every event a client accepted.

Every event gets a sequence number when it is accepted, and is *handled*
exactly once: sent, or dropped for a reason. ``flush()`` waits, on one
:class:`threading.Condition`, until every event up to a target number is
handled. Events finish out of order (several requests in flight, a retry,
events refused by a full queue while thousands wait in it), so the ledger
keeps a low-water mark: every number up to it is handled, and those handled
above it are kept as runs of consecutive numbers until the gaps close. A
run costs the same for one event as for a million refused in a row, so the
ledger's memory follows the gaps (at most the events pending), never the
events handled.

The counters only ever grow, so a snapshot is consistent at any moment:
``queued == sent + dropped_total + pending``.
"""

from __future__ import annotations

import bisect
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
            alone, also while the host's file is out of use, its lock held
            by a stopped process), ``host`` (every process of this host) or
            ``redis`` (a fleet, with ``redis_url``; ``host`` or ``memory`` while Redis
            does not answer, as of the sender's last call to it).
        quota_used: Requests in that window as last seen: fleet-wide with
            ``redis``, host-wide with ``host``.
        quarantined: Spooled events this client found it could not send
            as they are (a damaged row or stream entry) and moved to the
            spool's quarantine, where they stay for a person to look at.
        backlog: Events in the spool (this client's key and URL, whoever
            spooled them), as last counted: each time this client takes
            events from it, and at the end when it took some or spooled
            some. Those still there at the end wait for the next client that
            opens the spool, or for ``produl-server drain``. 0 without a
            spool, or when this client never looked at a backlog.
    """

    queued: int
    sent: int
    retried: int
    dropped: dict[str, int]
    pending: int
    spooled: int = 0
    quota: str = "memory"
    quota_used: int = 0
    quarantined: int = 0
    backlog: int = 0

    @property
    def dropped_total(self) -> int:
        """All dropped events, whatever the reason."""
        return sum(self.dropped.values())


class Ledger:
    """Counters and the flush condition of one client."""

    def __init__(self) -> None:
        # Entered as the bare lock, also to notify or wait on the condition
        # it guards: a C call, not the Condition's Python methods (the
        # caller and the sender each enter it once per event).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._accepted = 0
        #: Every sequence number up to this one is handled.
        self._low = 0
        self._runs = _Runs()
        self._sent = 0
        self._retried = 0
        self._dropped: collections.Counter[str] = collections.Counter()
        self._spooled = 0
        #: What each waiting :meth:`wait` waits for; they are woken once the
        #: mark reaches the lowest, not at every event (issue #19, P2: a
        #: ``flush()`` waiting on 3,000 events cost 3,000 thread switches).
        self._targets: list[int] = []

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
        with self._lock:
            if seq <= self._low or seq in self._runs:
                return False
            if spooled:
                self._spooled += 1
            elif dropped is None:
                self._sent += 1
            else:
                self._dropped[dropped] += 1
            self._handled(seq)
            return True

    def _handled(self, seq: int) -> None:
        """Move the mark past *seq*, or keep it in a run; wake waiters. Under the lock."""
        if seq == self._low + 1:
            self._low = self._runs.take_from(seq + 1) or seq
        else:
            self._runs.add(seq)
        if self._targets and self._low >= self._targets[0]:
            self._cond.notify_all()

    def is_handled(self, seq: int) -> bool:
        """Whether event *seq* was handled already."""
        with self._lock:
            return seq <= self._low or seq in self._runs

    def refuse(self, reason: str) -> None:
        """Count an event that was accepted and dropped at once (at the door)."""
        with self._lock:  # one lock for both: a full queue refuses every call
            self._accepted += 1
            self._dropped[reason] += 1
            self._handled(self._accepted)

    def count_retry(self) -> None:
        with self._lock:
            self._retried += 1

    def abandon(self, reason: str) -> int:
        """Drop every event not handled yet; return how many there were."""
        with self._lock:
            left = self._accepted - self._low - len(self._runs)
            if left:
                self._dropped[reason] += left
            self._low = self._accepted
            self._runs = _Runs()
            self._cond.notify_all()
            return left

    def wait(self, target: int, timeout: float | None) -> bool:
        """Wait until every event up to *target* is handled, or *timeout*."""
        with self._lock:
            bisect.insort(self._targets, target)
            try:
                return self._cond.wait_for(lambda: self._low >= target, timeout)
            finally:
                self._targets.remove(target)

    def done_through(self, target: int) -> bool:
        """Whether every event up to *target* is handled."""
        return self._low >= target

    @property
    def pending(self) -> int:
        with self._lock:
            return self._accepted - self._low - len(self._runs)

    def stats(self) -> Stats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return Stats(
                queued=self._accepted,
                sent=self._sent,
                retried=self._retried,
                dropped=dict(self._dropped),
                pending=self._accepted - self._low - len(self._runs),
                spooled=self._spooled,
            )


class _Runs:
    """Sequence numbers handled above the low-water mark, as runs ``[start, end]``.

    ``len()`` is how many numbers the runs hold. Not thread-safe: the
    ledger's lock guards it.
    """

    __slots__ = ("_count", "_ends", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, seq: int) -> bool:
        index = bisect.bisect_right(self._starts, seq) - 1
        return index >= 0 and seq <= self._ends[index]

    def add(self, seq: int) -> None:
        """Add one number that no run holds."""
        starts, ends = self._starts, self._ends
        index = bisect.bisect_right(starts, seq)  # the run after seq
        joins_before = index > 0 and ends[index - 1] == seq - 1
        joins_after = index < len(starts) and starts[index] == seq + 1
        if joins_before and joins_after:
            ends[index - 1] = ends[index]
            del starts[index], ends[index]
        elif joins_before:
            ends[index - 1] = seq
        elif joins_after:
            starts[index] = seq
        else:
            starts.insert(index, seq)
            ends.insert(index, seq)
        self._count += 1

    def take_from(self, seq: int) -> int | None:
        """Remove the run that starts at *seq*, if any; return where it ends."""
        starts = self._starts
        if not starts or starts[0] != seq:
            return None
        end = self._ends[0]
        del starts[0], self._ends[0]
        self._count -= end - seq + 1
        return end
