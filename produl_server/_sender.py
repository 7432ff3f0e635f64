"""The sender thread: the default loop that delivers what callers queued.

- :class:`ThreadSender`: a daemon thread, ``produl-server.sender``.
  It waits for a batch to be due (:mod:`._schedule`), then sends, with
  :mod:`._lanes` for a backlog at real latency. Other threads talk to it
  only through its :class:`_Mailbox` (a flush, the exit deadline, a look
  in the spool) and read what it holds only through :class:`_Hands`, each
  under its own lock.
- The other loop, for ``sync_mode``, is :class:`~._inline.InlineSender`;
  the two never run at the same time. Both hand every outcome to
  :class:`~._accounts.Accounts`.
"""

from __future__ import annotations

import logging
import threading

from ._accounts import Accounts
from ._inbox import Item
from ._lanes import Lanes
from ._mailbox import Hands, Mailbox
from ._threads import signals_blocked
from ._transport import Outcome
from ._transport import Verdict as Answer

log = logging.getLogger("produl_server")

__all__ = ["ThreadSender"]

#: How often an idle sender with a spool looks in it for events; at least
#: twice per lease, so that what a dead sender had claimed is soon taken over.
SPOOL_RECHECK = 30.0


class ThreadSender:
    """The sender thread: one step at a time, each doing what is due, then waiting."""

    def __init__(self, accounts: Accounts) -> None:
        self._acc = accounts
        self.wake = threading.Event()
        # With a spool, whether it holds a backlog is unknown until the
        # first look (at once): a flush or an exit waits for that look.
        spool = accounts.outbox is not None
        self._mail = Mailbox(backlog=spool)
        self._hands = Hands()
        self._lanes = Lanes(accounts, self.wake)
        #: Send every event accepted up to this number now (sender thread).
        self._drain_to = 0
        #: When to look in the spool next (at once: on start), and whether
        #: the last look found events (sender thread).
        self._spool_next = 0.0
        self._backlog = spool
        #: The exit deadline as of this step (the mailbox's, copied).
        self._exit_at: float | None = None
        self.thread = threading.Thread(target=self._run, name="produl-server.sender", daemon=True)
        self.owner: object = None

    # -- messages from other threads ------------------------------------------

    def start(self) -> None:
        """Start the thread, born blocking the application's signals (see ``_threads``)."""
        with signals_blocked():
            self.thread.start()

    def request_flush(self, target: int) -> None:
        """Ask for every event up to *target* to be sent now (any thread)."""
        self._mail.flush(target)
        self.wake.set()

    def set_deadline(self, deadline: float | None) -> None:
        """Send what is left until *deadline*, then finish (any thread)."""
        self._mail.set_deadline(deadline)
        self.wake.set()

    def spool_now(self) -> None:
        """Look in the spool at the next step (any thread)."""
        self._mail.ask_spool()
        self.wake.set()

    def nudge(self) -> None:
        """A batch is full: wake the sender, unless it waits for time, not events.

        Where no thread can start at exit, each nudge starts one more lane
        for it too (see :mod:`._lanes`).
        """
        if self._lanes.ahead:
            self._lanes.start_ahead()
        if not self._mail.resting() and not self.wake.is_set():
            self.wake.set()

    def backlog_after(self, target: int, timeout: float | None) -> int | None:
        """After a flush up to *target*: the spool backlog's new target, *target*, or None.

        See :meth:`._mailbox.Mailbox.backlog_after`.
        """
        return self._mail.backlog_after(target, timeout)

    def close(self) -> None:
        """End the lanes and the delivery, reporting what is left (any thread)."""
        self._lanes.close()
        pending, in_flight = self._hands.snapshot()
        self._acc.finish(pending + in_flight, frozenset(item.seq for item in in_flight))

    # -- the thread ------------------------------------------------------------

    def _run(self) -> None:
        while not self._acc.finished:
            try:
                wait = self.step()
            except BaseException:
                # The sender must never die: a dead sender loses every event
                # after it, silently. Log, pause briefly, go on.
                log.exception("produl_server: unexpected error in the sender; continuing")
                wait = 1.0
            if not self._acc.finished and (wait is None or wait > 0):
                self.wake.wait(wait)

    def step(self) -> float | None:
        """Do what is due now: the thread's one step, which tests drive with a fake clock.

        Returns:
            The seconds to wait before the next step (None: until woken).
            The delivery is over once the accounts are finished.
        """
        acc = self._acc
        self.wake.clear()
        flush_to, self._exit_at, spool_asked = self._mail.read()
        if acc.finished:  # finished from another thread at the deadline
            return None
        if spool_asked:
            self._spool_next = 0.0
        self._settle_done()
        if acc.inbox.has_refused():
            acc.spill()
        now = acc.clock()
        deadline = self._exit_at
        if deadline is not None:
            self._drain_to = acc.ledger.accepted
            if now >= deadline or self._idle():
                self.close()
                return None
        wait = self._round(now, flush_to)
        if deadline is not None:
            if not self._hands.in_flight() and (
                self._idle() or acc.schedule.not_before >= deadline or self._too_late(now)
            ):
                # Nothing left, or the next attempt would outlive the exit
                # budget: stop now rather than hold the process for nothing.
                self.close()
                return None
            wait = deadline - now if wait is None else min(wait, deadline - now)
        return wait

    def _idle(self) -> bool:
        """Nothing in hand, queued, or known to wait in the spool."""
        return self._hands.idle() and not self._acc.inbox.waiting() and not self._backlog

    def _round(self, now: float, flush_to: int) -> float | None:
        """Send what is due. Returns seconds until the next step, None for "until woken"."""
        acc = self._acc
        hands = self._hands
        self._drain_to = max(self._drain_to, flush_to)
        if hands.idle() and self._drain_to <= self._pulled_to():
            if not self._from_spool(now):
                due = self._due(now)
                if acc.outbox is not None and self._exit_at is None:
                    spool_due = max(0.0, self._spool_next - now)
                    due = spool_due if due is None else min(due, spool_due)
                if due != 0.0:
                    return due
            self._drain_to = acc.ledger.accepted
        while True:
            # The exit may begin in the middle of a round: each request
            # starts knowing its deadline.
            self._exit_at = self._mail.deadline()
            self._settle_done()
            limit = self._limit()
            if limit > 1 and limit > self._lanes.count():
                self._lanes.grow(limit)
                limit = self._limit()
            # The spool's older events first, also while exiting (issue #22):
            # none of the queue's is taken while a look may still find some.
            if not (hands.idle() and self._from_spool(now)) and not self._spool_due(now):
                self._fill(limit)
            if not hands.waiting():
                return None if hands.in_flight() else 0.0
            pause = self._send_next(limit)
            if pause != 0.0:
                self._mail.rest()
                return pause

    def _due(self, now: float) -> float | None:
        """When the queue's own batch is due (0: now; None: never)."""
        waiting, first_at, last_at = self._acc.inbox.times()
        return self._acc.schedule.batching.due_in(now, waiting, first_at, last_at)

    def _from_spool(self, now: float) -> bool:
        """Take spooled events to send first, when it is time to look; True if any.

        They are older, so they go before the queue's, as long as the queue
        is at most half full (issue #22).
        """
        acc = self._acc
        if acc.outbox is None or now < self._spool_next or self._too_late(now):
            return False
        if acc.inbox.waiting() > acc.config.max_queue_size // 2:
            return False
        items = acc.take_spooled()
        # Again at once while the spool has events, else in a while: another
        # process may spool some meanwhile.
        self._spool_next = now if items else now + self._recheck()
        self._backlog = bool(items)
        if items:
            # They were accepted after what is queued, which the drain
            # target must still cover (it counts by acceptance).
            self._drain_to = max(self._drain_to, acc.ledger.accepted)
        self._hands.add(items)
        self._mail.looked(acc.ledger.accepted if items else 0)
        return bool(items)

    def _spool_due(self, now: float) -> bool:
        """Whether the spool may hold events and is due for a look (queue at most half full)."""
        acc = self._acc
        return (
            self._backlog
            and now >= self._spool_next
            and acc.inbox.waiting() <= acc.config.max_queue_size // 2
        )

    def _pulled_to(self) -> int:
        # Everything accepted and no longer in the queue was pulled.
        return self._acc.ledger.accepted - self._acc.inbox.waiting()

    def _fill(self, limit: int) -> None:
        """Take queued events up to the drain target, or the next batch once it is due.

        An event queued while the previous batch is being sent waits for its
        own trigger (issue #19: it left with the request after, at once).
        """
        acc = self._acc
        room = 2 * limit - self._hands.waiting()
        if room <= 0:
            return
        owed = self._drain_to - self._pulled_to()
        if owed < room and self._due(acc.clock()) == 0.0:
            self._drain_to = acc.ledger.accepted
            owed = self._drain_to - self._pulled_to()
        if owed > 0:
            self._hands.add(acc.inbox.take(min(room, owed)))

    def _send_next(self, limit: int) -> float | None:
        """Start one request. 0 to go on, else the pause (None: until a lane is done)."""
        acc = self._acc
        hands = self._hands
        if hands.in_flight() >= limit:
            return None  # a lane wakes us when it is done
        index = hands.next_ready(self._lanes)
        if index is None:
            return None  # every waiting event's visitor has one in flight
        now = acc.clock()
        pause = acc.schedule.gate(now)
        if pause:
            return pause
        if self._too_late(now):
            return None  # the step ends the delivery once nothing is in flight
        item, alone = hands.start(index)
        timeout = None if self._exit_at is None else self._exit_at - now
        if limit == 1 and alone:
            # No hand-off to a lane: cheaper, same kept-alive connection.
            outcome, seconds = self._lanes.timed(acc.get_transport(), item, timeout)
            self._lanes.record(seconds)
            self._settle(item, outcome)
        else:
            self._lanes.hand(item, timeout)
        return 0.0

    def _too_late(self, now: float) -> bool:
        """While exiting with a spool: whether a request started now would end past the deadline.

        Its answer would be lost and its event spooled, though it may have
        arrived: the next run would send it twice. So within two round trips
        of the deadline no request starts, and the spool keeps the rest.
        Without a spool a late try is the event's last chance: it is made.
        """
        deadline = self._exit_at
        if deadline is None or self._acc.outbox is None:
            return False
        return deadline - now < 2 * self._lanes.round_trip

    def _limit(self) -> int:
        backlog = self._hands.waiting() + self._acc.inbox.waiting()
        exit_left = None if self._exit_at is None else self._exit_at - self._acc.clock()
        return self._lanes.limit(backlog, exit_left)

    def _settle_done(self) -> None:
        for item, outcome in self._lanes.collect():
            self._settle(item, outcome)

    def _settle(self, item: Item, outcome: Outcome) -> None:
        acc = self._acc
        if acc.finished:
            return
        again = acc.settle(item, outcome)
        self._hands.settled(item, again=again)
        if item.spool_id is not None and not again and outcome.verdict is Answer.RETRY:
            # Out of retry time, and back in the spool: the collector is
            # down, and taking it again at once would only send it again,
            # and again. The spool waits for the next look.
            self._spool_next = acc.clock() + self._recheck()
            self._backlog = False
            self._mail.looked(0)

    def _recheck(self) -> float:
        outbox = self._acc.outbox
        return SPOOL_RECHECK if outbox is None else min(SPOOL_RECHECK, outbox.lease / 2)
