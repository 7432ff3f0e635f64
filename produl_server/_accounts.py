"""What becomes of each event: sent, retried, spooled or dropped.

:class:`Accounts` is what both delivery loops (:mod:`._sender`) share: it
settles each attempt's outcome with the :class:`~._schedule.Schedule`,
writes to and takes from the spool, reports drops to the log and the
``on_error`` hook, and closes the books once at the end. The
:class:`~._ledger.Ledger` counts every event from acceptance to its end;
``flush()`` waits on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ._config import Config
from ._inbox import Inbox, Item
from ._ledger import Ledger
from ._outbox import Outbox
from ._quota import Quota
from ._reports import Reports, Throttled
from ._schedule import Schedule, Verdict
from ._transport import Outcome, Transport
from ._transport import Verdict as Answer
from .exceptions import DeliveryError

log = logging.getLogger("produl_server")

__all__ = ["Accounts", "Clock"]

Clock = Callable[[], float]

#: How long a second thread waits for the one finishing (writing the spool,
#: reporting) before it goes on: the exit may outlast its budget by this much.
FINISH_WAIT = 2.0


class _End:
    """The end of the books: begun once, done once, with what was lost."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.begun = threading.Event()
        self.done = threading.Event()
        self.lost = 0
        #: Events in the spool as last counted (see Stats.backlog), under the lock.
        self.backlog = 0
        #: Whether this client took events from the spool, under the lock.
        self.took = False
        #: Why the last attempt failed, for the loss line at the end (issue
        #: #23: "not delivered" without a cause), under the lock.
        self.cause = ""


