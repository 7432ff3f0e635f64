"""The sender: a bounded queue drained by one daemon thread.

Callers only ever ``put_nowait`` an encoded event and maybe set an event
flag; they never block and never see a network error. The sender thread
decides when to send (10 queued, 5 s after the last enqueue, the age cap, a
flush or shutdown), paces itself under the rate limit, and owns the retry
schedule, so no sleep can outlive a ``flush()`` or shutdown deadline.

Events start in the order they were queued. With a backlog, up to
``max_in_flight`` requests go out at once (as many as the rate quota can use
at the collector's latency), but never two of one visitor, so each visitor's
events arrive in order. Each event gets a sequence number when the sender
takes it; a flush waits until every event up to the last one queued when the
sender saw the request is delivered or dropped.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from ._config import Config, mask_key
from ._transport import Outcome, Transport, Verdict
from .exceptions import DeliveryError

log = logging.getLogger("produl_server")

_monotonic = time.monotonic


@attrs.frozen(kw_only=True)
class Stats:
    """A snapshot of one client's delivery counters.

    Attributes:
        queued: Events accepted into the queue since the client started.
        sent: Events the collector acknowledged (2xx).
        retried: Attempts that failed and were scheduled again (429, 5xx,
            timeouts, connection errors).
        dropped: Events given up, by reason: ``invalid``, ``queue_full``,
            ``rejected``, ``unauthorized``, ``retries_exhausted``,
            ``shutdown``.
        pending: Events queued or waiting for a retry right now.
    """

    queued: int
    sent: int
    retried: int
    dropped: dict[str, int]
    pending: int

    @property
    def dropped_total(self) -> int:
        """All dropped events, whatever the reason."""
        return sum(self.dropped.values())


_UNREAD = object()


class _Item:
    __slots__ = ("body", "failing_since", "seq", "visitor")

    def __init__(self, body: bytes, seq: int) -> None:
        self.body = body
        #: Position in the queue, from 1: flushes wait up to a position.
        self.seq = seq
        self.failing_since = 0.0
        #: The visitor id, read from the body only when several requests
        #: may be in flight (``_UNREAD`` until then).
        self.visitor: object = _UNREAD


class _Pacer:
    """A token bucket that keeps requests under a per-minute quota."""

    def __init__(self, per_minute: int | None) -> None:
        self.rate = (per_minute or 0) / 60.0
        self.capacity = max(1.0, min(10.0, self.rate))
        self.tokens = self.capacity
        self.updated = _monotonic()

    def take(self, now: float, ready: int = 1) -> float:
        """Take a token; return 0, or the seconds to wait.

        Out of tokens with *ready* events waiting, it waits until there are
        tokens for up to ``capacity`` of them, so a backlog goes out in short
        bursts a few times a second rather than one request every 30 ms:
        the same rate, but far fewer wake-ups of the sender, each of which
        takes the GIL from the application's threads.
        """
        if not self.rate:
            return 0.0
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        wanted = min(float(max(ready, 1)), self.capacity)
        return (wanted - self.tokens) / self.rate


class _Throttled:
    """Log one warning per interval, with the count of what it stood for."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = -interval
        self.suppressed = 0

    def __call__(self, message: str, *args: object) -> None:
        now = _monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        self.last = now
        extra, self.suppressed = self.suppressed, 0
        log.warning(message + " (%d more since the last warning)", *args, extra)


