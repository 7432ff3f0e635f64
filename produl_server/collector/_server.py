"""The collector's lifecycle: bind, serve on a thread, stop promptly."""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from http.server import ThreadingHTTPServer
from typing import Any

from produl_server._protocol import KEYED_RATE_LIMIT, KEYLESS_RATE_LIMIT
from produl_server._threads import leave_signals_to_others
from produl_server.collector._access import HostCheck
from produl_server.collector._faults import Faults
from produl_server.collector._fleet import FleetView
from produl_server.collector._http import CollectorHandler
from produl_server.collector._pace import PaceHistory
from produl_server.collector._ratelimit import DEFAULT_RATE_LIMIT_MODE, DEFAULT_WINDOW, RateLimiter
from produl_server.collector._record import RecordedRequest
from produl_server.collector._store import Store, StoredEvent

logger = logging.getLogger("produl_server.collector")

#: How long stop() waits for connection threads to finish closing.
_STOP_JOIN_SECONDS = 5.0

#: Connections served at once, one thread each; more are closed at once
#: (issue #18, item 13: 3,000 slow connections made 3,002 threads).
MAX_CONNECTIONS = 256

#: Seconds one request may take to arrive, from its first byte to the last
#: byte of its body; a slower one is cut (one byte every 20 s kept a thread
#: forever, since each read stayed under the idle timeout).
REQUEST_DEADLINE = 30.0


