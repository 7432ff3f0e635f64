"""One connection's requests: the collection API, the JSON API and the page."""

from __future__ import annotations

import hmac
import json
import logging
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from produl_server._protocol import ALIAS_PATH, COLLECT_PATH, KEY_HEADER, MAX_BODY, WireError
from produl_server._protocol import check_wire_event as _check
from produl_server._version import __version__
from produl_server.collector import _web
from produl_server.collector._record import Headers, RecordedRequest
from produl_server.collector._store import Query

if TYPE_CHECKING:
    from produl_server.collector._server import CollectorServer

logger = logging.getLogger("produl_server.collector")

COLLECT_PATHS = frozenset({COLLECT_PATH, ALIAS_PATH})
EVENTS_PATH = "/api/events"
HEALTH_PATH = "/healthz"
#: Oversized bodies up to this size are read and thrown away so the
#: connection stays usable; beyond it the connection is closed instead.
_DISCARD_LIMIT = 16 * 1024 * 1024
_CHUNK = 64 * 1024
MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100


class _BadRequestError(Exception):
    """The request framing is broken; answer 400 and close the connection."""


def _reject_constant(name: str) -> Any:
    raise WireError("invalid_json", f"{name} is not valid JSON; send finite numbers only.")


def _error(code: str, message: str, field: str | None = None) -> dict[str, str]:
    return WireError(code, message, field).as_body()


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
        self._arrived = time.time()
        self._body = b""
        self._cors = True

    def parse_request(self) -> bool:
        self._arrived = time.time()
        self._body = b""
        self._cors = True
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:
        """Send the access log to the ``produl_server.collector`` logger at DEBUG."""
        logger.debug("%s - " + format, self.client_address[0], *args)

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
            body = json.dumps(body, ensure_ascii=False).encode()
        # Recorded before the answer leaves, so a client that has its answer
        # always finds the request in LocalCollector.requests.
        self._record(status)
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

    def _drop(self) -> None:
        """Close the connection without answering (a simulated network failure)."""
        self.close_connection = True
        self._record(None)

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
                time=self._arrived,
            )
        )

    def _read_body(self) -> bool:
        """Read the whole body into ``self._body``; keep-alive needs every byte read.

        Returns:
            ``False`` when it was larger than the 64 KiB limit (and discarded).

        Raises:
            _BadRequestError: On an unusable ``Content-Length`` or chunk size.
        """
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        raw = self.headers.get("Content-Length", "0").strip()
        if not raw.isdigit():
            raise _BadRequestError("Content-Length is not a number.")
        length = int(raw)
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
            try:
                size = int(line, 16)
            except ValueError:
                raise _BadRequestError("Bad chunk size in a chunked body.") from None
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

    # -- methods --------------------------------------------------------------

    def do_POST(self) -> None:
        """Accept one event on ``/api/collect`` or ``/r``."""
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
        collector = self.collector
        key = self.headers.get(KEY_HEADER)
        limiter = collector.keyed_limiter if key is not None else collector.keyless_limiter
        wait = limiter.acquire(self.client_address[0]) if limiter is not None else None
        if wait is not None:
            body = _error("rate_limited", f"Too many requests; retry in {wait} s.")
            self._reply(429, body, headers={"Retry-After": str(wait)})
            return
        if key is None:
            body = _error("missing_key", f"Send your server key in {KEY_HEADER}.", KEY_HEADER)
            self._reply(401, body)
            return
        if not hmac.compare_digest(key.encode(), collector.server_key.encode()):
            self._reply(401, _error("invalid_key", "Unknown server key.", KEY_HEADER))
            return
        if not within_limit:
            message = f"The body is larger than {MAX_BODY} bytes."
            self._reply(413, _error("body_too_large", message))
            return
        try:
            event = _check(json.loads(self._body, parse_constant=_reject_constant))
        except WireError as exc:
            self._reply(400, exc.as_body())
            return
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError
            self._reply(400, _error("invalid_json", "The body is not valid UTF-8 JSON."))
            return
        collector.accept(event, self._arrived)
        self._reply(204)

    def do_OPTIONS(self) -> None:
        """Answer a browser's CORS preflight for the collection API."""
        self._read_body_quietly()
        headers = {
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": f"Content-Type, {KEY_HEADER}",
            "Access-Control-Max-Age": "86400",
        }
        self._reply(204, headers=headers)

    def do_GET(self) -> None:
        """Serve the page, its static files, ``/api/events`` and ``/healthz``."""
        url = urlsplit(self.path)
        if url.path == HEALTH_PATH:
            self._reply(200, {"status": "ok", "events": self.collector.store.count()})
            return
        # The inspection API and page omit CORS on purpose: another site open
        # in the same browser must not read (or wipe) the local events.
        self._cors = False
        if url.path == EVENTS_PATH:
            self._list_events(url.query)
            return
        page = _web.asset(url.path)
        if page is None:
            self._cors = True
            self._reply(404, _error("not_found", f"Nothing at {url.path}."))
            return
        content, content_type = page
        self._reply(200, content, content_type=content_type, headers={"Cache-Control": "no-cache"})

    def do_HEAD(self) -> None:
        """Like ``GET``, without the body."""
        self.do_GET()

    def do_DELETE(self) -> None:
        """``DELETE /api/events`` forgets every stored event."""
        self._read_body_quietly()
        self._cors = False
        if urlsplit(self.path).path != EVENTS_PATH:
            self._reply(405, _error("method_not_allowed", "Only /api/events can be deleted."))
            return
        self.collector.store.clear()
        self._reply(204)

    def do_PUT(self) -> None:
        """Refuse other methods, after reading their body."""
        self._read_body_quietly()
        self._reply(405, _error("method_not_allowed", f"{self.command} is not supported."))

    def do_PATCH(self) -> None:
        """Refuse ``PATCH``, after reading its body."""
        self.do_PUT()

    def _read_body_quietly(self) -> None:
        try:
            self._read_body()
        except _BadRequestError:
            self.close_connection = True

    def _list_events(self, query_string: str) -> None:
        params = {k: v[-1] for k, v in parse_qs(query_string).items()}
        raw_limit = params.get("limit", str(DEFAULT_LIST_LIMIT))
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIST_LIMIT:
            message = f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}."
            self._reply(400, _error("invalid_limit", message, "limit"))
            return
        query = Query(
            type=params.get("t") or None,
            name=params.get("n") or None,
            visitor_id=params.get("vi") or None,
            limit=int(raw_limit),
        )
        store = self.collector.store
        body = {
            "events": [stored.as_json() for stored in store.query(query)],
            "total": store.count(),
            "counts": store.counts(),
        }
        self._reply(200, body)
