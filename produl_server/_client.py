"""The public facade: validate and encode on the caller's thread, then queue.

Also the process-wide hooks: one ``atexit`` handler that flushes every live
client within one shared budget, and one ``os.register_at_fork`` hook that
gives each client a fresh, empty sender in a forked child.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal

from . import _sigterm
from ._config import BeforeSend, Config, ErrorHook, mask_key, mask_url
from ._event import PageviewData, encode_event, encode_pageview, encode_wire, pseudonym
from ._jobs import current_job as _current_job
from ._ledger import Stats
from ._threads import signals_blocked
from ._wiring import wire
from ._worker import Worker
from .exceptions import DeliveryError, InvalidEventError

log = logging.getLogger("produl_server")

# Workers, not clients: a client that was garbage-collected with events
# still queued must be flushed at exit too. A worker leaves this set when it
# is shut down explicitly.
_live: weakref.WeakSet[Worker] = weakref.WeakSet()
_live_lock = threading.Lock()
_flushing = threading.Lock()


class Produl:
    """Tracks pageviews and events from a backend; delivery happens in the background.

    ``track_*`` calls validate their input, encode it and queue it in
    microseconds; a daemon thread delivers the queue to ``{api_url}/api/collect``
    when 10 events are waiting, 5 seconds after the last one was queued,
    on :meth:`flush`, and when the interpreter exits.

    Args:
        server_key: The site's server key. Default: the ``PRODUL_SERVER_KEY``
            environment variable.
        api_url: Where to send events. Default: ``PRODUL_API_URL``, else
            ``https://app.produl.tech``.
        enabled: ``False`` makes a client that validates every call but
            sends nothing: it needs no server key, starts no thread and
            opens no file (no spool, no shared quota, no Redis). Default:
            the ``PRODUL_ENABLED`` environment variable (``0``, ``false``,
            ``no`` or ``off`` turn it off), else ``True``.
        sync_mode: Send on the caller's thread, for hosts that cannot run
            threads. Each ``track_*`` call then waits for its request.
        flush_at: Send when this many events are queued.
        flush_interval: Send this many seconds after the last enqueue.
        max_delay: Send at the latest this many seconds after the oldest
            queued event was queued, even if events keep arriving.
        max_queue_size: Events held at most; beyond it new events are dropped
            (counted, logged) instead of blocking the caller.
        shutdown_timeout: Seconds the exit (or :meth:`shutdown`) may spend
            delivering what is left.
        request_timeout: Seconds for one whole request (connection, TLS,
            answer); through a proxy, to connect and for each wait on the answer.
        max_requests_per_minute: The client-side pace; ``None`` turns it off.
        max_retry_time: Seconds an event may keep failing (408, 5xx,
            timeouts, network errors) before it is given up and reported,
            counted from the start of the outage it failed in. 429 answers
            never count: the collector asked for patience.
        max_in_flight: The most requests sent at once, each on its own
            kept-alive connection (1 to 32). Used only with a backlog, and
            only as many as the rate quota can use at the measured latency;
            two events of one visitor are never in flight together, so each
            visitor's events arrive in order.
        retry_initial_delay: The first backoff ceiling, doubled per failure.
        retry_max_delay: The largest backoff between two attempts.
        raise_on_invalid: ``False`` turns :class:`InvalidEventError` into a
            logged, counted drop.
        on_error: Called as ``on_error(error, event)`` with a
            :class:`~produl_server.DeliveryError` for every event that is
            dropped: refused by the collector, out of retries, lost at the
            shutdown deadline, refused at the door (``queue_full``,
            ``invalid`` with ``raise_on_invalid=False``, after shutdown).
            Delivery problems call it on the sender thread, door refusals on
            the caller's, shutdown losses on the thread that shuts down (or
            the exit hook); it must be quick and must not block.
        proxy: An HTTP(S) proxy URL, credentials included if it needs
            them. Default: the ``HTTPS_PROXY`` / ``HTTP_PROXY`` /
            ``NO_PROXY`` environment variables, never used for a collector
            on this machine.
        verify: ``False`` to skip TLS verification, or a CA bundle path.
        shared_quota: ``True`` (the default): pace with every client of
            this user on this host that sends to the same ``api_url``, in
            one ``max_requests_per_minute`` window, since the API's limit is
            per IP address. ``False`` paces this process alone.
        quota_dir: The directory of the shared quota's small file. Default:
            ``PRODUL_QUOTA_DIR``, else the user's runtime directory
            (``XDG_RUNTIME_DIR``), else the temp directory. Point it at a
            volume shared by containers that leave through one address.
        spool_dir: A directory where events that cannot be sent in time are
            kept instead of dropped (at the shutdown deadline, when the
            queue is full, out of retry time in an outage); the next client
            that opens it delivers them first. Default: ``PRODUL_SPOOL_DIR``,
            else the default spool: what the exit could not send is kept in
            ``$XDG_STATE_HOME/produl-server/spool`` (else
            ``~/.local/state/produl-server/spool``), for a week at most,
            and the next client with the same key and URL delivers it
            first. ``False`` (or ``PRODUL_SPOOL_DIR=off``) keeps nothing.
        redis_url: A Redis shared by a fleet behind one IP address
            (``redis://``, ``rediss://`` or ``unix://``; needs
            ``produl-server[redis]``). Every client that uses it paces in
            one fleet-wide window per ``api_url``, and spools in Redis, so
            any pod delivers what another could not. Only the sender talks
            to Redis; while it does not answer, the client paces with this
            host's quota and spools in ``spool_dir`` (or keeps events in
            memory). Default: ``PRODUL_REDIS_URL``, else none.
        quota_key: The name of the fleet's quota window in Redis, for
            clients that leave through one address but send to different
            API URLs. Default: ``PRODUL_QUOTA_KEY``, else the
            ``api_url``.
        before_send: Called on the caller's thread with each valid event
            as a plain dict in the API's words (``t``, ``n``, ``p``, ``u``,
            ``vi``, ``sk``, ``ti``, ``r``, ``l``, ``pr``; a fresh copy it may
            change). It returns the dict to send, changed or not, which is
            validated like the arguments of ``track_*``, or ``None`` to drop
            the event (counted as ``before_send``, not an error). If it
            raises, the event is dropped (counted as ``before_send_error``,
            logged once per cause, handed to ``on_error``): a privacy filter
            that failed must not let through what it was meant to remove.
        visitor_id_secret: A secret (str or bytes, at least 16 bytes) that
            turns every ``visitor_id`` and ``session_key`` into a keyed hash
            (HMAC-SHA256, 64 hex digits) before the event reaches
            ``before_send`` and the queue: the same id always gives the same
            pseudonym, another secret another one. Default:
            ``PRODUL_VISITOR_SECRET``, else ids are sent as given.
        default_properties: Properties every custom event carries, such as
            ``environment``, ``release`` or ``service``, merged under the
            event's own (the call's keys win; they count toward the size
            limit). Validated and copied here. Default: the JSON object in
            ``PRODUL_DEFAULT_PROPERTIES``, else none.

    Raises:
        ConfigurationError: No server key (on an enabled client), or an
            invalid option.
    """

    def __init__(
        self,
        server_key: str | None = None,
        *,
        api_url: str | None = None,
        enabled: bool | None = None,
        sync_mode: bool = False,
        flush_at: int = 10,
        flush_interval: float = 5.0,
        max_delay: float = 30.0,
        max_queue_size: int = 10_000,
        shutdown_timeout: float = 5.0,
        request_timeout: float = 10.0,
        max_requests_per_minute: int | None = 2000,
        max_retry_time: float = 600.0,
        max_in_flight: int = 4,
        retry_initial_delay: float = 0.5,
        retry_max_delay: float = 30.0,
        raise_on_invalid: bool = True,
        on_error: ErrorHook | None = None,
        proxy: str | None = None,
        verify: bool | str = True,
        shared_quota: bool = True,
        quota_dir: str | os.PathLike[str] | None = None,
        spool_dir: str | os.PathLike[str] | Literal[False] | None = None,
        redis_url: str | None = None,
        quota_key: str | None = None,
        before_send: BeforeSend | None = None,
        default_properties: Mapping[str, Any] | None = None,
        visitor_id_secret: str | bytes | None = None,
    ) -> None:
        self._config = Config.from_env(
            server_key,
            api_url,
            enabled=enabled,
            sync_mode=sync_mode,
            flush_at=flush_at,
            flush_interval=flush_interval,
            max_delay=max_delay,
            max_queue_size=max_queue_size,
            shutdown_timeout=shutdown_timeout,
            request_timeout=request_timeout,
            max_requests_per_minute=max_requests_per_minute,
            max_retry_time=max_retry_time,
            max_in_flight=max_in_flight,
            retry_initial_delay=retry_initial_delay,
            retry_max_delay=retry_max_delay,
            raise_on_invalid=raise_on_invalid,
            on_error=on_error,
            proxy=proxy,
            verify=verify,
            shared_quota=shared_quota,
            quota_dir=quota_dir,
            spool_dir=spool_dir,
            redis_url=redis_url,
            quota_key=quota_key,
            before_send=before_send,
            default_properties=default_properties,
            visitor_id_secret=visitor_id_secret,
        )
        self._worker = Worker(self._config, wiring=wire(self._config))
        self._before_send = before_send
        self._defaults = self._config.default_properties
        self._secret = self._config.visitor_id_secret
        self._enabled = enabled = self._config.enabled
        self._raise = raise_on_invalid
        #: Events lost or set aside as of the last flush() (see _losses).
        self._losses_seen = 0
        self._losses_lock = threading.Lock()
        if enabled:
            with _live_lock:
                _live.add(self._worker)
            _arm_multiprocessing()
            # A client dropped without shutdown() lets its sender drain and
            # end, instead of leaving an idle thread per forgotten client.
            weakref.finalize(self, self._worker.begin_close_soon).atexit = False

    def __repr__(self) -> str:
        state = "enabled" if self._enabled else "disabled"
        if self._worker.closed:
            state = "shut down"
        url = mask_url(self._config.api_url)
        return f"<Produl {url} key={mask_key(self._config.server_key)} {state}>"

    @property
    def config(self) -> Config:
        """The validated, immutable configuration (its repr masks the key)."""
        return self._config

    def track_pageview(
        self,
        data: PageviewData | None = None,
        /,
        *,
        path: str | None = None,
        visitor_id: str | int | uuid.UUID | None = None,
        url: str | None = None,
        title: str | None = None,
        referrer: str | None = None,
        session_key: str | int | uuid.UUID | None = None,
        language: str | None = None,
    ) -> None:
        """Queue a server-side pageview.

        Pass keyword arguments, or one :class:`PageviewData`.

        Args:
            data: A :class:`PageviewData`, instead of the keyword arguments.
            path: The normalized path, starting with ``/`` (required).
            visitor_id: A stable identifier for the visitor (required).
            url: Full URL; defaults to ``https://server{path}``.
            title: Page title.
            referrer: Referrer URL.
            session_key: Groups pageviews into a session.
            language: The visitor's language, a BCP 47 tag such as ``en`` or
                ``fr-CH`` (at most 35 characters), sent as ``l``.

        Raises:
            InvalidEventError: A required field is missing, a value has the
                wrong type or is too long (unless ``raise_on_invalid=False``).
                Nothing is queued.
        """
        if data is not None:
            given: object = data  # typed callers cannot get this wrong; others can
            if not isinstance(given, PageviewData):
                self._refuse(
                    InvalidEventError("data", f"must be a PageviewData, not {type(data).__name__}"),
                    {"data": repr(data)[:200]},
                )
                return
            path, visitor_id, url = data.path, data.visitor_id, data.url
            title, referrer, session_key = data.title, data.referrer, data.session_key
            language = data.language
        try:
            if self._secret is not None:
                visitor_id = pseudonym("visitor_id", visitor_id, self._secret)
                session_key = pseudonym("session_key", session_key, self._secret)
            body = encode_pageview(path, visitor_id, url, title, referrer, session_key, language)
        except InvalidEventError as exc:
            self._refuse(exc, {"t": "pv", "p": path, "vi": visitor_id})
            return
        if self._before_send is not None:
            filtered = self._filter(self._before_send, body)
            if filtered is None:
                return
            body = filtered
        if self._enabled:
            self._worker.put(body)

    def track_event(
        self,
        name: str,
        properties: dict[str, Any] | None = None,
        *,
        visitor_id: str | int | uuid.UUID | None = None,
        path: str | None = None,
        url: str | None = None,
        session_key: str | int | uuid.UUID | None = None,
    ) -> None:
        """Queue a custom event.

        Args:
            name: The event name, 1 to 200 characters.
            properties: A JSON-compatible dict. ``datetime``, ``date``,
                ``Decimal``, ``UUID``, ``Enum`` and tuples are converted;
                the dict is copied, so later changes to it are not sent.
            visitor_id: A stable identifier for the visitor (recommended).
            path: The path the event happened on, starting with ``/``.
            url: Full URL; defaults to ``https://server{path}`` when a path
                is given.
            session_key: Groups events into a session.

        Raises:
            InvalidEventError: The name is missing, a value has the wrong
                type, cannot be JSON or is too long; the message names the
                argument or key path (unless ``raise_on_invalid=False``).
                Nothing is queued.
        """
        base = self._defaults
        job = _current_job()
        if job is not None:  # inside a task-queue job: its queue and name
            base = dict(job) if base is None else {**base, **job}
        if base is not None:
            if properties is None:
                properties = base
            elif isinstance(properties, Mapping):
                properties = {**base, **properties}
        try:
            if self._secret is not None:
                visitor_id = pseudonym("visitor_id", visitor_id, self._secret)
                session_key = pseudonym("session_key", session_key, self._secret)
            body = encode_event(name, properties, visitor_id, path, url, session_key)
        except InvalidEventError as exc:
            self._refuse(exc, {"t": "ev", "n": name, "vi": visitor_id})
            return
        if self._before_send is not None:
            filtered = self._filter(self._before_send, body)
            if filtered is None:
                return
            body = filtered
        if self._enabled:
            self._worker.put(body)

    def _filter(self, hook: BeforeSend, body: bytes) -> bytes | None:
        """Run ``before_send``: the body to queue, or None when dropped."""
        event: dict[str, Any] = json.loads(body)
        try:
            result = hook(event)
        except Exception as exc:
            # Fail closed: the event is dropped, never sent unfiltered.
            _report_hook_failure(exc)
            self._worker.drop_at_door(
                "before_send_error",
                DeliveryError(
                    "before_send_error",
                    f"event dropped: before_send raised {type(exc).__name__}",
                ),
                event,
            )
            return None
        if result is None:
            self._worker.drop_at_door("before_send", None, event)
            return None
        try:
            new_body = encode_wire(result)
        except InvalidEventError as exc:
            self._refuse(
                exc, result if type(result) is dict else {"before_send": repr(result)[:200]}
            )
            return None
        return new_body

    def _refuse(self, error: InvalidEventError, call: dict[str, Any]) -> None:
        if self._raise:
            raise error
        self._worker.drop_invalid(error, call)

    def flush(self, timeout: float | None = None) -> bool:
        """Send every queued event now and wait until done or *timeout*.

        A flush does not cut short a pause the collector asked for (429
        ``Retry-After``) or a retry backoff: with ``timeout=None`` it waits
        through an outage (up to ``max_retry_time``) and for as long as 429
        answers last, so give serverless handlers a timeout. Called from the sender
        thread (an ``on_error`` hook), it returns False at once with a warning.

        Args:
            timeout: Seconds to wait at most (at most a day; NaN or a
                negative number counts as 0); ``None`` waits until done.

        Returns:
            True when every event queued before the call was delivered, and
            no event was dropped or spooled since the previous ``flush()``
            returned (or since the client was made). False when the timeout
            ran out first, or when any event was dropped (a wrong key, a
            refused event, retries given up, a full queue) or spooled
            meanwhile: :attr:`stats` says which. An event that
            ``before_send`` dropped on purpose does not count.
        """
        done = self._worker.flush(timeout)
        losses = self._losses()
        with self._losses_lock:
            clean = losses == self._losses_seen
            self._losses_seen = losses
        return done and clean

    def _losses(self) -> int:
        stats = self._worker.stats()
        return stats.spooled + stats.dropped_total - stats.dropped.get("before_send", 0)

    def shutdown(self, timeout: float | None = None) -> None:
        """Deliver what is queued (within *timeout*), then stop the sender.

        Idempotent. The client leaves the exit hook (there is nothing left
        for it to do at exit). Events tracked afterwards are dropped and
        reported. Events still undelivered at the deadline are counted as
        dropped (``shutdown``), logged and handed to ``on_error``.

        Args:
            timeout: Seconds to spend at most (at most a day); default
                ``shutdown_timeout``.
        """
        with _live_lock:
            _live.discard(self._worker)
        self._worker.close(timeout)

    async def aflush(self, timeout: float | None = None) -> bool:
        """:meth:`flush` for coroutines: wait without blocking the event loop.

        The blocking wait runs in a short-lived daemon thread of its own, not
        in the loop's default executor: a long wait never takes an executor
        thread, and never holds up the loop's (or the interpreter's) exit.
        Cancelling the awaiting task stops the waiting, not the flush.
        ``timeout=None`` waits as long as :meth:`flush` does (through an
        outage, up to ``max_retry_time``): give a timeout where that matters.

        Args:
            timeout: Seconds to wait at most; ``None`` waits until done.

        Returns:
            The result of :meth:`flush`.
        """
        import asyncio  # noqa: PLC0415 -- only coroutines pay for it
        import concurrent.futures  # noqa: PLC0415

        result: concurrent.futures.Future[bool] = concurrent.futures.Future()
        result.set_running_or_notify_cancel()  # a cancelled await leaves it be

        def wait() -> None:
            try:
                result.set_result(self.flush(timeout))
            except BaseException as exc:
                result.set_exception(exc)

        with signals_blocked():
            threading.Thread(target=wait, name="produl-server.aflush", daemon=True).start()
        return await asyncio.wrap_future(result)

    async def ashutdown(self, timeout: float | None = None) -> None:
        """:meth:`shutdown` for coroutines: wait without blocking the event loop.

        It waits as :meth:`aflush` does, at most *timeout* (default
        ``shutdown_timeout``) seconds. Cancelling the awaiting task does not
        stop the shutdown.

        Args:
            timeout: Seconds to spend at most; default ``shutdown_timeout``.
        """
        import asyncio  # noqa: PLC0415 -- only coroutines pay for it
        import concurrent.futures  # noqa: PLC0415

        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        done.set_running_or_notify_cancel()  # a cancelled await leaves it be

        def close() -> None:
            try:
                self.shutdown(timeout)
                done.set_result(None)
            except BaseException as exc:
                done.set_exception(exc)

        with signals_blocked():
            threading.Thread(target=close, name="produl-server.ashutdown", daemon=True).start()
        await asyncio.wrap_future(done)

    @property
    def stats(self) -> Stats:
        """A snapshot of the delivery counters (see :class:`Stats`)."""
        return self._worker.stats()

    def __enter__(self) -> Produl:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


_hook_failures: set[tuple[str, str, int]] = set()
_hook_failures_lock = threading.Lock()


def _report_hook_failure(exc: Exception) -> None:
    """Log a ``before_send`` failure once per cause: exception type and where it was raised."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else ("?", 0)
    cause = (type(exc).__qualname__, *where)
    with _hook_failures_lock:
        if cause in _hook_failures:
            return
        _hook_failures.add(cause)
    log.error(
        "produl_server: before_send raised %s at %s:%d; the event is dropped "
        "(logged once per cause)",
        cause[0],
        where[0],
        where[1],
        exc_info=exc,
    )