def _serve(httpd: socketserver.BaseServer) -> None:
    # Signals go to the application's threads (the CLI's main thread, a test
    # runner's timeout), never to ours; connection threads inherit the mask.
    leave_signals_to_others()
    httpd.serve_forever(poll_interval=0.05)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog is 5: a fleet of clients opening their
    # lanes at once overflowed it, and the kernel dropped connections.
    request_queue_size = 128

    def __init__(self, collector: CollectorServer, address: tuple[str, int]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.collector = collector
        self._lock = threading.Lock()
        self._open: dict[threading.Thread, socket.socket] = {}
        #: Requests arriving now, by socket: the monotonic time they are cut at.
        self._arriving: dict[socket.socket, float] = {}
        self._refused_logged = False
        super().__init__(address, CollectorHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can
        # take seconds on a machine without a resolver; we need no name.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = len(self._open) >= self.collector.max_connections
        if full:
            if not self._refused_logged:
                self._refused_logged = True
                logger.warning(
                    "%d connections open, the most this collector serves at once; "
                    "closing new ones until some end (logged once)",
                    self.collector.max_connections,
                )
            self.shutdown_request(request)
            return
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name="produl-server.collector.connection",
            daemon=True,
        )
        # Registered before the thread runs, so stop() sees every connection.
        with self._lock:
            self._open[thread] = request
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open.pop(threading.current_thread(), None)

    def arriving(self, sock: socket.socket) -> None:
        """A request began to arrive on *sock*: cut it at the request deadline."""
        with self._lock:
            self._arriving[sock] = time.monotonic() + self.collector.request_deadline

    def arrived(self, sock: socket.socket) -> None:
        """The request on *sock* has arrived whole (or its connection ends)."""
        with self._lock:
            self._arriving.pop(sock, None)

    def service_actions(self) -> None:
        # Called by serve_forever every poll interval (0.05 s): no thread of
        # its own is needed to cut requests that arrive too slowly.
        now = time.monotonic()
        with self._lock:
            late = [sock for sock, deadline in self._arriving.items() if deadline <= now]
            for sock in late:
                del self._arriving[sock]
        for sock in late:
            logger.debug("a request took over %g s to arrive; cut", self.collector.request_deadline)
            _shutdown(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client vanishing is
        # normal. Failures of the collector itself are answered (500/503) and
        # logged at ERROR by the handler before they could get here.
        logger.debug("error while answering %s", client_address, exc_info=True)

    def close_connections(self, timeout: float) -> None:
        """Shut every open connection down and wait for their threads."""
        with self._lock:
            open_now = dict(self._open)
        for sock in open_now.values():
            _shutdown(sock)
        deadline = time.monotonic() + timeout
        for thread in open_now:
            thread.join(max(0.0, deadline - time.monotonic()))


def _shutdown(sock: socket.socket) -> None:
    # OSError: its thread closed it already.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class CollectorServer:
    """A local stand-in for Produl's collection API, served on a thread.

    This is the engine behind :class:`~produl_server.testing.LocalCollector`
    and the ``produl-server collector`` command.

    Args:
        store: Where accepted events go.
        server_key: The only key accepted in ``X-Produl-Server-Key``.
        host: Interface to bind.
        port: TCP port; 0 picks a free one.
        rate_limit: Keyed requests per minute per client IP; ``None`` for no limit.
        keyless_rate_limit: Requests without a key (browser requests carrying
            a site id ``k``) per minute per client IP; ``None`` for no limit.
        rate_limit_mode: The window's shape: ``"bucket"`` (the default, a
            token bucket), ``"fixed"`` or ``"sliding"``; see
            :class:`RateLimiter`.
        rate_limit_window: Seconds per window; 60 (a minute) like Produl.
        send_retry_after: Send ``Retry-After`` with each ``429``. Produl
            does not promise the header; ``False`` answers without it.
        access_token: The secret that unlocks ``/api/events`` besides the
            server key; ``None`` generates one.
        allowed_hosts: Names to accept in the ``Host`` header besides
            loopback names and the bound address (e.g. a container's name).
        record_requests: Remember every request (for tests; grows without bound).
        on_event: Called with each stored event, on the connection's thread.
        redis_url: A Redis whose fleet quota windows (``redis_url`` of the
            clients) ``/api/pace`` and the live page show; needs ``redis``.
        max_connections: Connections served at once (one thread each);
            more are closed as soon as they are accepted.
        request_deadline: Seconds a request may take to arrive, from its
            first byte to its body's last; a slower one is cut.
        strict: Refuse with ``400`` (error ``missing_field``, ``field`` the
            first one missing) an event that lacks ``u``, ``p``, ``vi`` or
            ``sk``, which the API reference marks required and Produl may
            drop even after a ``2xx``. Off by default: such events are
            stored and flagged (``warnings`` in ``/api/events``).

    Raises:
        ValueError: When ``server_key`` or ``access_token`` is empty, or a
            rate-limit, connection or deadline option is invalid.
    """

    def __init__(
        self,
        *,
        store: Store,
        server_key: str,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limit: int | None = KEYED_RATE_LIMIT,
        keyless_rate_limit: int | None = KEYLESS_RATE_LIMIT,
        rate_limit_mode: str = DEFAULT_RATE_LIMIT_MODE,
        rate_limit_window: float = DEFAULT_WINDOW,
        send_retry_after: bool = True,
        access_token: str | None = None,
        allowed_hosts: Iterable[str] = (),
        record_requests: bool = False,
        on_event: Callable[[StoredEvent], None] | None = None,
        redis_url: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        request_deadline: float = REQUEST_DEADLINE,
        strict: bool = False,
    ) -> None:
        if not server_key:
            raise ValueError("the collector needs a server key")
        if access_token is not None and not access_token:
            raise ValueError("the access token must not be empty")
        if not 1 <= max_connections <= 100_000:
            raise ValueError(f"max_connections must be 1 to 100000, not {max_connections}")
        if not 0 < request_deadline <= 3600:
            raise ValueError(
                f"request_deadline must be over 0 and at most 3600, not {request_deadline}"
            )
        self.max_connections = max_connections
        self.request_deadline = float(request_deadline)
        self.store = store
        self.server_key = server_key
        #: Unlocks ``GET``/``DELETE /api/events`` (as does the server key).
        self.access_token = access_token or secrets.token_urlsafe(24)
        self.host = host
        self.host_check = HostCheck(host, allowed_hosts)
        self.requested_port = port

        def limiter(limit: int | None) -> RateLimiter | None:
            if limit is None:
                return None
            return RateLimiter(limit, mode=rate_limit_mode, window=rate_limit_window)

        self.keyed_limiter = limiter(rate_limit)
        self.keyless_limiter = limiter(keyless_rate_limit)
        # Validates the mode and window even when both limits are off.
        RateLimiter(1, mode=rate_limit_mode, window=rate_limit_window)
        self.send_retry_after = send_retry_after
        #: Refuse (400) events that lack a field the API reference marks required.
        self.strict = strict
        self._failures_logged: set[str] = set()
        self.record_requests = record_requests
        self.on_event = on_event
        self.faults = Faults()
        #: Answered collection requests and ``429``\ s per second (``/api/pace``).
        self.pace = PaceHistory()
        #: A fleet's quota windows in Redis, shown on the live page.
        self.fleet = None if redis_url is None else FleetView(redis_url)
        #: Notified whenever an event is stored or a request recorded.
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        #: POSTs read and waiting out latency or a hang right now.
        self.held = 0
        self._requests: list[RecordedRequest] = []
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port.

        Raises:
            RuntimeError: If the server is not running.
        """
        if self._httpd is None:
            raise RuntimeError("the collector is not running; call start() first")
        return self._httpd.server_port

    @property
    def url(self) -> str:
        """The base URL clients use, e.g. ``http://127.0.0.1:8787``.

        Raises:
            RuntimeError: If the server is not running.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def page_url(self) -> str:
        """The live page's address, carrying the access token.

        The token travels in the fragment (``#token=…``): the browser never
        sends it to a server, logs or a ``Referer``; the page's script reads
        it and sends it with each request to ``/api/events``.

        Raises:
            RuntimeError: If the server is not running.
        """
        return f"{self.url}/#token={self.access_token}"

    @property
    def running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._httpd is not None

    def start(self) -> None:
        """Bind and start serving on a daemon thread; a no-op when running.

        Raises:
            OSError: If the address cannot be bound (e.g. the port is in use).
        """
        if self._httpd is not None:
            return
        self.stopping.clear()
        httpd = _HTTPServer(self, (self.host, self.requested_port))
        self._httpd = httpd
        self._thread = threading.Thread(
            target=_serve, args=(httpd,), name="produl-server.collector", daemon=True
        )
        self._thread.start()
        logger.debug("collector listening on %s", self.url)

    def stop(self) -> None:
        """Stop serving and close every connection, idle or busy; idempotent."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self.stopping.set()
        self.faults.released.set()  # wakes POSTs held by hang()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections(_STOP_JOIN_SECONDS)
        thread.join(_STOP_JOIN_SECONDS)
        self._httpd = self._thread = None
        with self.changed:
            self.changed.notify_all()

    def pause_before_answer(self) -> bool:
        """Apply the injected latency and hang before answering a POST.

        Returns:
            ``False`` if the server is stopping and the request should be dropped.
        """
        with self.changed:
            self.held += 1
            self.changed.notify_all()
        try:
            latency = self.faults.latency
            if latency > 0 and self.stopping.wait(latency):
                return False
            self.faults.released.wait()
            return not self.stopping.is_set()
        finally:
            with self.changed:
                self.held -= 1
                self.changed.notify_all()

    def accept(self, event: dict[str, Any], received_at: float) -> None:
        """Store an accepted event and tell waiters and ``on_event``.

        Args:
            event: A validated wire dict.
            received_at: Unix seconds.

        Raises:
            StoreError: If the store cannot keep it (disk full, database
                corrupted): the handler answers 503.
        """
        stored = self.store.add(event, received_at)
        with self.changed:
            self._failures_logged.clear()  # recovered: log a recurrence again
            self.changed.notify_all()
        if self.on_event is not None:
            try:
                self.on_event(stored)
            except Exception:
                logger.exception("on_event callback failed")

    def report_failure(self, cause: str, exc: BaseException, *, traceback: bool = False) -> None:
        """Log a failure of the collector at ERROR, once per distinct cause.

        A full disk fails every POST the same way; one line says so, and the
        repeats go to DEBUG. Once an event is stored again, a cause that
        recurs is logged again.

        Args:
            cause: What failed, e.g. ``"storage"``.
            exc: The exception.
            traceback: Log the traceback too (for unexpected errors).
        """
        # The root error is the cause: a corrupted file fails inserts, reads
        # and counts alike, with one line of news.
        root = exc.__cause__ or exc
        what = f"{cause}: {type(root).__name__}: {root}"
        with self.changed:
            first = what not in self._failures_logged
            self._failures_logged.add(what)
        level = logging.ERROR if first else logging.DEBUG
        logger.log(level, "collector %s failure: %s", cause, exc, exc_info=traceback and first)

    def record(self, request: RecordedRequest) -> None:
        """Remember one answered (or dropped) request, if recording.

        Args:
            request: The request and its outcome.
        """
        with self.changed:
            if self.record_requests:
                self._requests.append(request)
            self.changed.notify_all()

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every recorded request, in the order answered (a copy)."""
        with self.changed:
            return list(self._requests)

    @property
    def quota_per_minute(self) -> float | None:
        """The keyed rate limit per client IP as requests per minute; ``None`` when off.

        A limit over a shorter ``rate_limit_window`` is scaled to a minute.
        """
        limiter = self.keyed_limiter
        if limiter is None:
            return None
        return limiter.limit * 60.0 / limiter.window

    def pace_json(self) -> dict[str, Any]:
        """The body of ``GET /api/pace``: the recent requests per second and the quota."""
        now, seconds = self.pace.seconds()
        quota = self.quota_per_minute
        return {
            "window": self.pace.window,
            "now": now,
            "quota_per_minute": int(quota) if quota is not None and quota.is_integer() else quota,
            "seconds": [second.as_json() for second in seconds],
            "fleet": None if self.fleet is None else self.fleet.read(),
        }

    def reset_limits(self) -> None:
        """Refill every client's rate-limit bucket."""
        for limiter in (self.keyed_limiter, self.keyless_limiter):
            if limiter is not None:
                limiter.reset()

    def clear_requests(self) -> None:
        """Forget the recorded requests, and the pace history counted from them."""
        with self.changed:
            self._requests.clear()
        self.pace.clear()
