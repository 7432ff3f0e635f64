"""The worker behind one client: ``put``, ``flush``, ``close`` and fork.

Callers only ever put an encoded body in the :class:`~._inbox.Inbox`
(the visitor id is read back from it) and maybe wake the sender: they
never block and never see a network error. What happens next belongs to
other modules: :mod:`._sender` delivers on a thread (:mod:`._inline` on
the caller's own thread in ``sync_mode``), :mod:`._accounts` settles each
event, and
:mod:`._wiring` built the quota and the spool this worker was given. The
:class:`~._ledger.Ledger` counts every event from acceptance to its end;
``flush()`` waits on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from ._accounts import Accounts, Clock
from ._config import MAX_SECONDS, Config
from ._event import visitor_of
from ._inbox import Item
from ._inline import InlineSender
from ._ledger import Stats
from ._quota import kept_in
from ._reports import Door
from ._sender import ThreadSender
from ._spool import Census
from ._transport import Transport
from ._wiring import Wiring, wire
from .exceptions import DeliveryError

log = logging.getLogger("produl_server")

__all__ = ["Stats", "Worker"]


def _bounded(timeout: float | None) -> float | None:
    """A caller's timeout, made safe for the clock: NaN or negative is 0, at most a day."""
    if timeout is None:
        return None
    if not timeout > 0:  # NaN, 0, negative
        return 0.0
    # Compared before float(): an int like 10**400 has no float.
    return MAX_SECONDS if timeout >= MAX_SECONDS else float(timeout)