def worker_of(client: Produl) -> Worker:
    """The worker behind *client*, for the CLI's ``drain`` (not public API)."""
    return client._worker


def _flush_at_exit() -> None:
    """Give every live client one shared budget to deliver what is left."""
    with _sigterm.exit_flush():
        _flush_live()


def _flush_live() -> None:
    # One exit flush at a time. A second one (a multiprocessing child's
    # finalizer while the SIGTERM listener delivers) finds no worker left,
    # and would let the process end under the first: it waits for it to
    # finish instead, which its deadline bounds.
    with _flushing:
        with _live_lock:
            workers = list(_live)
            _live.clear()
        if workers:
            _close_all(workers)


def _close_all(workers: list[Worker]) -> None:
    # One budget for the whole process, not one per client: the largest
    # configured shutdown_timeout, started once.
    deadline = time.monotonic() + max(w.shutdown_timeout for w in workers)
    for worker in workers:
        worker.begin_close(deadline)
    for worker in workers:
        worker.wait_closed()


def _after_fork_in_child() -> None:
    global _flushing, _live_lock, _mp_armed
    # The parent's threads may have held the locks at fork time.
    _live_lock = threading.Lock()
    _flushing = threading.Lock()
    _sigterm.after_fork_in_child()
    for worker in list(_live):
        worker.after_fork_in_child()
    _mp_armed = False
    _arm_multiprocessing()


