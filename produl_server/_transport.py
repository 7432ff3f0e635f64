"""One POST per event over a pool of kept-alive connections, and what each answer means.

The transport never sleeps and never retries on its own (urllib3's ``Retry``
backoff could outlive a ``flush()`` deadline); it reports an :class:`Outcome`
and the worker owns the schedule.

Every answer is bounded: at most :data:`MAX_ANSWER` bytes of a body are
read, the whole request has one deadline (not one per socket read), and a
message the server wrote is cut to :data:`MAX_MESSAGE` characters with its
control characters escaped before it reaches a log line or an error.
"""

from __future__ import annotations

import contextlib
import enum
import http.client
import json
import logging
import math
import os
import platform
import socket
import threading
import time
import types
from typing import Any

import attrs
import urllib3
from urllib3.util import parse_url

from ._config import Config, exit_lanes, is_loopback, mask_url, proxy_credentials
from ._protocol import COLLECT_PATH, KEY_HEADER
from ._threads import start_thread
from ._version import __version__

log = logging.getLogger("produl_server")

#: The most characters of a server-provided message that are shown.
MAX_MESSAGE = 200
#: The most bytes of an answer's body that are read; the rest is discarded
#: with the connection.
MAX_ANSWER = 64 * 1024
_CHUNK = 8 * 1024

USER_AGENT = (
    f"produl-server-python/{__version__} "
    f"(python {platform.python_version()}; {platform.system().lower() or 'unknown'})"
)


class Verdict(enum.Enum):
    """What the worker does with an event after one attempt."""

    DELIVERED = "delivered"
    RETRY = "retry"
    DROP = "drop"


@attrs.frozen
class Outcome:
    """The result of one attempt to deliver one event."""

    verdict: Verdict
    status: int | None = None
    #: Seconds the collector asked us to wait (429 ``Retry-After``).
    retry_after: float | None = None
    #: Stable drop/retry reason: ``rejected``, ``unauthorized``, ``rate_limited``,
    #: ``server_error``, ``network``.
    reason: str = ""
    detail: str = ""


def classify(status: int, body: bytes, retry_after: str | None) -> Outcome:
    """Map one HTTP answer to what PROTOCOL.md says to do with it.

    Args:
        status: The HTTP status code.
        body: The response body (a JSON error body on 4xx, if any).
        retry_after: The ``Retry-After`` header, if present.
    """
    if 200 <= status < 300:
        return _DELIVERED.get(status) or Outcome(Verdict.DELIVERED, status)
    if status == 429:
        return Outcome(
            Verdict.RETRY, status, _parse_retry_after(retry_after), "rate_limited", "429"
        )
    if status == 408 or status >= 500:
        return Outcome(Verdict.RETRY, status, None, "server_error", f"HTTP {status}")
    reason = "unauthorized" if status in (401, 403) else "rejected"
    return Outcome(Verdict.DROP, status, None, reason, _error_message(status, body))


#: The answers of nearly every request, made once (an Outcome is frozen).
_DELIVERED = {status: Outcome(Verdict.DELIVERED, status) for status in (200, 201, 202, 204)}


def _parse_retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        # An HTTP date is allowed too; treat it as "some time later".
        return None
    return min(max(seconds, 0.0), 3600.0) if math.isfinite(seconds) else None


def _error_message(status: int, body: bytes) -> str:
    try:
        data = json.loads(body)
        message = f"{_shown(data['message'])} (field: {_shown(data.get('field', '-'))})"
    except (ValueError, TypeError, KeyError, RecursionError):
        message = _shown(body[: MAX_MESSAGE * 4].decode("utf-8", "replace")) or "no body"
    return f"HTTP {status}: {message}"


