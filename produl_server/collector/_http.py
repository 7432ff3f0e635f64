"""One connection's requests: the collection API, the JSON API and the page."""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from produl_server._protocol import ALIAS_PATH, COLLECT_PATH, KEY_HEADER, MAX_BODY, WireError
from produl_server._version import __version__
from produl_server.collector import _web
from produl_server.collector._access import AUTH_HEADER, bearer, same_secret
from produl_server.collector._format import escape_controls
from produl_server.collector._record import Headers, RecordedRequest
from produl_server.collector._store import Query, StoreError, missing_required
from produl_server.collector._validate import ascii_int, check_event, site_id

if TYPE_CHECKING:
    from produl_server.collector._ratelimit import RateLimiter
    from produl_server.collector._server import CollectorServer

logger = logging.getLogger("produl_server.collector")

COLLECT_PATHS = frozenset({COLLECT_PATH, ALIAS_PATH})
EVENTS_PATH = "/api/events"
PACE_PATH = "/api/pace"
HEALTH_PATH = "/healthz"
#: Oversized bodies up to this size are read and thrown away so the
#: connection stays usable; beyond it the connection is closed instead.
_DISCARD_LIMIT = 16 * 1024 * 1024
_CHUNK = 64 * 1024
MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100
#: A chunk size: hex digits only (int(x, 16) also takes "0x1", "+1", "1_0").
_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,8}")
_UNPARSED: Any = object()


class _BadRequestError(Exception):
    """The request framing is broken; answer 400 and close the connection."""