# -- multiprocessing children ----------------------------------------------
#
# A multiprocessing child ends through os._exit() after running
# multiprocessing's own finalizers, so atexit handlers never run there. A
# finalizer of ours, registered in the child, delivers what it tracked. A
# fork or forkserver child clears the finalizers it inherited when it
# starts, and then runs its "after fork" callbacks: one of those registers
# the finalizer. A spawn child runs none; it registers it while it imports
# the parent's main module, which makes its client. (A spawn child also
# ends through sys.exit(), so atexit delivers there too.)

_mp_armed = False
_MP_EXIT_PRIORITY = 100  # before multiprocessing's own, which use 0 to 10


class _Anchor:
    """A long-lived object for multiprocessing's weak after-fork registry."""


_anchor = _Anchor()


def _arm_multiprocessing() -> None:
    """Make multiprocessing children flush at their end (once per process)."""
    global _mp_armed
    if _mp_armed:
        return
    util = sys.modules.get("multiprocessing.util")
    process = sys.modules.get("multiprocessing.process")
    if util is None or process is None:
        return  # not imported: this process starts no multiprocessing child
    _mp_armed = True
    util.register_after_fork(_anchor, _register_finalizer)
    if process.parent_process() is not None or getattr(
        process.current_process(), "_inheriting", False
    ):
        # A client made inside a running child, or by a spawn child while it
        # imports the parent's main module (spawn runs no after-fork
        # callback): arm this child now.
        _register_finalizer(_anchor)


def _register_finalizer(_anchor: object) -> None:
    util = sys.modules["multiprocessing.util"]
    util.Finalize(None, _flush_at_exit, exitpriority=_MP_EXIT_PRIORITY)
    # Pool.terminate() ends its workers with SIGTERM (see _sigterm).
    _sigterm.arm(_flush_live)


atexit.register(_flush_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