def _shown(value: object) -> str:
    """A server-provided value, safe for one log line: short, controls escaped."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > MAX_MESSAGE
    text = text[:MAX_MESSAGE]
    escaped = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
    return escaped + "…" if cut else escaped


class Transport:
    """Delivers request bodies to ``{api_url}/api/collect``, through urllib3 alone.

    Direct and proxied requests take the same route: one urllib3 pool of up to
    ``max_in_flight`` kept-alive connections, and one deadline per request
    that a watchdog enforces (see :class:`_Watchdog`).

    Args:
        config: The client's configuration.
    """

    def __init__(self, config: Config) -> None:
        url = parse_url(config.api_url)
        path = (url.path or "").rstrip("/") + COLLECT_PATH
        self._headers = {
            KEY_HEADER: config.server_key,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        self._timeout = config.request_timeout
        # Each wait on the socket: the watchdog ends the request as a whole
        # at its own, possibly shorter, deadline. The pool's default, not
        # an argument of each request, which costs urllib3 4 µs a request.
        self._socket_timeout = urllib3.Timeout(
            connect=config.request_timeout, read=config.request_timeout
        )
        self._display = f"{url.scheme}://{url.netloc}{path}"
        base = f"{url.scheme}://{url.netloc}"
        self._target = path
        proxy = config.proxy
        if proxy is None and not is_loopback(url.host or ""):
            # HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as requests reads them; a
            # collector on this machine is never reached through a proxy.
            proxy = _requests_utils().get_environ_proxies(base).get(url.scheme or "https")
        tls = _tls_options(config, url.scheme)
        # One kept connection per lane, the exit's extra lanes included.
        pool_size = exit_lanes(config.max_in_flight)
        manager: urllib3.PoolManager
        if proxy:
            proxy_headers = _proxy_headers(proxy)
            manager = urllib3.ProxyManager(
                proxy,
                num_pools=1,
                maxsize=pool_size,
                proxy_headers=proxy_headers,
                timeout=self._socket_timeout,
                **tls,
            )
            if base.startswith("http:"):
                # Plain http through a proxy: the request line carries the
                # absolute URL, and the proxy's credentials ride on it.
                self._target = base + self._target
                self._headers.update(proxy_headers or {})
        else:
            manager = urllib3.PoolManager(
                num_pools=1, maxsize=pool_size, timeout=self._socket_timeout, **tls
            )
        self._manager = manager
        self._pool = manager.connection_from_url(base)
        # Every connection of the pool answers to the watchdog (an instance
        # attribute: urllib3's class stays as it is for everyone else).
        self._pool.ConnectionCls = _watched(self._pool.ConnectionCls)

    def __repr__(self) -> str:
        return f"<Transport {self._display}>"

    def send(self, body: bytes, timeout: float | None = None) -> Outcome:
        """POST one event and classify the answer; never raises for network trouble.

        Args:
            body: The encoded event.
            timeout: Seconds for the whole request; the configured
                ``request_timeout`` when ``None``.
        """
        budget = self._timeout if timeout is None else max(min(timeout, self._timeout), 0.001)
        started = time.perf_counter()
        deadline = time.monotonic() + budget
        watch = _WATCHDOG.start(deadline)
        try:
            try:
                status, retry_after, data = self._exchange(body, deadline)
            except urllib3.exceptions.ProtocolError as exc:
                if watch.expired or watch.uses < 2 or not _unanswered(exc):
                    raise
                # A kept connection the server closed just as we reused it:
                # nothing was answered, so the same request goes once more,
                # on a new connection, within the same deadline.
                status, retry_after, data = self._exchange(body, deadline)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if watch.expired:
                detail = f"TimeoutError: timed out after {budget:.3g} s"
            else:
                root = _root_cause(exc)
                detail = f"{type(root).__name__}: {_describe(root)}"
            if log.isEnabledFor(logging.DEBUG):
                log.debug("POST %s failed after %.1f ms: %s", self._display, _ms(started), detail)
            return Outcome(Verdict.RETRY, None, None, "network", detail)
        finally:
            _WATCHDOG.stop(watch)
        outcome = classify(status, data, retry_after)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "POST %s -> %d in %.1f ms (%s)",
                self._display,
                status,
                _ms(started),
                outcome.verdict.value,
            )
        return outcome

    def _exchange(self, body: bytes, deadline: float) -> tuple[int, str | None, bytes]:
        """One request and its bounded answer, before *deadline*."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no time left for the request")
        response = self._pool.urlopen(
            "POST",
            self._target,
            body=body,
            headers=self._headers,
            retries=False,
            redirect=False,
            assert_same_host=False,
            preload_content=False,
        )
        data = _read_bounded(response, deadline)
        return response.status, response.headers.get("Retry-After"), data

    def close(self) -> None:
        """Close every pooled connection."""
        self._manager.clear()

    def abandon(self) -> None:
        """Forget the connections inherited over ``fork()`` without taking any lock.

        The parent's sender may have held the pool's lock at fork time, so the
        child must not call :meth:`close`; it closes its copies of the sockets
        (the parent's stay open) and starts afresh.
        """
        idle = getattr(self._pool.pool, "queue", None) or []
        for connection in list(idle):
            if connection is not None:
                connection.close()


def _root_cause(exc: BaseException) -> BaseException:
    """The error underneath urllib3's wrappers: ``ConnectionRefusedError``, not the pool's."""
    seen = {id(exc)}
    while True:
        inner = exc.__cause__ or next(
            (arg for arg in exc.args if isinstance(arg, BaseException)), None
        )
        if inner is None or id(inner) in seen:
            return exc
        seen.add(id(inner))
        exc = inner