class Worker:
    """The queue, the ledger and the delivery loop behind one client.

    Args:
        config: The client's configuration.
        transport_factory: Builds the transport (made lazily, on first send).
        clock: The monotonic clock (tests may pass their own).
    """

    def __init__(
        self,
        config: Config,
        transport_factory: Callable[[Config], Transport] = Transport,
        clock: Clock = time.monotonic,
        wiring: Wiring | None = None,
    ) -> None:
        self._config = config
        self._make_transport = transport_factory
        self._clock = clock
        wiring = wire(config) if wiring is None else wiring
        self._quota = wiring.quota
        self._outbox = wiring.outbox
        self._reset()
        # Events spooled by an earlier run: deliver them now, first.
        if self._outbox is not None and config.enabled and self._outbox.worth_a_look():
            self._start()

    def _reset(self) -> None:
        """Fresh state: at construction, and in a child after ``fork()``."""
        self._acc = acc = Accounts(
            self._config, self._make_transport, self._clock, self._quota, self._outbox
        )
        self._inline = InlineSender(acc)
        self._sender: ThreadSender | None = None
        self._start_lock = threading.Lock()
        self._sync = self._config.sync_mode
        self._deadline: float | None = None
        self._door = Door(acc.ledger, acc.reports, self._clock)

    @property
    def _transport(self) -> Transport | None:
        return self._acc.transport

    def after_fork_in_child(self) -> None:
        """Start the child empty, with its own locks, queue and (lazy) thread.

        The parent's queued events stay the parent's: sending them here too
        would deliver them twice. Every lock is replaced, so one that another
        thread of the parent held at fork time cannot deadlock the child.
        """
        transport = self._acc.transport
        for shared in (self._quota, self._outbox):
            after_fork = getattr(shared, "after_fork_in_child", None)
            if after_fork is not None:
                after_fork()
        self._reset()
        if transport is not None:
            transport.abandon()

    # -- the caller's side -------------------------------------------------

    def put(self, body: bytes) -> None:
        """Queue one encoded event; never blocks, never raises for delivery."""
        acc = self._acc
        # Set once, under the start lock: a call that races it is counted at the end.
        if self._deadline is not None:
            item = Item(body, visitor_of(body), acc.ledger.accept())
            self._door.refuse(item, "shutdown", "track_*() called after shutdown()")
            return
        sender = self._sender
        if sender is None and not self._sync:
            sender = self._start()
        now = self._clock()
        waiting = acc.inbox.put(body, acc.ledger.accept, now)
        if not waiting:
            if acc.outbox is None or acc.outbox.exit_only:
                # Full, and nowhere to spool: refused before any object is
                # made, at the cost of an accepted call (P10).
                self._door.refuse_full(body, now)
            else:
                self._overflow(Item(body, visitor_of(body), acc.ledger.accept()))
            return
        if sender is None:
            self._inline.run(now + self._config.request_timeout, wait=False)
        elif waiting == 1:
            sender.wake.set()
        elif waiting >= self._config.flush_at:
            # Not while the sender waits for time to pass (the quota, a
            # backoff, busy lanes): one more event changes nothing for it,
            # and waking it per event would cost every request handler.
            sender.nudge()

    def _overflow(self, item: Item) -> None:
        """The queue is full: spool the event, or drop it and say so.

        With a sender thread, the event waits (at most ``max_queue_size`` of
        them) for the sender to spool it: this thread never waits on the
        spool, neither on Redis nor on SQLite's lock held by another process
        (issue #18). In ``sync_mode`` the caller spools it itself.
        """
        acc = self._acc
        sender = self._sender
        if sender is not None and not (acc.outbox is not None and acc.outbox.exit_only):
            waiting = acc.inbox.refused(item)
            if waiting == 1:
                sender.wake.set()
            spooled = bool(waiting)
        else:
            spooled = bool(acc.spool([item], caller=True))
        if spooled:
            self._door.full(spooled=True)
        else:
            self._door.drop_queued(item)

    def drop_at_door(self, reason: str, error: DeliveryError | None, event: dict[str, Any]) -> None:
        """Count an event dropped before it was queued; report *error* if there is one."""
        self._door.drop(reason, error, event)

    def drop_invalid(self, error: Exception, call: dict[str, Any]) -> None:
        """Count, log and report a ``track_*`` call refused by validation.

        Used when ``raise_on_invalid=False`` turns the exception into a drop.
        """
        self._door.drop_invalid(error, call)

    def flush(self, timeout: float | None) -> bool:
        """Send everything queued now; wait at most *timeout* seconds.

        Returns:
            True when every event queued before the call was delivered or
            definitively handled (dropped and reported).
        """
        acc = self._acc
        if acc.finished:
            return not acc.lost
        timeout = _bounded(timeout)
        sender = self._sender
        deadline = None if timeout is None else self._clock() + timeout
        if sender is None or not sender.thread.is_alive():
            return self._inline.run(deadline, wait=True)
        if sender.thread is threading.current_thread():
            log.warning(
                "produl_server: flush() called from the sender thread (an on_error hook?); ignored"
            )
            return False
        return self._flush_thread(sender, deadline) and not acc.lost

    def _flush_thread(self, sender: ThreadSender, deadline: float | None) -> bool:
        """Wait for the sender to send everything accepted now, and the spool's backlog.

        The backlog: events this client took from the spool, and those it
        will take while the spool still has some (issue #19: a run after an
        outage delivered 100 of 300 and left). Within *deadline*, and the
        quota, like the rest.
        """
        ledger = self._acc.ledger
        target = ledger.accepted
        sender.request_flush(target)
        while True:
            if not ledger.wait(target, self._left(deadline)):
                return False
            more = sender.backlog_after(target, self._left(deadline))
            if more is None:
                return False
            if more == target:
                return True
            target = more
            sender.request_flush(target)

    def _left(self, deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - self._clock())

    def begin_close(self, deadline: float) -> None:
        """Stop accepting events and send what is left until *deadline*."""
        with self._start_lock:
            if self._deadline is None:
                self._deadline = deadline
                if self._sender is not None:
                    self._sender.set_deadline(deadline)  # and wakes it

    def begin_close_soon(self) -> None:
        """:meth:`begin_close` with the configured ``shutdown_timeout``."""
        self.begin_close(self._clock() + self._config.shutdown_timeout)

    def wait_closed(self) -> None:
        """Wait (until the deadline) for the delivery to finish, then report.

        From the sender thread (an ``on_error`` hook that shuts down) it
        returns at once: the sender goes on delivering until the deadline.
        """
        deadline = self._deadline if self._deadline is not None else self._clock()
        sender = self._sender
        if sender is not None and sender.thread is threading.current_thread():
            log.info(
                "produl_server: shutdown() from the sender thread; delivering until the deadline"
            )
            return
        if sender is not None and sender.thread.is_alive():
            sender.thread.join(max(0.0, deadline - self._clock()))
            sender.close()
            return
        # No thread to do it (never started, or after fork): send from here.
        # Starting a thread now could fail at interpreter exit.
        self._inline.run(deadline, wait=True)
        self._acc.finish(self._inline.leftovers())

    def close(self, timeout: float | None) -> None:
        """:meth:`begin_close` and :meth:`wait_closed` with one budget."""
        budget = _bounded(self._config.shutdown_timeout if timeout is None else timeout) or 0.0
        self.begin_close(self._clock() + budget)
        self.wait_closed()

    @property
    def shutdown_timeout(self) -> float:
        """The configured exit budget (the exit hook shares the largest)."""
        return self._config.shutdown_timeout

    @property
    def closed(self) -> bool:
        """Whether shutdown has begun."""
        return self._deadline is not None

    def stats(self) -> Stats:
        """A snapshot of the counters."""
        quota = self._acc.schedule.quota
        return attrs.evolve(
            self._acc.ledger.stats(),
            quota=kept_in(quota),
            quota_used=quota.used,
            quarantined=0 if self._outbox is None else self._outbox.quarantined,
            backlog=self._acc.backlog,
        )

    def drain_spool(self, timeout: float, progress: Callable[[int], object] | None = None) -> int:
        """Deliver the spool's events until it is empty or *timeout*; return what is left.

        Args:
            timeout: Seconds to spend at most.
            progress: Called with the number of events still spooled, a few
                times a second.
        """
        outbox = self._outbox
        if outbox is None:
            return 0
        ledger = self._acc.ledger
        deadline = self._clock() + (_bounded(timeout) or 0.0)
        sender = self._sender or self._start()
        while True:
            left = outbox.count()
            if progress is not None:
                progress(left)
            now = self._clock()
            if (left == 0 and ledger.pending == 0) or now >= deadline or sender is None:
                return left
            sender.spool_now()
            ledger.wait(ledger.accepted, min(0.25, deadline - now))

    def spool_count(self) -> int:
        """Events in the spool now (0 without one); before shutdown, which closes it."""
        return 0 if self._outbox is None else self._outbox.count()

    def spool_census(self) -> Census | None:
        """What the spool holds for this key and for others (None without a spool)."""
        return None if self._outbox is None else self._outbox.census()

    def spool_problem(self) -> str | None:
        """Why the spool cannot be read now (Redis down), or None."""
        return None if self._outbox is None else self._outbox.problem()

    def adopt_unowned(self) -> int:
        """Make this key's the spooled events of its URL that no key owns."""
        return 0 if self._outbox is None else self._outbox.adopt_unowned()

    @property
    def last_failure(self) -> str:
        """What the last failed attempt said ("" if none failed)."""
        return self._acc.last_cause

    def _start(self) -> ThreadSender | None:
        with self._start_lock:
            if self._sender is not None or self._sync:
                return self._sender
            sender = ThreadSender(self._acc)
            # While the thread runs it keeps this worker alive, and with it
            # the worker's place in the exit hook's set, even when the client
            # that made it was garbage-collected with events still queued.
            sender.owner = self
            sender.set_deadline(self._deadline)
            try:
                sender.start()
            except RuntimeError:
                # "can't create new thread at interpreter shutdown": a track
                # call from an atexit handler. Send on the caller's thread.
                self._sync = True
                return None
            self._sender = sender
            return sender