class _RefusedError(Exception):
    """Answer the request with this status and JSON error body, and stop."""

    def __init__(
        self, status: int, body: dict[str, str], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(body["message"])
        self.status = status
        self.body = body
        self.headers = headers or {}


def _reject_constant(name: str) -> Any:
    raise WireError("invalid_json", f"{name} is not valid JSON; send finite numbers only.")


def _error(code: str, message: str, field: str | None = None) -> dict[str, str]:
    return WireError(code, message, field).as_body()


def _encode(body: dict[str, Any] | list[Any]) -> bytes:
    try:
        return json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # A lone surrogate (echoed from a client, say) has no UTF-8 form;
        # ASCII escapes keep the answer valid JSON instead of no answer.
        return json.dumps(body).encode()


class CollectorHandler(BaseHTTPRequestHandler):
    """Answers the requests of one client connection (HTTP/1.1, keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_version = f"produl-server-collector/{__version__}"
    #: Idle kept-alive connections are closed after this many seconds.
    timeout = 30
    server: Any  # the _HTTPServer; typed loosely to avoid an import cycle

    # -- plumbing -------------------------------------------------------------

    @property
    def collector(self) -> CollectorServer:
        """The :class:`CollectorServer` this connection belongs to."""
        collector: CollectorServer = self.server.collector
        return collector

    #: Buffer each answer and send it with one flush: separate writes for
    #: headers and body meet Nagle's algorithm and delayed ACKs (40 ms each).
    wbufsize = 64 * 1024

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._start_request()

    def _start_request(self) -> None:
        self._arrived = time.time()
        self._arrived_monotonic = time.monotonic()
        self._body = b""
        self._parsed: Any = _UNPARSED
        self._cors = True
        self._answered = False

    def handle_one_request(self) -> None:
        # The idle timeout (a recv of 30 s) bounds the wait for a request's
        # first byte; from there the whole request has the collector's
        # request deadline, however slowly its bytes come (issue #18, item 13).
        try:
            if not self.rfile.peek(1):  # type: ignore[attr-defined]  # a BufferedReader
                self.close_connection = True
                return
        except OSError:  # TimeoutError included: an idle connection
            self.close_connection = True
            return
        self.server.arriving(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.arrived(self.connection)

    def parse_request(self) -> bool:
        self._start_request()
        if not super().parse_request():
            return False
        if self._host_allowed():
            return True
        # Issue #9, item 9: a DNS-rebinding page reaches 127.0.0.1 under its
        # own name. Closing also spares reading a body we will not use.
        self.close_connection = True
        message = (
            "This collector answers only to a loopback name or address, "
            "the address it is bound to, or an allowed host name, with its port."
        )
        self._reply(421, _error("invalid_host", message, "Host"))
        return False

    def _host_allowed(self) -> bool:
        if urlsplit(self.path).scheme.lower() in ("http", "https"):
            # The absolute form is what a forward proxy receives (the SDK's
            # proxy tests use the collector as one). A browser never sends it
            # to a server it reaches directly, so DNS rebinding cannot; and
            # the Host check is a defence against browsers only: any other
            # client can send any Host. The events stay behind the token.
            return True
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1:
            return False
        return self.collector.host_check.allows(hosts[0], self.server.server_port)

    def log_message(self, format: str, *args: Any) -> None:
        """Send the access log to the ``produl_server.collector`` logger at DEBUG.

        The request line is the client's: it is escaped like printed events,
        so ``-v`` cannot be used to inject terminal escapes.
        """
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s - %s", self.client_address[0], escape_controls(format % args))

    def end_headers(self) -> None:
        if self._cors:
            self.send_header("Access-Control-Allow-Origin", "*")
        super().end_headers()

    def _reply(
        self,
        status: int,
        body: bytes | dict[str, Any] | list[Any] = b"",
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        if isinstance(body, (dict, list)):
            body = _encode(body)
        self.server.arrived(self.connection)
        # Recorded before the answer leaves, so a client that has its answer
        # always finds the request in LocalCollector.requests.
        self._count_pace(status)
        self._record(status)
        self._answered = True
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status != 204:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and status != 204:
            self.wfile.write(body)
        self.wfile.flush()

    def _run(self, action: Callable[[], None]) -> None:
        """Answer with ``action``; a failure of the collector still gets an answer.

        Issue #9, item 10: an exception used to close the socket with a DEBUG
        line, so a full disk left clients unanswered and nothing on stderr.
        """
        try:
            action()
        except OSError:
            raise  # the client went away; handle_error notes it at DEBUG
        except StoreError as exc:
            self._fail(503, "storage_unavailable", "storage", exc)
        except Exception as exc:
            self.close_connection = True  # unknown state: start afresh
            self._fail(500, "internal_error", "request", exc)

    def _fail(self, status: int, code: str, cause: str, exc: Exception) -> None:
        self.collector.report_failure(cause, exc, traceback=status == 500)
        if self._answered:
            self.close_connection = True  # the answer is half out; end it
            return
        message = f"The collector failed to answer: {exc}"
        if status == 503:
            message = f"The collector cannot use its event store: {exc}"
        self._reply(status, _error(code, message))

    def _drop(self) -> None:
        """Close the connection without answering (a simulated network failure)."""
        self.close_connection = True
        self._record(None)

    def _count_pace(self, status: int) -> None:
        """Count an answered request to the collection API for ``/api/pace``.

        Only POST requests to the collection paths count: the page's own polls
        would otherwise draw themselves.
        """
        if self.command == "POST" and urlsplit(self.path).path in COLLECT_PATHS:
            self.collector.pace.count(rate_limited=status == 429)

    def _record(self, status: int | None) -> None:
        if not self.collector.record_requests:
            return
        self.collector.record(
            RecordedRequest(
                method=self.command,
                path=self.path,
                headers=Headers(self.headers.items()),
                body=self._body,
                status=status,
                client_port=int(self.client_address[1]),
                time=self._arrived_monotonic,
            )
        )

    def _read_body(self) -> bool:
        """Read the whole body into ``self._body``; keep-alive needs every byte read.

        Returns:
            ``False`` when it was larger than the 64 KiB limit (and discarded).

        Raises:
            _BadRequestError: On an unusable ``Content-Length`` or chunk size.
        """
        try:
            return self._read_whole_body()
        finally:
            self.server.arrived(self.connection)

    def _read_whole_body(self) -> bool:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = ascii_int(self.headers.get("Content-Length", "0").strip())
        if length is None:
            raise _BadRequestError("Content-Length is not a number in ASCII digits.")
        if length <= MAX_BODY:
            self._body = self.rfile.read(length)
            if len(self._body) < length:
                raise _BadRequestError("The body ended before Content-Length bytes.")
            return True
        if length > _DISCARD_LIMIT:
            self.close_connection = True
            return False
        while length > 0:
            got = self.rfile.read(min(length, _CHUNK))
            if not got:
                break
            length -= len(got)
        return False

    def _read_chunked(self) -> bool:
        parts: list[bytes] = []
        size_total = 0
        while True:
            line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(line):
                raise _BadRequestError("Bad chunk size in a chunked body.")
            size = int(line, 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            size_total += size
            if size_total > _DISCARD_LIMIT:
                raise _BadRequestError("The chunked body is far too large.")
            chunk = self.rfile.read(size)
            if size_total <= MAX_BODY:
                parts.append(chunk)
            self.rfile.readline(16)  # the CRLF after each chunk
        if size_total > MAX_BODY:
            return False
        self._body = b"".join(parts)
        return True

    def _read_body_quietly(self) -> None:
        try:
            self._read_body()
        except _BadRequestError:
            self.close_connection = True

    # -- methods --------------------------------------------------------------

    def do_POST(self) -> None:
        """Accept one event on ``/api/collect`` or ``/r``."""
        self._run(self._post)

    def do_OPTIONS(self) -> None:
        """Answer a browser's CORS preflight for the collection API."""
        self._run(self._options)

    def do_GET(self) -> None:
        """Serve the page, its static files, ``/api/events``, ``/api/pace`` and ``/healthz``."""
        self._run(self._get)

    def do_HEAD(self) -> None:
        """Like ``GET``, without the body."""
        self._run(self._get)

    def do_DELETE(self) -> None:
        """``DELETE /api/events`` forgets every stored event."""
        self._run(self._delete)

    def do_PUT(self) -> None:
        """Refuse other methods, after reading their body."""
        self._read_body_quietly()
        self._reply(405, _error("method_not_allowed", f"{self.command} is not supported."))

    def do_PATCH(self) -> None:
        """Refuse ``PATCH``, after reading its body."""
        self.do_PUT()

    # -- the collection API ---------------------------------------------------

    def _post(self) -> None:
        path = urlsplit(self.path).path
        try:
            within_limit = self._read_body()
        except _BadRequestError as exc:
            self.close_connection = True
            self._reply(400, _error("bad_request", str(exc)))
            return
        if path not in COLLECT_PATHS:
            self._reply(404, _error("not_found", f"POST events to {COLLECT_PATH}."))
            return
        collector = self.collector
        fault = collector.faults.take()
        if not collector.pause_before_answer() or (fault is not None and fault.status is None):
            self._drop()
            return
        if fault is not None and fault.status is not None:
            extra = {}
            if fault.retry_after is not None:
                extra["Retry-After"] = f"{fault.retry_after:g}"
            body = _error("injected_failure", "A failure injected by the test.")
            self._reply(fault.status, body, headers=extra)
            return
        self._collect(within_limit)

    def _collect(self, within_limit: bool) -> None:
        try:
            event = self._admit(within_limit)
        except _RefusedError as refusal:
            self._reply(refusal.status, refusal.body, headers=refusal.headers)
            return
        self.collector.accept(event, self._arrived)  # StoreError: 503 in _run
        self._reply(204)

    def _admit(self, within_limit: bool) -> dict[str, Any]:
        """The event, once the key, the rate limit and validation allow it.

        The key comes first (issue #9, item 12a): a wrong key is a 401 and
        uses no quota, as at Produl.

        Raises:
            _RefusedError: With the answer for a request that is not accepted.
        """
        key = self.headers.get(KEY_HEADER)
        if key is not None:
            if not same_secret(key, self.collector.server_key):
                raise _RefusedError(401, _error("invalid_key", "Unknown server key.", KEY_HEADER))
            limiter = self.collector.keyed_limiter
        else:
            # A browser request names its site in the body's k and is
            # accepted at the keyless rate (issue #9, item 12b).
            if not within_limit:
                raise _RefusedError(413, _error("body_too_large", _TOO_LARGE))
            if site_id(self._decoded_or_none()) is None:
                raise _RefusedError(401, _error("missing_key", _MISSING_KEY, KEY_HEADER))
            limiter = self.collector.keyless_limiter
        self._check_rate(limiter)
        if not within_limit:
            raise _RefusedError(413, _error("body_too_large", _TOO_LARGE))
        try:
            event = check_event(self._decoded())
        except WireError as exc:
            raise _RefusedError(400, exc.as_body()) from None
        if self.collector.strict:
            missing = missing_required(event)
            if missing:
                raise _RefusedError(
                    400, _error("missing_field", _strict_message(missing), missing[0])
                )
        return event

    def _check_rate(self, limiter: RateLimiter | None) -> None:
        wait = limiter.acquire(self.client_address[0]) if limiter is not None else None
        if wait is None:
            return
        if not self.collector.send_retry_after:
            # Produl never promises Retry-After (issue #9, item 12d).
            raise _RefusedError(429, _error("rate_limited", "Too many requests; slow down."))
        body = _error("rate_limited", f"Too many requests; retry in {wait} s.")
        raise _RefusedError(429, body, {"Retry-After": str(wait)})

    def _decoded(self) -> Any:
        """The body as JSON, decoded once.

        Raises:
            WireError: When it is not UTF-8 JSON with finite numbers.
        """
        if self._parsed is _UNPARSED:
            try:
                self._parsed = json.loads(self._body, parse_constant=_reject_constant)
            except WireError:
                raise
            except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
                raise WireError("invalid_json", "The body is not valid UTF-8 JSON.") from None
        return self._parsed

    def _decoded_or_none(self) -> Any:
        try:
            return self._decoded()
        except WireError:
            return None

    def _options(self) -> None:
        self._read_body_quietly()
        headers = {
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": f"Content-Type, {KEY_HEADER}",
            "Access-Control-Max-Age": "86400",
        }
        self._reply(204, headers=headers)

    # -- the page and the inspection API --------------------------------------

    def _get(self) -> None:
        url = urlsplit(self.path)
        if url.path == HEALTH_PATH:
            self._reply(200, {"status": "ok", "events": self.collector.store.count()})
            return
        # The inspection API and page omit CORS on purpose: another site open
        # in the same browser must not read (or wipe) the local events.
        self._cors = False
        if url.path == EVENTS_PATH:
            if self._may_inspect():
                self._list_events(url.query)
            return
        if url.path == PACE_PATH:
            if self._may_inspect():
                self._reply(200, self.collector.pace_json())
            return
        page = _web.asset(url.path)
        if page is None:
            self._cors = True
            self._reply(404, _error("not_found", f"Nothing at {url.path}."))
            return
        content, content_type = page
        self._reply(200, content, content_type=content_type, headers={"Cache-Control": "no-cache"})

    def _delete(self) -> None:
        self._read_body_quietly()
        self._cors = False
        if urlsplit(self.path).path != EVENTS_PATH:
            self._reply(405, _error("method_not_allowed", "Only /api/events can be deleted."))
            return
        if self._may_inspect():
            self.collector.store.clear()
            self._reply(204)

    def _may_inspect(self) -> bool:
        """Whether the request carries the token or the server key; else answer 401.

        Issue #9, item 9: the events are the developer's, not the network's.
        """
        collector = self.collector
        key = self.headers.get(KEY_HEADER)
        credential = bearer(self.headers.get(AUTH_HEADER))
        if key is not None and same_secret(key, collector.server_key):
            return True
        if credential is not None and (
            same_secret(credential, collector.access_token)
            or same_secret(credential, collector.server_key)
        ):
            return True
        message = (
            "Reading or deleting events, or reading the pace, needs the collector's access token "
            "(Authorization: Bearer <token>; the live page's address carries it) "
            f"or the server key ({KEY_HEADER})."
        )
        self._reply(
            401,
            _error("unauthorized", message, AUTH_HEADER),
            headers={"WWW-Authenticate": 'Bearer realm="produl-collector"'},
        )
        return False

    def _list_events(self, query_string: str) -> None:
        params = {k: v[-1] for k, v in parse_qs(query_string).items()}
        limit = ascii_int(params.get("limit", str(DEFAULT_LIST_LIMIT)))
        if limit is None or not 1 <= limit <= MAX_LIST_LIMIT:
            message = f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}."
            self._reply(400, _error("invalid_limit", message, "limit"))
            return
        query = Query(
            type=params.get("t") or None,
            name=params.get("n") or None,
            visitor_id=params.get("vi") or None,
            limit=limit,
        )
        store = self.collector.store
        body = {
            "events": [stored.as_json() for stored in store.query(query)],
            "total": store.count(),
            "counts": store.counts(),
            "flagged": store.flagged(),
        }
        self._reply(200, body)


_TOO_LARGE = f"The body is larger than {MAX_BODY} bytes."


def _strict_message(missing: list[str]) -> str:
    names = ", ".join(missing)
    return (
        f"The event lacks {names}, which the API reference marks required; Produl may "
        "drop it even after a 2xx (refused because the collector runs with --strict)."
    )


_MISSING_KEY = (
    f"Send your server key in {KEY_HEADER} (a browser request names its site id in k instead)."
)