class Accounts:
    """What becomes of each event, for whichever loop sends it.

    Both loops hand every attempt's outcome to :meth:`settle`; the events
    that cannot go on are spooled (:meth:`spool`) or dropped and reported
    (:meth:`drop`); :meth:`finish` closes the books once.

    Args:
        config: The client's configuration.
        transport_factory: Builds the transport, on first use.
        clock: The sender's monotonic clock.
        quota: The pacing quota (:mod:`._wiring` built it).
        outbox: The spool, or None without one.
    """

    def __init__(
        self,
        config: Config,
        transport_factory: Callable[[Config], Transport],
        clock: Clock,
        quota: Quota,
        outbox: Outbox | None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.ledger = Ledger()
        self.inbox = Inbox(config.max_queue_size)
        self.schedule = Schedule(config, quota=quota)
        self.outbox = outbox
        self._warn_unspilled = Throttled(60.0, clock)
        self.reports = Reports(config)
        self._transport: Transport | None = None
        self._make_transport = transport_factory
        self._end = _End()

    @property
    def finished(self) -> bool:
        """Whether :meth:`finish` has begun (read anew each time, from any thread)."""
        return self._end.begun.is_set()

    @property
    def lost(self) -> int:
        """Events given up at the end (0 before it)."""
        return self._end.lost

    @property
    def last_cause(self) -> str:
        """What the last failed attempt said ("" if none failed), from any thread."""
        with self._end.lock:
            return self._end.cause

    @property
    def backlog(self) -> int:
        """Events in the spool as last counted (see :attr:`~._ledger.Stats.backlog`)."""
        with self._end.lock:
            return self._end.backlog

    def _count_backlog(self) -> None:
        if self.outbox is not None:
            count = self.outbox.count()
            with self._end.lock:
                self._end.backlog = count

    @property
    def transport(self) -> Transport | None:
        """The transport, if one was made."""
        return self._transport

    def get_transport(self) -> Transport:
        """The transport, made on first use (by the sender, before any lane starts)."""
        if self._transport is None:
            self._transport = self._make_transport(self.config)
        return self._transport

    def attempt(self, transport: Transport, item: Item, timeout: float | None) -> Outcome:
        """One POST; a bug below us becomes a retry, never a lost event."""
        try:
            return transport.send(item.body, timeout)
        except Exception as exc:
            # No traceback for an encoding error: its message holds the
            # string it could not encode, which may be a header (the key).
            log.error(
                "produl_server: unexpected error in the sender (%s); continuing",
                type(exc).__name__,
                exc_info=not isinstance(exc, UnicodeError),
            )
            return Outcome(Answer.RETRY, None, None, "internal", type(exc).__name__)

    def settle(self, item: Item, outcome: Outcome) -> bool:
        """Account for one attempt. True when the event must be tried again."""
        if self.finished:
            # Given up at the deadline from another thread; and at interpreter
            # exit a daemon thread must not write to stderr any more.
            return False
        if outcome.verdict is Answer.DELIVERED:
            self.schedule.answered()
            self.ledger.finish(item.seq)
            self._unspool(item)
            return False
        if outcome.verdict is Answer.DROP:
            # The event itself is bad (or the key is): never retry it, and
            # never let it hold up the events behind it.
            self.schedule.answered()
            self.drop(item, outcome.reason, outcome.detail, outcome.status)
            self._unspool(item)
            return False
        now = self.clock()
        with self._end.lock:
            self._end.cause = outcome.detail or outcome.reason
        verdict, pause, item.failing_since = self.schedule.failed(
            now,
            rate_limited=outcome.reason == "rate_limited",
            retry_after=outcome.retry_after,
            failing_since=item.failing_since,
        )
        if verdict is Verdict.GIVE_UP:
            if self.spool([item]):
                log.info("produl_server: an event out of retry time was spooled")
                return False
            waited = now - (item.failing_since or now)
            detail = f"gave up after {waited:.0f} s of failures ({outcome.detail})"
            self.drop(item, "retries_exhausted", detail, outcome.status)
            return False
        self.ledger.count_retry()
        log.info("produl_server: delivery failed (%s); retrying in %.2f s", outcome.detail, pause)
        return True

    # -- the spool ---------------------------------------------------------

    def _unspool(self, item: Item) -> None:
        if item.spool_id is not None and self.outbox is not None:
            self.outbox.done([item.spool_id])

    def spool(self, items: list[Item], *, caller: bool = False) -> list[Item]:
        """Keep events in the spool instead of dropping them; return those kept.

        Taken ones go back; others are written (the default spool's only at the
        end, #22). Each one kept is counted ``spooled``; the rest are left to the
        caller. *caller*: on a ``track_*`` caller's thread (never Redis there).
        """
        outbox = self.outbox
        if outbox is None or not items or (outbox.exit_only and not self.finished):
            return []
        taken = [item for item in items if item.spool_id is not None]
        fresh = [item for item in items if item.spool_id is None]
        if taken:
            outbox.give_back([item.spool_id for item in taken if item.spool_id is not None])
        kept = (
            taken
            + fresh[: outbox.keep(((item.body, item.visitor) for item in fresh), caller=caller)]
        )
        for item in kept:
            self.ledger.finish(item.seq, spooled=True)
        return kept

    def spill(self) -> None:
        """Spool what a full queue refused (sender thread); drop what the spool cannot take."""
        items = self.inbox.take_refused()
        kept = {item.seq for item in self.spool(items)}
        lost = [item for item in items if item.seq not in kept]
        if not lost:
            return
        for item in lost:
            self.ledger.finish(item.seq, "queue_full")
        self._warn_unspilled(
            "produl_server: %d event(s) refused by the full queue could not be spooled; dropped",
            len(lost),
        )
        error = DeliveryError("queue_full", "the queue is full")
        for item in lost:
            self.reports.call_hook(error, item)

    def take_spooled(self) -> list[Item]:
        """Claim a few spooled events, as items of this client."""
        if self.outbox is None:
            return []
        items = []
        for event in self.outbox.take():
            item = Item(event.body, event.visitor, self.ledger.accept())
            item.spool_id = event.id
            items.append(item)
        with self._end.lock:
            count = self._end.took = self._end.took or bool(items)
        if count:
            self._count_backlog()
        return items

    # -- reporting ---------------------------------------------------------

    def drop(self, item: Item, reason: str, message: str, status: int | None = None) -> None:
        """Report a dropped event, then count it handled (which releases flushes).

        An event given up at the shutdown deadline meanwhile was reported then.
        """
        if not self.ledger.is_handled(item.seq):
            try:
                self.reports.report(item, reason, message, status)
            finally:  # whatever the hook raised, the event is settled
                self.ledger.finish(item.seq, reason)

    # -- the end -----------------------------------------------------------

    def finish(self, leftovers: list[Item], in_flight: frozenset[int] = frozenset()) -> None:
        """Close once: count and report what could not be delivered in time.

        Args:
            leftovers: The events still in the sender's hands.
            in_flight: The numbers of those that had a request under way:
                they may have arrived, and the report says so.
        """
        end = self._end
        with end.lock:
            first = not end.begun.is_set()
            end.begun.set()
        if not first:
            # Another thread is finishing (the sender, at the deadline): let
            # it write the spool and the report before the process may end,
            # but not for ever.
            end.done.wait(FINISH_WAIT)
            return
        try:
            self._finish(leftovers, in_flight)
        finally:
            end.done.set()

    def _finish(self, leftovers: list[Item], in_flight: frozenset[int]) -> None:
        leftovers += self.inbox.take_refused()
        leftovers += self.inbox.take_all()
        leftovers = [item for item in leftovers if not self.ledger.is_handled(item.seq)]
        kept = {item.seq for item in self.spool(sorted(leftovers, key=lambda item: item.seq))}
        cause = self._cause()
        if kept and self.outbox is not None:
            self.reports.spooled_at_exit(
                len(kept), self.outbox.directory, len(kept & in_flight), cause
            )
        with self._end.lock:
            count = self._end.took or bool(kept)
        if count:
            # What waits in the spool for the next run: the backlog this
            # client took on and could not finish, and what it spooled now.
            self._count_backlog()
        self._end.lost = left = self.ledger.abandon("shutdown")
        if left:
            unsure = sum(1 for i in leftovers if i.seq in in_flight and i.seq not in kept)
            remedy = (
                "Call flush() before the process ends, or set spool_dir (PRODUL_SPOOL_DIR) "
                "to keep them for the next run"
                if self.outbox is None
                else f"The spool ({self.outbox.directory}) could not take them"
            )
            self.reports.lost_at_exit(left, cause, unsure, remedy)
            error = DeliveryError(
                "shutdown",
                "not delivered before the shutdown deadline" + (f" ({cause})" if cause else ""),
            )
            for item in sorted(leftovers, key=lambda item: item.seq):
                if item.seq not in kept:
                    self.reports.call_hook(error, item)
        if self._transport is not None:
            self._transport.close()
        if self.outbox is not None:
            self.outbox.close()

    def _cause(self) -> str:
        """Why events were still waiting: the quota, else the last failure."""
        quota = self.schedule.quota
        now = self.clock()
        if self.schedule.quota_free_at > now:
            wait = self.schedule.quota_free_at - now
            until = time.strftime("%H:%M:%S", time.localtime(time.time() + wait))
            whose = {"host": "the host's quota", "redis": "the fleet's quota"}.get(
                quota.kind, "the quota"
            )
            return f"{whose} is used up until {until}"
        cause = self.last_cause
        if cause:
            return f"last error: {cause}"
        return ""