class Worker:
    """The queue and the sender thread behind one :class:`~produl_server.Produl`.

    Args:
        config: The client's configuration.
        transport_factory: Builds the transport (the sender's, made lazily).
    """

    def __init__(
        self, config: Config, transport_factory: Callable[[Config], Transport] = Transport
    ) -> None:
        self._config = config
        self._make_transport = transport_factory
        self._reset()

    def _reset(self) -> None:
        """Fresh state: at construction, and in a child after ``fork()``."""
        config = self._config
        self._queue: queue.Queue[bytes] = queue.Queue(config.max_queue_size)
        # The deque behind the queue: len() of it is atomic and lock-free,
        # which keeps the caller's path to one lock (inside put_nowait).
        self._items = self._queue.queue
        self._wake = threading.Event()
        #: True while the sender waits for time or lanes, not for events.
        self._resting = False
        self._lock = threading.Lock()
        self._round_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._inline = config.sync_mode
        self._transport: Transport | None = None
        self._pending: collections.deque[_Item] = collections.deque()
        self._inflight: list[_Item] = []
        self._lanes = 0
        self._jobs: queue.SimpleQueue[tuple[_Item, float | None] | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[_Item, Outcome]] = collections.deque()
        self._new_flushes: list[threading.Event] = []
        self._flushes: list[tuple[int, threading.Event]] = []
        self._last_enqueue = 0.0
        self._first_enqueue = 0.0
        self._not_before = 0.0
        self._failures = 0
        #: When the collector stopped answering (0 while it answers): events
        #: pulled during an outage count their retry time from its start.
        self._outage_since = 0.0
        #: Smoothed seconds per request, to size the lanes to the quota.
        self._latency = 0.0
        rate = config.max_requests_per_minute
        # Pacing off: a nominal 250/s, so that lanes open only once a request
        # takes more than about 3 ms; on a fast local link the extra threads
        # would cost more CPU than they save time.
        self._target_rate = rate / 60.0 if rate else 250.0
        self._deadline: float | None = None
        self._finished = False
        self._closed_event = threading.Event()
        self._lost = 0
        self._pulled = 0
        self._handled = 0
        self._drain_to = 0
        self._pacer = _Pacer(config.max_requests_per_minute)
        self._sent = 0
        self._retried = 0
        self._dropped: collections.Counter[str] = collections.Counter()
        self._warn_full = _Throttled(60.0)
        self._key_reported = False

    def after_fork_in_child(self) -> None:
        """Start the child empty, with its own locks, queue and (lazy) thread.

        The parent's queued events stay the parent's: sending them here too
        would deliver them twice. Every lock is replaced, so one that another
        thread of the parent held at fork time cannot deadlock the child.
        """
        transport = self._transport
        self._reset()
        if transport is not None:
            transport.abandon()

    # -- the caller's side -------------------------------------------------

    def put(self, body: bytes) -> None:
        """Queue one encoded event; never blocks, never raises for delivery."""
        if self._deadline is not None:
            self._report(body, "shutdown", "track_*() called after shutdown(); not sent")
            return
        if self._thread is None and not self._inline:
            self._start()
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            self._warn_full(
                "produl_server: the queue is full (%d events); new events are dropped",
                self._config.max_queue_size,
            )
            self._report(body, "queue_full", "the queue is full", quiet=True)
            return
        now = _monotonic()
        self._last_enqueue = now
        waiting = len(self._items)
        if waiting == 1:
            self._first_enqueue = now
            self._wake.set()
        elif waiting >= self._config.flush_at and not self._resting and not self._wake.is_set():
            # Skipped while the sender waits for time to pass (the pacer, a
            # backoff, busy lanes): one more event changes nothing for it,
            # and waking it per event would cost every request handler.
            self._wake.set()
        if self._inline:
            self._drain_inline(now + self._config.request_timeout, wait=False)

    def flush(self, timeout: float | None) -> bool:
        """Send everything queued now; wait at most *timeout* seconds.

        Returns:
            True when every event queued before the call was delivered or
            definitively handled (dropped and reported).
        """
        if self._finished:
            return self._is_empty()
        thread = self._thread
        if thread is None or self._inline or not thread.is_alive():
            deadline = None if timeout is None else _monotonic() + timeout
            return self._drain_inline(deadline, wait=True)
        if thread is threading.current_thread():
            log.warning("flush() called from the sender thread (an on_error hook?); ignored")
            return False
        done = threading.Event()
        with self._lock:
            self._new_flushes.append(done)
        self._wake.set()
        # A shutdown that gave up on events also releases waiting flushes.
        return done.wait(timeout) and not self._lost

    def begin_close(self, deadline: float) -> None:
        """Stop accepting events and send what is left until *deadline*."""
        with self._lock:
            if self._deadline is None:
                self._deadline = deadline
        self._wake.set()

    def begin_close_soon(self) -> None:
        """:meth:`begin_close` with the configured ``shutdown_timeout``."""
        self.begin_close(_monotonic() + self._config.shutdown_timeout)

    def wait_closed(self) -> None:
        """Wait (until the deadline) for the sender to finish, then report."""
        deadline = self._deadline if self._deadline is not None else _monotonic()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - _monotonic()))
        elif thread is None or not thread.is_alive():
            # No thread to do it (never started, or after fork): send from
            # here. Starting a thread now could fail at interpreter exit.
            self._drain_inline(deadline, wait=True)
        self._finish()

    def close(self, timeout: float | None) -> None:
        """:meth:`begin_close` and :meth:`wait_closed` with one budget."""
        budget = self._config.shutdown_timeout if timeout is None else timeout
        self.begin_close(_monotonic() + budget)
        self.wait_closed()

    @property
    def closed(self) -> bool:
        """Whether shutdown has begun."""
        return self._deadline is not None

    def stats(self) -> Stats:
        """A snapshot of the counters."""
        with self._lock:
            handled, pulled = self._handled, self._pulled
            waiting = self._queue.qsize()
            return Stats(
                queued=pulled + waiting,
                sent=self._sent,
                retried=self._retried,
                dropped=dict(self._dropped),
                pending=waiting + pulled - handled,
            )

    # -- the sender's side -------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._inline:
                return
            thread = threading.Thread(target=self._run, name="produl-server.sender", daemon=True)
            try:
                thread.start()
            except RuntimeError:
                # "can't create new thread at interpreter shutdown": a track
                # call from an atexit handler. Send on the caller's thread.
                self._inline = True
                return
            self._thread = thread

    def _grow_lanes(self, wanted: int) -> int:
        """Start lanes up to *wanted* (the first backlog starts them); return how many run."""
        while self._lanes < wanted:
            lane = threading.Thread(
                target=self._lane, name=f"produl-server.sender-{self._lanes + 1}", daemon=True
            )
            try:
                lane.start()
            except RuntimeError:
                # At interpreter exit (3.12+) no thread can start: carry on
                # with the lanes there are, or with the sender alone.
                break
            self._lanes += 1
        return self._lanes

    def _run(self) -> None:
        while True:
            try:
                if self._step():
                    return
            except Exception:
                # The sender must never die: a dead sender loses every event
                # after it, silently. Log, pause briefly, go on.
                log.exception("produl_server: unexpected error in the sender; continuing")
                self._wake.wait(1.0)

    def _lane(self) -> None:
        """An extra connection: sends what the sender hands it, reports back."""
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:  # closed
                return
            item, timeout = job
            self._done.append((item, self._attempt(item, timeout)))
            self._wake.set()

    def _attempt(self, item: _Item, timeout: float | None) -> Outcome:
        """One POST; a bug below us becomes a retry, never a lost event."""
        started = _monotonic()
        try:
            if self._transport is None:  # pragma: no cover - created before any send
                raise RuntimeError("no transport")
            outcome = self._transport.send(item.body, timeout)
            self._latency += (_monotonic() - started - self._latency) * 0.2
            return outcome
        except Exception as exc:
            log.exception("produl_server: unexpected error in the sender; continuing")
            return Outcome(Verdict.RETRY, None, None, "internal", f"internal error: {exc!r}")

    def _step(self) -> bool:
        """Do what is due; wait for the next thing. True when closed."""
        self._wake.clear()
        self._resting = False
        now = _monotonic()
        deadline = self._deadline
        if deadline is not None and (now >= deadline or self._is_empty()):
            self._finish()
            return True
        wait = self._round(now)
        if deadline is not None:
            if self._is_empty():
                self._finish()
                return True
            if self._not_before >= deadline and not self._inflight:
                # Waiting (a Retry-After, a backoff) would outlive the exit
                # budget: stop now rather than hold the process for nothing.
                self._finish()
                return True
            wait = deadline - now if wait is None else min(wait, deadline - now)
        if wait is None or wait > 0:
            self._wake.wait(wait)
        return False

    def _drain_inline(self, deadline: float | None, *, wait: bool) -> bool:
        """Run the sender's rounds on the calling thread (sync mode, no thread)."""
        with self._round_lock:
            while True:
                now = _monotonic()
                self._drain_to = self._pulled + self._queue.qsize()
                if self._is_empty():
                    return True
                if deadline is not None and now >= deadline:
                    return False
                pause = self._round(now, deadline, inline=True)
                if pause and pause > 0:
                    if not wait or (deadline is not None and now + pause >= deadline):
                        return False
                    time.sleep(pause)

    def _is_empty(self) -> bool:
        return not self._pending and not self._items and not self._inflight

    def _due(self, now: float, waiting: int) -> float | None:
        """0 when a batch is due; else seconds until one is, or None for never."""
        if waiting >= self._config.flush_at:
            return 0.0
        if not waiting:
            return None
        due_at = min(
            self._last_enqueue + self._config.flush_interval,
            self._first_enqueue + self._config.max_delay,
        )
        return max(0.0, due_at - now)

    def _round(
        self, now: float, deadline: float | None = None, *, inline: bool = False
    ) -> float | None:
        """Send what is due. Returns seconds until the next step, None for "until woken"."""
        waiting = self._queue.qsize()
        if self._new_flushes:
            with self._lock:
                fresh, self._new_flushes = self._new_flushes, []
            target = self._pulled + waiting
            self._flushes.extend((target, done) for done in fresh)
            self._drain_to = max(self._drain_to, target)
        if self._deadline is not None:
            self._drain_to = self._pulled + waiting
            deadline = self._deadline
        self._settle_done()
        if not self._pending and not self._inflight and self._drain_to <= self._pulled:
            until = self._due(now, waiting)
            if until != 0.0:
                self._complete_flushes()
                return until
            self._drain_to = self._pulled + waiting
        if self._transport is None:
            self._transport = self._make_transport(self._config)
        use_lanes = not inline and self._config.max_in_flight > 1
        while True:
            self._settle_done()
            limit = self._lane_limit() if use_lanes else 1
            if limit > 1 and limit > self._lanes:
                limit = max(1, self._grow_lanes(limit))
            if len(self._pending) < 2 * limit and self._drain_to > self._pulled:
                self._pull()
                continue
            if not self._pending:
                break
            now = _monotonic()
            if now < self._not_before:
                self._resting = True
                return self._not_before - now
            if deadline is not None and now >= deadline:
                break
            if len(self._inflight) >= limit:
                self._resting = True
                return None  # a lane wakes us when it is done
            index = self._next_ready() if limit > 1 else 0
            if index is None:
                self._resting = True
                return None  # every waiting event's visitor has one in flight
            pause = self._pacer.take(now, len(self._pending) + self._drain_to - self._pulled)
            if pause:
                self._not_before = now + pause
                self._resting = True
                return pause
            item = self._pending[index]
            del self._pending[index]
            timeout = None if deadline is None else deadline - now
            self._inflight.append(item)
            if limit == 1:  # no hand-off to a lane: cheaper, same connection
                self._settle(item, self._attempt(item, timeout))
            else:
                self._jobs.put((item, timeout))
        self._complete_flushes()
        return None if self._inflight else 0.0

    def _lane_limit(self) -> int:
        """How many requests may be in flight now.

        With a backlog, as many as the quota can use at the collector's
        current latency (1 at 10 ms, 4 at 100 ms for 2,000/min); without
        one, a single request, so one kept-alive connection carries it all.
        """
        if self._drain_to - self._pulled + len(self._pending) <= self._config.flush_at:
            return 1
        wanted = math.ceil(self._latency * self._target_rate * 1.25)
        return max(1, min(self._config.max_in_flight, wanted))

    def _pull(self) -> None:
        with self._lock:  # so that an event is always counted somewhere
            try:
                body = self._queue.get_nowait()
            except queue.Empty:  # pragma: no cover - drain_to never exceeds what is queued
                self._drain_to = self._pulled
                return
            self._pulled += 1
            item = _Item(body, self._pulled)
            self._pending.append(item)

    def _next_ready(self) -> int | None:
        """The first waiting event that may go now without overtaking its visitor.

        Several requests in flight can arrive in any order, so two events of
        one visitor are never in flight together: per-visitor order holds.
        """
        # Everything in flight went through here (a single request in flight
        # is sent by the sender itself and finished before the next).
        busy = {item.visitor for item in self._inflight}
        for index, item in enumerate(self._pending):
            if item.visitor is _UNREAD:
                item.visitor = json.loads(item.body).get("vi")
            if item.visitor is None or item.visitor not in busy:
                return index
        return None

    def _settle_done(self) -> None:
        done = self._done
        while done:
            item, outcome = done.popleft()
            self._settle(item, outcome)

    def _settle(self, item: _Item, outcome: Outcome) -> None:
        """Account for one attempt; a failure pauses the whole pipe."""
        if self._finished:
            return  # reported as undelivered already
        self._inflight.remove(item)
        if outcome.verdict is Verdict.DELIVERED:
            self._failures = 0
            self._outage_since = 0.0
            self._finish_item(sent=True)
            return
        if outcome.verdict is Verdict.DROP:
            self._outage_since = 0.0
            # The event itself is bad (or the key is): never retry it, and
            # never let it hold up the events behind it.
            self._finish_item(sent=False)
            self._report(item.body, outcome.reason, outcome.detail, outcome.status)
            return
        now = _monotonic()
        if outcome.reason == "rate_limited":
            # A 429 is the collector asking for patience, not failing: it
            # never uses up an event's retry time (PROTOCOL.md: a 429 never
            # loses an event). The bounded queue caps what waits meanwhile.
            self._outage_since = 0.0
        else:
            self._outage_since = self._outage_since or now
            item.failing_since = item.failing_since or self._outage_since
        rate_limited = outcome.reason == "rate_limited"
        if (
            not rate_limited
            and item.failing_since
            and now - item.failing_since >= self._config.max_retry_time
        ):
            self._finish_item(sent=False)
            self._report(
                item.body,
                "retries_exhausted",
                f"gave up after {now - item.failing_since:.0f} s of failures ({outcome.detail})",
                outcome.status,
            )
            return
        self._failures += 1
        if outcome.retry_after is not None:
            pause = outcome.retry_after
        else:
            ceiling = self._config.retry_initial_delay * 2 ** min(self._failures - 1, 30)
            pause = random.uniform(0.0, min(self._config.retry_max_delay, ceiling))
        with self._lock:
            self._retried += 1
            # Back in front of everything not yet sent, in queue order.
            position = 0
            while position < len(self._pending) and self._pending[position].seq < item.seq:
                position += 1
            self._pending.insert(position, item)
        self._not_before = max(self._not_before, now + pause)
        log.info("produl_server: delivery failed (%s); retrying in %.2f s", outcome.detail, pause)

    def _finish_item(self, *, sent: bool) -> None:
        with self._lock:
            self._handled += 1
            if sent:
                self._sent += 1

    def _complete_flushes(self) -> None:
        if self._flushes:
            # Done up to the oldest event still unfinished (events finish out
            # of order when several are in flight or one is being retried).
            unfinished = [item.seq for item in self._inflight]
            if self._pending:
                unfinished.append(self._pending[0].seq)
            oldest = min(unfinished, default=self._pulled + 1)
            keep = []
            for target, done in self._flushes:
                if target < oldest:
                    done.set()
                else:
                    keep.append((target, done))
            self._flushes = keep

    def _finish(self) -> None:
        """Close once: count and log what could not be delivered in time."""
        with self._lock:
            closing_elsewhere = self._finished
            self._finished = True
            left = 0
            if not closing_elsewhere:
                # From the counters, not the containers: an event moving
                # between two of them right now is still counted once.
                left = self._lost = self._pulled + self._queue.qsize() - self._handled
                if left:
                    self._dropped["shutdown"] += left
        if closing_elsewhere:
            # Let the other thread finish its report, or the process could
            # exit before the warning is written.
            self._closed_event.wait(1.0)
            return
        if left:
            log.warning(
                "produl_server: %d event(s) not delivered before the shutdown deadline; "
                "they are lost",
                left,
            )
            if self._config.on_error is not None:
                self._report_lost()
        for _target, done in self._flushes:
            done.set()
        for _lane in range(self._lanes):
            self._jobs.put(None)
        if self._transport is not None:
            self._transport.close()
        self._closed_event.set()

    def _report_lost(self) -> None:
        """Hand each event lost at the shutdown deadline to the error hook."""
        lost = [item.body for item in list(self._inflight) + list(self._pending)]
        while True:
            try:
                lost.append(self._queue.get_nowait())
            except queue.Empty:
                break
        error = DeliveryError("shutdown", "not delivered before the shutdown deadline")
        for body in lost:
            self.call_hook(error, json.loads(body))

    # -- reporting ---------------------------------------------------------

    def _report(
        self,
        body: bytes,
        reason: str,
        message: str,
        status: int | None = None,
        *,
        quiet: bool = False,
    ) -> None:
        """Count a dropped event, log it and hand it to the on_error hook."""
        with self._lock:
            self._dropped[reason] += 1
        if quiet:
            text = message
        elif reason == "unauthorized":
            text = (
                f"the collector refused the server key {mask_key(self._config.server_key)} "
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
        if self._config.on_error is not None:
            self.call_hook(DeliveryError(reason, text, status), json.loads(body))

    def drop_invalid(self, error: Exception, call: dict[str, Any]) -> None:
        """Count, log and report a ``track_*`` call refused by validation.

        Used when ``raise_on_invalid=False`` turns the exception into a drop.
        """
        with self._lock:
            self._dropped["invalid"] += 1
        log.warning("produl_server: invalid event dropped: %s", error)
        self.call_hook(DeliveryError("invalid", str(error)), call)

    def call_hook(self, error: DeliveryError, event: dict[str, Any]) -> None:
        """Hand one problem to the user's ``on_error`` hook; survive its errors."""
        hook = self._config.on_error
        if hook is None:
            return
        try:
            hook(error, event)
        except Exception:
            log.exception("produl_server: the on_error hook raised; delivery goes on")