def _unanswered(exc: BaseException) -> bool:
    """Whether *exc* is a connection closed before a byte of the answer came."""
    causes = [exc.__cause__, exc.__context__, *exc.args]
    return any(isinstance(cause, http.client.RemoteDisconnected) for cause in causes)


class _Watch:
    """One request in flight: its deadline, and the connection that carries it."""

    __slots__ = ("connection", "deadline", "expired", "uses")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.connection: Any = None
        self.expired = False
        self.uses = 0


class _Watchdog:
    """One thread that ends every request still running at its deadline.

    urllib3's timeouts bound each socket operation, not a request: a server
    that drips one byte a second, through a proxy or not, would hold a
    request for as long as it likes. Each request therefore registers its
    deadline here; past it, this thread shuts the connection's socket down
    (``shutdown``, never ``close``, so no descriptor can be reused under the
    request), and the blocked read or write returns at once with an error
    that :meth:`Transport.send` reports as a timeout. The connection is then
    dropped: urllib3 sees the shut socket and never reuses it.

    Connecting is bounded without the watchdog: :func:`_watched` shares the
    remaining time among the addresses a name resolves to. Name resolution
    itself (``getaddrinfo``) cannot be interrupted, by this or any library.

    The thread is a daemon, started at the first request of each process
    (after ``fork()`` too) and idle while nothing is in flight.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._watches: set[_Watch] = set()
        self._local = threading.local()
        self._pid = 0
        self._next_wake = 0.0
        self._watching = False

    def start(self, deadline: float) -> _Watch:
        watch = _Watch(deadline)
        self._local.watch = watch
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._watches = set()
                self._wake = threading.Condition(self._lock)
                self._watching = start_thread(self._run, "produl-server.deadlines")
            if not self._watching:
                # No thread could start (interpreter exit on Python 3.12+):
                # the request is bounded by its per-read timeouts alone.
                return watch
            self._watches.add(watch)
            if deadline < self._next_wake:
                # Woken only for a deadline before the one it waits for:
                # not once per request.
                self._next_wake = deadline
                self._wake.notify()
        return watch

    def stop(self, watch: _Watch) -> None:
        self._local.watch = None
        with self._lock:
            self._watches.discard(watch)

    def current(self) -> _Watch | None:
        """The request the calling thread is making, if any."""
        return getattr(self._local, "watch", None)

    def _run(self) -> None:
        pid = os.getpid()
        with self._lock:
            while self._pid == pid:
                now = time.monotonic()
                due = [watch for watch in self._watches if watch.deadline <= now]
                for watch in due:
                    self._watches.discard(watch)
                    watch.expired = True
                    _shut(watch.connection)
                self._next_wake = min((watch.deadline for watch in self._watches), default=now + 60)
                self._wake.wait(max(self._next_wake - now, 0.001))


def _shut(connection: Any) -> None:
    sock = getattr(connection, "sock", None)
    if isinstance(sock, socket.socket):
        # socket.socket's own shutdown, also for an SSLSocket: its override
        # would tear down the TLS object under the thread that is using it.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


_WATCHDOG = _Watchdog()


def _watched(base: type[Any]) -> type[Any]:
    """*base* (urllib3's connection class), answering to the watchdog."""

    class Watched(base):  # type: ignore[misc]
        def connect(self) -> None:
            watch = _WATCHDOG.current()
            if watch is not None:
                watch.connection = self
            _connect_closing(self, super().connect)

        def request(self, *args: Any, **kwargs: Any) -> None:
            watch = _WATCHDOG.current()
            if watch is not None:
                watch.connection = self
                self.produl_uses = getattr(self, "produl_uses", 0) + 1
                watch.uses = self.produl_uses
            super().request(*args, **kwargs)

        def getresponse(self, *args: Any, **kwargs: Any) -> Any:
            response = super().getresponse(*args, **kwargs)
            watch = _WATCHDOG.current()
            if watch is not None and watch.expired:
                # The status line and headers were cut short by the deadline:
                # what http.client parsed of them proves nothing.
                response.close()
                raise TimeoutError("the answer's headers did not arrive before the deadline")
            return response

        def _new_conn(self) -> socket.socket:
            watch = _WATCHDOG.current()
            if watch is None:
                raw: socket.socket = super()._new_conn()
            else:
                raw = _connect_within(self, watch.deadline)
            self.produl_raw = raw
            return raw

    Watched.__name__ = Watched.__qualname__ = f"Watched{base.__name__}"
    return Watched


def _connect_closing(connection: Any, connect: Any) -> None:
    """Run urllib3's *connect*; if it fails, close the TCP socket it opened.

    urllib3 1.26 drops that socket unclosed when TLS setup fails after the
    connection was made (a missing CA file), leaving it to the garbage
    collector; the server meanwhile waits for a handshake.
    """
    connection.produl_raw = None
    try:
        connect()
    except BaseException:
        raw = connection.produl_raw
        if raw is not None and raw is not getattr(connection, "sock", None):
            raw.close()
        raise
    finally:
        connection.produl_raw = None


def _connect_within(connection: Any, deadline: float) -> socket.socket:
    """Connect to each resolved address in turn, all within one *deadline*.

    urllib3 gives every address the whole connect timeout, so a name with
    three dead addresses would take three timeouts; here they share one.
    The connection itself is urllib3's (its socket options included).
    """
    host, port = connection._dns_host, connection.port
    try:
        addresses = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except OSError as exc:
        raise urllib3.exceptions.NewConnectionError(
            connection, f"Failed to resolve {host!r}: {exc}"
        ) from exc
    error: OSError = TimeoutError("no time left to connect")
    for _family, _type, _proto, _name, address in addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            return urllib3.util.connection.create_connection(
                (str(address[0]), int(address[1])),
                left,
                source_address=connection.source_address,
                socket_options=connection.socket_options,
            )
        except OSError as exc:
            error = exc
    if isinstance(error, TimeoutError | socket.timeout):
        raise urllib3.exceptions.ConnectTimeoutError(
            connection, f"Connection to {host} timed out"
        ) from error
    raise urllib3.exceptions.NewConnectionError(
        connection, f"Failed to establish a new connection: {error}"
    ) from error


def _tls_options(config: Config, scheme: str | None) -> dict[str, Any]:
    """The pool's TLS keyword arguments: what to trust, or not to verify."""
    tls: dict[str, Any] = {}
    if scheme != "https":
        return tls
    if config.verify is False:
        tls["cert_reqs"] = "CERT_NONE"
        return tls
    # The trust store requests uses (certifi, or the bundle named by
    # REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE), unless a path is given.
    tls["cert_reqs"] = "CERT_REQUIRED"
    bundle = (
        config.verify
        if isinstance(config.verify, str)
        else os.environ.get("REQUESTS_CA_BUNDLE")
        or os.environ.get("CURL_CA_BUNDLE")
        or _requests_utils().DEFAULT_CA_BUNDLE_PATH
    )
    # requests accepts a directory of hashed certificates too.
    tls["ca_cert_dir" if os.path.isdir(bundle) else "ca_certs"] = bundle
    return tls


def _proxy_headers(proxy: str) -> dict[str, str] | None:
    """The Basic authentication header for a proxy URL's credentials, if any.

    A proxy given as an option was checked at construction; one from the
    environment was not: credentials that Basic authentication cannot carry
    (not Latin-1) are reported, masked, and left out.
    """
    credentials = proxy_credentials(proxy)
    if not credentials:
        return None
    try:
        return urllib3.make_headers(proxy_basic_auth=":".join(credentials))
    except UnicodeError:
        log.error(
            "produl_server: the credentials of the proxy %s are not Latin-1 text and cannot "
            "be sent; connecting to it without them",
            mask_url(proxy),
        )
        return None


def _read_bounded(response: Any, deadline: float) -> bytes:
    """Read at most :data:`MAX_ANSWER` bytes of the body, before *deadline*.

    A body that is longer, or still coming at the deadline, is cut: its
    connection is closed instead of going back to the pool, so an endless
    or dripping answer can hold neither memory nor the sender.
    """
    chunks: list[bytes] = []
    size = 0
    complete = False
    try:
        while size <= MAX_ANSWER and time.monotonic() < deadline:
            chunk = response.read(_CHUNK)
            if not chunk:
                complete = True
                break
            chunks.append(chunk)
            size += len(chunk)
            if getattr(response, "length_remaining", None) == 0:
                # All its Content-Length said: no read to find the end.
                complete = True
                break
    except (urllib3.exceptions.HTTPError, OSError):
        # The status line and headers arrived: the answer stands on them.
        complete = False
    if complete and time.monotonic() < deadline:
        response.release_conn()
    else:
        response.close()
        response.release_conn()
    return b"".join(chunks)[:MAX_ANSWER]


def _requests_utils() -> types.ModuleType:
    # Imported when first needed, on the sender thread: importing requests
    # costs tens of milliseconds that a script talking to a local collector,
    # or its exit, should not pay.
    import requests.utils  # noqa: PLC0415

    return requests.utils


def _describe(exc: BaseException) -> str:
    # urllib3 messages can embed the pool repr; keep it short and key-free.
    # Never the repr of a header value: a UnicodeEncodeError holds the whole
    # string it could not encode.
    if isinstance(exc, UnicodeError):
        return "a header or the body could not be encoded"
    text = str(exc.args[-1] if exc.args else exc)
    return _shown(text)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
