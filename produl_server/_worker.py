"""The queue behind a client, and the two loops that deliver it.

Callers only ever ``put_nowait`` a :data:`Queued` tuple (the encoded body
with its visitor id and sequence number) and maybe set a flag: they never block
and never see a network error. Two delivery loops share one accounting core
(:class:`_Core`: settle an outcome, report a drop, give up at the deadline),
and never run at the same time:

- :class:`ThreadSender`, the default: a daemon thread, ``produl-server.sender``.
  It waits for a batch to be due (:mod:`._schedule`), then sends. With a
  backlog at real latency it starts lane threads (``produl-server.sender-N``,
  at most ``max_in_flight``) and keeps that many requests in flight, never
  two of one visitor, so each visitor's events arrive in order.
- :class:`InlineSender`, for ``sync_mode`` (and for an exit where no thread
  can start): sends on the caller's thread, under its own lock, within the
  caller's deadline.

The :class:`~._ledger.Ledger` counts every event from acceptance to its
end; ``flush()`` waits on it.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from ._config import MAX_SECONDS, Config, exit_lanes, mask_key
from ._durable import Outbox, make_quota, open_outbox
from ._ledger import Ledger, Stats
from ._redis import FleetOutbox, open_fleet
from ._schedule import Quota, RollingQuota, Schedule, Verdict
from ._spool import Census
from ._transport import Outcome, Transport
from ._transport import Verdict as Answer
from .exceptions import DeliveryError

log = logging.getLogger("produl_server")

__all__ = ["Item", "Stats", "Worker"]

Clock = Callable[[], float]

#: How long a second thread waits for the one finishing (writing the spool,
#: reporting) before it goes on: the exit may outlast its budget by this much.
FINISH_WAIT = 2.0

#: How often an idle sender with a spool looks in it for events; at least
#: twice per lease, so that what a dead sender had claimed is soon taken over.
SPOOL_RECHECK = 30.0

#: Lanes pay off once a request takes this long: on a faster link the
#: extra threads cost more CPU than they save time.
LANE_LATENCY = 0.003

_local = threading.local()

#: What the queue holds: ``(body, visitor, seq)``. A tuple of a bytes, a str
#: and an int, which the garbage collector stops tracking the first time it
#: sees it: a queue of 100,000 events costs a full collection about 4 ms,
#: not the 18 ms of as many :class:`Item` objects (issue #22, P6). The
#: sender makes each one an :class:`Item` when it takes it.
Queued = tuple[bytes, "str | None", int]


def _bounded(timeout: float | None) -> float | None:
    """A caller's timeout, made safe for the clock: NaN or negative is 0, at most a day."""
    if timeout is None:
        return None
    if not timeout > 0:  # NaN, 0, negative
        return 0.0
    # Compared before float(): an int like 10**400 has no float.
    return MAX_SECONDS if timeout >= MAX_SECONDS else float(timeout)


def _quota_kind(quota: Any) -> str:
    """What ``stats.quota`` shows: where the window is kept right now.

    The host's quota paces this process alone while its lock is held by a
    stopped process or its file was given up; ``stats`` then says
    ``memory``, not ``host`` (#18, item 14). With Redis down, the same
    holds for its fallback.
    """
    kind: str = quota.kind
    if kind == "host":
        host = getattr(quota, "fallback", quota)
        if getattr(host, "shared", True) is False:
            return "memory"
    return kind


class Item:
    """One queued event, with what the caller knew about it."""

    __slots__ = ("body", "failing_since", "seq", "spool_id", "visitor")

    def __init__(self, body: bytes, visitor: str | None, seq: int) -> None:
        self.body = body
        self.visitor = visitor
        self.seq = seq
        #: Its row in the spool, for an event this sender took from there.
        self.spool_id: int | str | None = None
        #: When this event's retry time started running (None: it has not).
        self.failing_since: float | None = None


