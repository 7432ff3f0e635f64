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

import enum
import json
import logging
import math
import os
import platform
import socket
import ssl
import threading
import time
import types
import warnings
from typing import Any

import attrs
import urllib3
from urllib3.util import parse_url

from ._config import Config, is_loopback, mask_url, proxy_credentials
from ._http import MAX_ANSWER, Answer, DirectPool
from ._protocol import COLLECT_PATH, KEY_HEADER
from ._version import __version__

log = logging.getLogger("produl_server")

#: The most characters of a server-provided message that are shown.
MAX_MESSAGE = 200
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
        return Outcome(Verdict.DELIVERED, status)
    if status == 429:
        return Outcome(
            Verdict.RETRY, status, _parse_retry_after(retry_after), "rate_limited", "429"
        )
    if status == 408 or status >= 500:
        return Outcome(Verdict.RETRY, status, None, "server_error", f"HTTP {status}")
    reason = "unauthorized" if status in (401, 403) else "rejected"
    return Outcome(Verdict.DROP, status, None, reason, _error_message(status, body))


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
    """Delivers request bodies to ``{api_url}/api/collect``.

    Args:
        config: The client's configuration.
    """

    def __init__(self, config: Config) -> None:
        url = parse_url(config.api_url)
        self._path = (url.path or "").rstrip("/") + COLLECT_PATH
        headers = {
            KEY_HEADER: config.server_key,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        self._timeout = config.request_timeout
        self._display = f"{url.scheme}://{url.netloc}{self._path}"
        base = f"{url.scheme}://{url.netloc}"
        proxy = config.proxy
        if proxy is None and not is_loopback(url.host or ""):
            # HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as requests reads them; a
            # collector on this machine is never reached through a proxy.
            proxy = _requests_utils().get_environ_proxies(base).get(url.scheme or "https")
        tls = _tls_options(config, url.scheme)
        self._direct: DirectPool | None = None
        self._head = b""
        if not proxy:
            lines = [f"POST {self._path} HTTP/1.1", f"Host: {url.netloc}"]
            lines += [f"{name}: {value}" for name, value in headers.items()]
            try:
                self._head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("ascii")
            except UnicodeEncodeError:
                pass  # an internationalised host or path: urllib3 encodes those
            else:
                port = url.port or (443 if url.scheme == "https" else 80)
                wrap = _TlsContext(tls, url.host or "").wrap if url.scheme == "https" else None
                self._direct = DirectPool(
                    (url.host or "").strip("[]"), port, wrap, config.max_in_flight
                )
        self._proxied = (
            None
            if self._direct is not None
            else _Urllib3Route(config, base, self._path, proxy, headers, tls)
        )

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
        try:
            if self._direct is not None:
                answer = self._direct.post(self._head + b"%d\r\n\r\n" % len(body) + body, deadline)
            else:
                answer = self._proxied.post(body, budget, deadline)  # type: ignore[union-attr]
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            detail = f"{type(exc).__name__}: {_describe(exc)}"
            if log.isEnabledFor(logging.DEBUG):
                log.debug("POST %s failed after %.1f ms: %s", self._display, _ms(started), detail)
            return Outcome(Verdict.RETRY, None, None, "network", detail)
        outcome = classify(answer.status, answer.body, answer.retry_after)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "POST %s -> %d in %.1f ms (%s)",
                self._display,
                answer.status,
                _ms(started),
                outcome.verdict.value,
            )
        return outcome

    def close(self) -> None:
        """Close every pooled connection."""
        if self._direct is not None:
            self._direct.close()
        else:
            self._proxied.close()  # type: ignore[union-attr]

    def abandon(self) -> None:
        """Forget the connections inherited over ``fork()`` without taking any lock.

        The parent's sender may have held the pool's lock at fork time, so the
        child must not call :meth:`close`; it closes its copies of the sockets
        (the parent's stay open) and starts afresh.
        """
        if self._direct is not None:
            self._direct.abandon()
        else:
            self._proxied.abandon()  # type: ignore[union-attr]


class _TlsContext:
    """The client's TLS settings, made into an :class:`ssl.SSLContext` on first use.

    Loading a CA bundle takes milliseconds and can fail (a missing file): it
    happens on the sender thread, at the first connection, and a failure is
    a failed attempt like any network error.
    """

    def __init__(self, options: dict[str, Any], host: str) -> None:
        self._options = options
        self._host = host
        self._context: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    def wrap(self, sock: socket.socket, server_hostname: str) -> socket.socket:
        """Start TLS on *sock*, verified as the options say."""
        with self._lock:
            if self._context is None:
                self._context = _ssl_context(self._options)
        if self._context.verify_mode == ssl.CERT_NONE:
            warnings.warn(
                f"produl_server: TLS to {self._host} is not verified (verify=False); "
                "anyone on the path can read the server key",
                urllib3.exceptions.InsecureRequestWarning,
                stacklevel=2,
            )
        return self._context.wrap_socket(sock, server_hostname=server_hostname)


def _ssl_context(options: dict[str, Any]) -> ssl.SSLContext:
    if options.get("cert_reqs") == "CERT_NONE":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(
            cafile=options.get("ca_certs"), capath=options.get("ca_cert_dir")
        )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _Urllib3Route:
    """Requests through a proxy (or to a host that needs IDNA): urllib3's pool."""

    def __init__(
        self,
        config: Config,
        base: str,
        path: str,
        proxy: str | None,
        headers: dict[str, str],
        tls: dict[str, Any],
    ) -> None:
        self._headers = dict(headers)
        self._target = path
        self._timeout = config.request_timeout
        # Built once: a Timeout per request costs more than our own code does.
        self._default_timeout = urllib3.Timeout(connect=self._timeout, read=self._timeout)
        manager: urllib3.PoolManager
        if proxy:
            proxy_headers = _proxy_headers(proxy)
            manager = urllib3.ProxyManager(
                proxy,
                num_pools=1,
                maxsize=config.max_in_flight,
                proxy_headers=proxy_headers,
                **tls,
            )
            if base.startswith("http:"):
                # Plain http through a proxy: the request line carries the
                # absolute URL, and the proxy's credentials ride on it.
                self._target = base + self._target
                self._headers.update(proxy_headers or {})
        else:
            manager = urllib3.PoolManager(num_pools=1, maxsize=config.max_in_flight, **tls)
        self._manager = manager
        self._pool = manager.connection_from_url(base)

    def post(self, body: bytes, budget: float, deadline: float) -> Answer:
        if budget >= self._timeout:
            limit = self._default_timeout
        else:
            limit = urllib3.Timeout(connect=budget, read=budget)
        response = self._pool.urlopen(
            "POST",
            self._target,
            body=body,
            headers=self._headers,
            retries=False,
            redirect=False,
            timeout=limit,
            assert_same_host=False,
            preload_content=False,
        )
        data = _read_bounded(response, deadline)
        return Answer(response.status, response.headers.get("Retry-After"), data)

    def close(self) -> None:
        self._manager.clear()

    def abandon(self) -> None:
        idle = getattr(self._pool.pool, "queue", None) or []
        for connection in list(idle):
            if connection is not None:
                connection.close()


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
    except (urllib3.exceptions.HTTPError, OSError):
        # The status line and headers arrived: the answer stands on them.
        complete = False
    if complete:
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