class _Throttled:
    """Log one warning per interval, with the count of what it stood for."""

    def __init__(self, interval: float, clock: Clock) -> None:
        self.interval = interval
        self.clock = clock
        self.last = -interval
        self.suppressed = 0

    def __call__(self, message: str, *args: object) -> None:
        now = self.clock()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        self.last = now
        extra, self.suppressed = self.suppressed, 0
        log.warning(message + " (%d more since the last warning)", *args, extra)


class _Core:
    """What both loops share: the queue, the ledger, the schedule, the reports."""

    def __init__(
        self,
        config: Config,
        transport_factory: Callable[[Config], Transport],
        clock: Clock,
        quota: Quota,
        outbox: Outbox | FleetOutbox | None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.ledger = Ledger()
        self.queue: queue.Queue[Queued] = queue.Queue(config.max_queue_size)
        self.schedule = Schedule(config, quota=quota)
        self.outbox = outbox
        self.pending: collections.deque[Item] = collections.deque()
        #: Refused by a full queue, for the sender to spool in Redis (the
        #: caller never talks to Redis); at most ``max_queue_size``.
        self.overflow: collections.deque[Item] = collections.deque()
        self._warn_unspilled = _Throttled(60.0, clock)
        self.transport: Transport | None = None
        self._make_transport = transport_factory
        self._key_reported = False
        self.finished = False
        self.lost = 0
        self._finish_lock = threading.Lock()
        self._finished_event = threading.Event()
        self.last_enqueue = 0.0
        self.first_enqueue = 0.0
        #: Why the last attempt failed, for the loss line at the end
        #: (issue #23: "not delivered" without a cause).
        self.last_cause = ""

    def get_transport(self) -> Transport:
        if self.transport is None:
            self.transport = self._make_transport(self.config)
        return self.transport

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
        self.last_cause = outcome.detail or outcome.reason
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

        Events taken from the spool go back to it; others are written. Each
        one kept is counted ``spooled``; the rest are left to the caller.
        *caller*: on a ``track_*`` caller's thread (never Redis there).
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
        items = []
        while self.overflow:
            items.append(self.overflow.popleft())
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
            self.call_hook(error, item)

    def take_spooled(self) -> list[Item]:
        """Claim a few spooled events, as items of this client."""
        if self.outbox is None:
            return []
        items = []
        for event in self.outbox.take():
            item = Item(event.body, event.visitor, self.ledger.accept())
            item.spool_id = event.id
            items.append(item)
        return items

    # -- reporting ---------------------------------------------------------

    def drop(self, item: Item, reason: str, message: str, status: int | None = None) -> None:
        """Report a dropped event, then count it handled (which releases flushes).

        An event given up at the shutdown deadline meanwhile was reported then.
        """
        if not self.ledger.is_handled(item.seq):
            try:
                self.report(item, reason, message, status)
            finally:  # whatever the hook raised, the event is settled
                self.ledger.finish(item.seq, reason)

    def report(self, item: Item, reason: str, message: str, status: int | None = None) -> None:
        """Log a dropped event and hand it to the on_error hook."""
        if reason == "unauthorized":
            text = (
                f"the collector refused the server key {mask_key(self.config.server_key)} "
                f"({message}); check PRODUL_SERVER_KEY. Events are dropped until it is fixed"
            )
            if self._key_reported:
                log.debug("produl_server: event dropped: %s", text)
            else:
                self._key_reported = True
                log.error("produl_server: %s", text)
        else:
            text = f"event dropped ({reason}): {message}"
            log.warning("produl_server: %s", text)
        self.call_hook(DeliveryError(reason, text, status), item)

    def call_hook(self, error: DeliveryError, event: Item | dict[str, Any]) -> None:
        """Hand one problem to the user's ``on_error`` hook; survive anything it raises.

        The wire dict is built only here, only when there is a hook. Nothing
        a hook raises ends the sender, not even ``SystemExit``,
        ``KeyboardInterrupt`` or ``GeneratorExit``: it is logged, and delivery
        goes on. Only on the main thread does a ``KeyboardInterrupt`` go on up
        to the caller (it may be a real Ctrl-C), once the event is settled.
        """
        hook = self.config.on_error
        if hook is None:
            return
        try:
            hook(error, json.loads(event.body) if isinstance(event, Item) else event)
        except BaseException as exc:
            log.exception("produl_server: the on_error hook raised; delivery goes on")
            if isinstance(exc, KeyboardInterrupt) and (
                threading.current_thread() is threading.main_thread()
            ):
                raise

    # -- the end -----------------------------------------------------------

    def finish(self, leftovers: list[Item], in_flight: frozenset[int] = frozenset()) -> None:
        """Close once: count and report what could not be delivered in time.

        Args:
            leftovers: The events still in the sender's hands.
            in_flight: The numbers of those that had a request under way:
                they may have arrived, and the report says so.
        """
        with self._finish_lock:
            if self.finished:
                # Another thread is finishing (the sender, at the deadline):
                # let it write the spool and the report before the process
                # may end, but not for ever.
                self._finished_event.wait(FINISH_WAIT)
                return
            self.finished = True
        try:
            self._finish(leftovers, in_flight)
        finally:
            self._finished_event.set()

    def _finish(self, leftovers: list[Item], in_flight: frozenset[int]) -> None:
        while self.overflow:
            leftovers.append(self.overflow.popleft())
        while True:
            try:
                leftovers.append(Item(*self.queue.get_nowait()))
            except queue.Empty:
                break
        leftovers = [item for item in leftovers if not self.ledger.is_handled(item.seq)]
        # In the order they were tracked, the one in flight included: the
        # next run sends them in the spool's order (issue #22).
        kept = {item.seq for item in self.spool(sorted(leftovers, key=lambda item: item.seq))}
        if kept and self.outbox is not None:
            twice = len(kept & in_flight)
            log.warning(
                "produl_server: %d event(s) not delivered before the shutdown deadline "
                "were spooled in %s%s; the next client that opens it delivers them",
                len(kept),
                self.outbox.directory,
                f" ({twice} of them had a request under way, and may arrive twice)"
                if twice
                else "",
            )
        self.lost = left = self.ledger.abandon("shutdown")
        if left:
            unsure = sum(1 for i in leftovers if i.seq in in_flight and i.seq not in kept)
            remedy = (
                "Call flush() before the process ends, or set spool_dir (PRODUL_SPOOL_DIR) "
                "to keep them for the next run"
                if self.outbox is None
                else f"The spool ({self.outbox.directory}) could not take them"
            )
            cause = self._cause()
            log.warning(
                "produl_server: %d event(s) not delivered before the shutdown deadline%s; "
                "they are lost%s. %s",
                left,
                f" ({cause})" if cause else "",
                f" ({unsure} of them had a request under way, and may have arrived)"
                if unsure
                else "",
                remedy,
            )
            error = DeliveryError(
                "shutdown",
                "not delivered before the shutdown deadline" + (f" ({cause})" if cause else ""),
            )
            for item in sorted(leftovers, key=lambda item: item.seq):
                if item.seq not in kept:
                    self.call_hook(error, item)
        if self.transport is not None:
            self.transport.close()
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
        if self.last_cause:
            return f"last error: {self.last_cause}"
        return ""


class InlineSender:
    """Sends on the caller's thread (``sync_mode``, or no thread at exit).

    One caller at a time holds the lock; another waits for it only as long
    as its own deadline allows. Called again from inside a delivery (an
    ``on_error`` hook that flushes), it returns False at once.
    """

    def __init__(self, core: _Core) -> None:
        self._core = core
        self._lock = threading.Lock()

    def run(self, deadline: float | None, *, wait: bool) -> bool:
        """Deliver what is queued until *deadline*; True when nothing is left."""
        if getattr(_local, "delivering", False):
            if wait:
                log.warning("produl_server: flush() called from an on_error hook; ignored")
            return False
        core = self._core
        budget = -1.0 if deadline is None else max(0.0, deadline - core.clock())
        if not self._lock.acquire(timeout=budget):
            return False
        _local.delivering = True
        try:
            return self._deliver(deadline, wait=wait)
        finally:
            _local.delivering = False
            self._lock.release()

    def _deliver(self, deadline: float | None, *, wait: bool) -> bool:
        core = self._core
        pending = core.pending
        while True:
            while True:
                try:
                    pending.append(Item(*core.queue.get_nowait()))
                except queue.Empty:
                    break
            if not pending or core.finished:
                return not pending
            now = core.clock()
            if deadline is not None and now >= deadline:
                return False
            pause = core.schedule.gate(now)
            if pause:
                if not wait or (deadline is not None and now + pause >= deadline):
                    return False
                time.sleep(pause)
                continue
            item = pending.popleft()
            timeout = None if deadline is None else deadline - now
            if core.settle(item, core.attempt(core.get_transport(), item, timeout)):
                pending.appendleft(item)


class ThreadSender:
    """The sender thread and its lanes."""

    def __init__(self, core: _Core) -> None:
        self._core = core
        self.wake = threading.Event()
        #: True while the sender waits for time or lanes, not for events.
        self.resting = False
        #: Send every event accepted up to this number now (a due batch, the end).
        self.drain_to = 0
        #: The same, asked for by callers' flushes (written under the lock).
        self.flush_to = 0
        self._flush_lock = threading.Lock()
        self.deadline: float | None = None
        self._inflight: list[Item] = []
        self._busy: collections.Counter[str] = collections.Counter()
        self._jobs: queue.SimpleQueue[tuple[Item, float | None] | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[Item, Outcome]] = collections.deque()
        self._lanes: list[threading.Thread] = []
        #: Set when a lane could not start (interpreter exit): no more tries.
        self._no_new_lanes = False
        #: Set by close(): a lane started after it is ended at once.
        self._closed = False
        #: Smoothed seconds per request, to size the lanes, and the last one.
        self._latency = 0.0
        self._last_latency = 0.0
        #: When to look in the spool next (at once: on start).
        self._spool_next = 0.0
        self.thread = threading.Thread(target=self._run, name="produl-server.sender", daemon=True)
        self.owner: object = None

    def request_flush(self, target: int) -> None:
        """Ask for every event up to *target* to be sent now (any thread)."""
        with self._flush_lock:
            self.flush_to = max(self.flush_to, target)
        self.wake.set()

    def close(self) -> None:
        """End the lanes and the delivery, reporting what is left (any thread)."""
        self._closed = True
        for _lane in list(self._lanes):
            self._jobs.put(None)
        pending, in_flight = self.leftovers()
        self._core.finish(pending + in_flight, frozenset(item.seq for item in in_flight))

    def closing(self) -> bool:
        """Whether :meth:`close` has run (read anew each time, from any thread)."""
        return self._closed

    def leftovers(self) -> tuple[list[Item], list[Item]]:
        """What is still in our hands, waiting and in flight (read from any thread)."""
        for _attempt in range(10):
            try:
                return list(self._core.pending), list(self._inflight)
            except RuntimeError:  # pragma: no cover - mutated while copied; try again
                continue
        return [], []  # pragma: no cover

    def _run(self) -> None:
        while True:
            try:
                if self._step():
                    return
            except BaseException:
                # The sender must never die: a dead sender loses every event
                # after it, silently. Log, pause briefly, go on.
                log.exception("produl_server: unexpected error in the sender; continuing")
                self.wake.wait(1.0)

    def _step(self) -> bool:
        """Do what is due; wait for the next thing. True when closed."""
        core = self._core
        self.wake.clear()
        self.resting = False
        if core.finished:  # finished from another thread at the deadline
            return True
        self._settle_done()
        if core.overflow:
            core.spill()
        now = core.clock()
        deadline = self.deadline
        if deadline is not None:
            self.drain_to = core.ledger.accepted
            if now >= deadline or self._idle():
                self.close()
                return True
        wait = self._round(now)
        if deadline is not None:
            if not self._inflight and (
                self._idle() or core.schedule.not_before >= deadline or self._too_late(now)
            ):
                # Nothing left, or the next attempt would outlive the exit
                # budget: stop now rather than hold the process for nothing.
                self.close()
                return True
            wait = deadline - now if wait is None else min(wait, deadline - now)
        if wait is None or wait > 0:
            self.wake.wait(wait)
        return False

    def _idle(self) -> bool:
        core = self._core
        return not core.pending and not self._inflight and core.queue.empty()

    def _round(self, now: float) -> float | None:
        """Send what is due. Returns seconds until the next step, None for "until woken"."""
        core = self._core
        drain_to = max(self.drain_to, self.flush_to)
        if not core.pending and not self._inflight and drain_to <= self._pulled_to():
            if not self._from_spool(now):
                waiting = core.queue.qsize()
                due = core.schedule.batching.due_in(
                    now, waiting, core.first_enqueue, core.last_enqueue
                )
                if core.outbox is not None and self.deadline is None:
                    spool_due = max(0.0, self._spool_next - now)
                    due = spool_due if due is None else min(due, spool_due)
                if due != 0.0:
                    return due
            self.drain_to = core.ledger.accepted
        transport = core.get_transport()
        while True:
            self._settle_done()
            limit = self._lane_limit()
            if limit > len(self._lanes) and limit > 1:
                self._grow_lanes(limit)
                limit = self._lane_limit()
            if not (len(core.pending) < 2 * limit and self._from_spool(now)):
                self._fill(limit)
            if not core.pending:
                return None if self._inflight else 0.0
            pause = self._send_next(transport, limit)
            if pause != 0.0:
                self.resting = True
                return pause

    def _from_spool(self, now: float) -> bool:
        """Take spooled events to send first, when it is time to look; True if any.

        They are older, so they go before the queue's (also while exiting),
        as long as the queue is at most half full (issue #22).
        """
        core = self._core
        if core.outbox is None or now < self._spool_next:
            return False
        if core.queue.qsize() > core.config.max_queue_size // 2:
            return False
        items = core.take_spooled()
        # Again at once while the spool has events, else in a while: another
        # process may spool some meanwhile.
        recheck = min(SPOOL_RECHECK, core.outbox.lease / 2)
        self._spool_next = now if items else now + recheck
        core.pending.extend(items)
        return bool(items)

    def spool_now(self) -> None:
        """Look in the spool at the next step (any thread)."""
        self._spool_next = 0.0
        self.wake.set()

    def _pulled_to(self) -> int:
        # Everything accepted and no longer in the queue was pulled.
        return self._core.ledger.accepted - self._core.queue.qsize()

    def _fill(self, limit: int) -> None:
        core = self._core
        while len(core.pending) < 2 * limit:
            try:
                item = Item(*core.queue.get_nowait())
            except queue.Empty:
                return
            core.pending.append(item)

    def _send_next(self, transport: Transport, limit: int) -> float | None:
        """Start one request. 0 to go on, else the pause (None: until a lane is done)."""
        core = self._core
        if len(self._inflight) >= limit:
            return None  # a lane wakes us when it is done
        index = self._next_ready()
        if index is None:
            return None  # every waiting event's visitor has one in flight
        now = core.clock()
        pause = core.schedule.gate(now)
        if pause:
            return pause
        if self._too_late(now):
            return None  # the step ends the delivery once nothing is in flight
        item = core.pending[index]
        del core.pending[index]
        timeout = None if self.deadline is None else self.deadline - now
        if limit == 1 and not self._inflight:
            # No hand-off to a lane: cheaper, same kept-alive connection.
            self._inflight.append(item)
            self._settle(item, self._timed(transport, item, timeout))
        else:
            self._inflight.append(item)
            if item.visitor is not None:
                self._busy[item.visitor] += 1
            self._jobs.put((item, timeout))
        return 0.0

    def _too_late(self, now: float) -> bool:
        """While exiting with a spool: whether a request started now would end past the deadline.

        Its answer would be lost and its event spooled, though it may have
        arrived: the next run would send it twice. So within two round trips
        of the deadline no request starts, and the spool keeps the rest.
        Without a spool a late try is the event's last chance: it is made.
        """
        deadline = self.deadline
        if deadline is None or self._core.outbox is None:
            return False
        return deadline - now < 2 * max(self._latency, self._last_latency)

    def _next_ready(self) -> int | None:
        """The first waiting event that may go now without overtaking its visitor."""
        busy = self._busy
        if not busy:
            return 0
        for index, item in enumerate(self._core.pending):
            if item.visitor is None or not busy[item.visitor]:
                return index
        return None

    def _lane_limit(self) -> int:
        """How many requests may be in flight now.

        With a backlog at real latency, up to ``max_in_flight``; without one,
        or on a fast link, one, so one kept-alive connection carries it all.
        While the process exits, more: see :meth:`_exit_lanes`.
        """
        core = self._core
        backlog = len(core.pending) + core.queue.qsize()
        latency = max(self._latency, self._last_latency)
        if latency < LANE_LATENCY:
            return 1
        if self.deadline is not None and core.config.max_in_flight > 1:
            wanted = self._exit_lanes(backlog, latency, self.deadline)
        elif backlog <= core.config.flush_at:
            return 1
        else:
            wanted = min(core.config.max_in_flight, math.ceil(latency / LANE_LATENCY))
        if self._no_new_lanes:
            wanted = min(wanted, len(self._lanes))
        return max(1, wanted)

    def _exit_lanes(self, backlog: int, latency: float, deadline: float) -> int:
        """Lanes while exiting: enough to send the backlog in half the time left.

        Half, for a margin (the ramp, slower answers, visitors with many
        events in a row), up to :func:`~._config.exit_lanes`. Lanes already
        running stay in use to the end, the last few events included: the
        time left shrinks with the backlog, so "just enough" never finishes.
        """
        config = self._core.config
        left = max(deadline - self._core.clock(), 0.002)
        needed = math.ceil(backlog * latency / (left / 2))
        normal = min(config.max_in_flight, math.ceil(latency / LANE_LATENCY))
        return min(max(needed, normal, len(self._lanes)), exit_lanes(config.max_in_flight))

    def _grow_lanes(self, wanted: int) -> None:
        while len(self._lanes) < wanted and not (self._no_new_lanes or self._closed):
            lane = threading.Thread(
                target=self._lane, name=f"produl-server.sender-{len(self._lanes) + 1}", daemon=True
            )
            try:
                lane.start()
            except RuntimeError:
                # At interpreter exit no thread can start: carry on with the
                # lanes there are, or with the sender alone.
                self._no_new_lanes = True
                return
            self._lanes.append(lane)
            if self.closing():
                # close() ran on another thread meanwhile and may not have
                # seen this lane: end it too (an extra None is harmless).
                self._jobs.put(None)
                return

    def _lane(self) -> None:
        """An extra connection: sends what the sender hands it, reports back."""
        jobs = self._jobs
        transport = self._core.get_transport()
        while True:
            job = jobs.get()
            if job is None:  # closed
                return
            item, timeout = job
            self._done.append((item, self._timed(transport, item, timeout)))
            self.wake.set()

    def _timed(self, transport: Transport, item: Item, timeout: float | None) -> Outcome:
        core = self._core
        started = core.clock()
        outcome = core.attempt(transport, item, timeout)
        self._last_latency = core.clock() - started
        self._latency += (self._last_latency - self._latency) * 0.2
        return outcome

    def _settle_done(self) -> None:
        done = self._done
        while done:
            item, outcome = done.popleft()
            if item.visitor is not None:
                self._busy[item.visitor] -= 1
                if not self._busy[item.visitor]:
                    del self._busy[item.visitor]
            self._settle(item, outcome)

    def _settle(self, item: Item, outcome: Outcome) -> None:
        if self._core.finished:
            return
        self._inflight.remove(item)
        if self._core.settle(item, outcome):
            # Back in front of everything not yet sent, in queue order.
            pending = self._core.pending
            position = 0
            while position < len(pending) and pending[position].seq < item.seq:
                position += 1
            pending.insert(position, item)


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
    ) -> None:
        self._config = config
        self._make_transport = transport_factory
        self._clock = clock
        if not config.enabled:
            # A disabled client sends nothing: it opens no quota file, no
            # spool and no Redis connection.
            self._quota: Quota = RollingQuota(None)
            self._outbox: Outbox | FleetOutbox | None = None
        else:
            self._quota = make_quota(config)
            self._outbox = open_outbox(config)
        if config.enabled and config.redis_url is not None:
            self._quota, self._outbox = open_fleet(config, self._quota, self._outbox)
        self._reset()
        # Events spooled by an earlier run: deliver them now, first. Only the
        # sender asks Redis whether there are any.
        outbox = self._outbox
        if (
            outbox is not None
            and config.enabled
            and (isinstance(outbox, FleetOutbox) or outbox.count())
        ):
            self._start()

    def _reset(self) -> None:
        """Fresh state: at construction, and in a child after ``fork()``."""
        self._core = core = _Core(
            self._config, self._make_transport, self._clock, self._quota, self._outbox
        )
        self._items = core.queue.queue  # len() of the deque is lock-free
        self._inline = InlineSender(core)
        self._sender: ThreadSender | None = None
        self._start_lock = threading.Lock()
        self._sync = self._config.sync_mode
        self._deadline: float | None = None
        self._warn_full = _Throttled(60.0, self._clock)

    @property
    def _transport(self) -> Transport | None:
        return self._core.transport

    def after_fork_in_child(self) -> None:
        """Start the child empty, with its own locks, queue and (lazy) thread.

        The parent's queued events stay the parent's: sending them here too
        would deliver them twice. Every lock is replaced, so one that another
        thread of the parent held at fork time cannot deadlock the child.
        """
        transport = self._core.transport
        for shared in (self._quota, self._outbox):
            after_fork = getattr(shared, "after_fork_in_child", None)
            if after_fork is not None:
                after_fork()
        self._reset()
        if transport is not None:
            transport.abandon()

    # -- the caller's side -------------------------------------------------

    def put(self, body: bytes, visitor: str | None = None) -> None:
        """Queue one encoded event; never blocks, never raises for delivery."""
        core = self._core
        if self._deadline is not None:
            self._refuse_at_door(body, visitor, "shutdown", "track_*() called after shutdown()")
            return
        sender = self._sender
        if sender is None and not self._sync:
            sender = self._start()
        if len(self._items) >= self._config.max_queue_size and (
            core.outbox is None or core.outbox.exit_only
        ):
            # Full, and nowhere to spool: refused before any object is made,
            # at the cost of an accepted call (P10), however long it lasts.
            self._refuse_full(body)
            return
        seq = core.ledger.accept()
        try:
            core.queue.put_nowait((body, visitor, seq))
        except queue.Full:
            self._overflow(Item(body, visitor, seq))
            return
        now = self._clock()
        core.last_enqueue = now
        if sender is None:
            self._inline.run(now + self._config.request_timeout, wait=False)
            return
        waiting = len(self._items)
        if waiting == 1:
            core.first_enqueue = now
            sender.wake.set()
        elif waiting >= self._config.flush_at and not sender.resting and not sender.wake.is_set():
            # Skipped while the sender waits for time to pass (the quota, a
            # backoff, busy lanes): one more event changes nothing for it,
            # and waking it per event would cost every request handler.
            sender.wake.set()

    def _overflow(self, item: Item) -> None:
        """The queue is full: spool the event, or drop it and say so.

        With a sender thread, the event waits (at most ``max_queue_size`` of
        them) for the sender to spool it: this thread never waits on the
        spool, neither on Redis nor on SQLite's lock held by another process
        (issue #18). In ``sync_mode`` the caller spools it itself.
        """
        core = self._core
        sender = self._sender
        spooled = False
        if sender is not None and not getattr(core.outbox, "exit_only", False):
            if len(core.overflow) < self._config.max_queue_size:
                core.overflow.append(item)
                if len(core.overflow) == 1:
                    sender.wake.set()
                spooled = True
        elif core.spool([item], caller=True):
            spooled = True
        if spooled:
            self._warn_full(
                "produl_server: the queue is full (%d events); new events are spooled",
                self._config.max_queue_size,
            )
            return
        core.ledger.finish(item.seq, "queue_full")
        self._warn_full(
            "produl_server: the queue is full (%d events); new events are dropped",
            self._config.max_queue_size,
        )
        core.call_hook(DeliveryError("queue_full", "the queue is full"), item)

    def _refuse_full(self, body: bytes) -> None:
        core = self._core
        core.ledger.refuse("queue_full")
        self._warn_full(
            "produl_server: the queue is full (%d events); new events are dropped",
            self._config.max_queue_size,
        )
        if self._config.on_error is not None:
            core.call_hook(DeliveryError("queue_full", "the queue is full"), json.loads(body))

    def _refuse_at_door(self, body: bytes, visitor: str | None, reason: str, text: str) -> None:
        core = self._core
        item = Item(body, visitor, core.ledger.accept())
        core.ledger.finish(item.seq, reason)
        log.warning("produl_server: event dropped (%s): %s", reason, text)
        core.call_hook(DeliveryError(reason, f"event dropped ({reason}): {text}"), item)

    def drop_at_door(self, reason: str, error: DeliveryError | None, event: dict[str, Any]) -> None:
        """Count an event dropped before it was queued; report *error* if there is one."""
        self._core.ledger.refuse(reason)
        if error is not None:
            self._core.call_hook(error, event)

    def drop_invalid(self, error: Exception, call: dict[str, Any]) -> None:
        """Count, log and report a ``track_*`` call refused by validation.

        Used when ``raise_on_invalid=False`` turns the exception into a drop.
        """
        self._core.ledger.refuse("invalid")
        log.warning("produl_server: invalid event dropped: %s", error)
        self._core.call_hook(DeliveryError("invalid", str(error)), call)

    def flush(self, timeout: float | None) -> bool:
        """Send everything queued now; wait at most *timeout* seconds.

        Returns:
            True when every event queued before the call was delivered or
            definitively handled (dropped and reported).
        """
        core = self._core
        if core.finished:
            return not core.lost
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
        target = core.ledger.accepted
        sender.request_flush(target)
        done = core.ledger.wait(target, timeout)
        return done and not core.lost

    def begin_close(self, deadline: float) -> None:
        """Stop accepting events and send what is left until *deadline*."""
        with self._start_lock:
            if self._deadline is None:
                self._deadline = deadline
                if self._sender is not None:
                    self._sender.deadline = deadline
        if self._sender is not None:
            self._sender.wake.set()

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
        self._core.finish(list(self._core.pending))

    def close(self, timeout: float | None) -> None:
        """:meth:`begin_close` and :meth:`wait_closed` with one budget."""
        budget = _bounded(self._config.shutdown_timeout if timeout is None else timeout) or 0.0
        self.begin_close(self._clock() + budget)
        self.wait_closed()

    @property
    def closed(self) -> bool:
        """Whether shutdown has begun."""
        return self._deadline is not None

    def stats(self) -> Stats:
        """A snapshot of the counters."""
        quota = self._core.schedule.quota
        return attrs.evolve(
            self._core.ledger.stats(),
            quota=_quota_kind(quota),
            quota_used=quota.used,
            quarantined=getattr(self._outbox, "quarantined", 0),
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
        ledger = self._core.ledger
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
        return self._core.last_cause

    def _start(self) -> ThreadSender | None:
        with self._start_lock:
            if self._sender is not None or self._sync:
                return self._sender
            sender = ThreadSender(self._core)
            # While the thread runs it keeps this worker alive, and with it
            # the worker's place in the exit hook's set, even when the client
            # that made it was garbage-collected with events still queued.
            sender.owner = self
            sender.deadline = self._deadline
            try:
                sender.thread.start()
            except RuntimeError:
                # "can't create new thread at interpreter shutdown": a track
                # call from an atexit handler. Send on the caller's thread.
                self._sync = True
                return None
            self._sender = sender
            return sender
