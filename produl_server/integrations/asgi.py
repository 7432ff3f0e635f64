"""ASGI: a middleware for any ASGI application (FastAPI, Starlette, Quart ...).

It needs no framework. With FastAPI or Starlette it is one line::

    from produl_server.integrations.asgi import ProdulMiddleware

    app.add_middleware(ProdulMiddleware, pageviews=True, visitor_id=visitor_of)

and for any other ASGI application ``app = ProdulMiddleware(app, ...)``.

It gives ``http`` requests the same request context and the same
server-side pageviews as the WSGI middleware. It passes ``websocket``
connections through untouched, and ``lifespan`` too, except that it shuts
the client down when the server's lifespan ends: uvicorn, once its graceful
shutdown is over, dies of the ``SIGTERM`` it got, so ``atexit`` handlers never
run and only the lifespan can deliver what is still queued.
:class:`ProdulLifespan` does that alone, for an application that does its
own request handling (Django's ASGI handler, say).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from .._client import Produl
from . import (
    ContextualProdul,
    IntegrationOptions,
    RequestInfo,
    _current,
    build_client,
    build_request_info,
    first_language,
    header_text,
    request_location,
    split_options,
)
from .wsgi import track_pageview_safely

__all__ = ["ProdulLifespan", "ProdulMiddleware", "scope_info"]

log = logging.getLogger("produl_server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# Messages after which a response has been handed over in full.
_LAST = frozenset(("http.response.pathsend", "http.response.zerocopysend"))


def _host(scope: Scope, header: bytes | None) -> str | None:
    if header:
        return header.decode("latin-1")
    server = scope.get("server")
    if not server:
        return None
    host, port = server[0], server[1]
    if port is None or port == _DEFAULT_PORTS.get(scope.get("scheme", "http")):
        return str(host)
    return f"{host}:{port}"


def _full_path(path: str | None, root: str | None) -> str:
    path = path or "/"
    root = root or ""
    # The ASGI spec has path include root_path; servers before that did not.
    if root and not path.startswith(root):
        path = root + path
    return path


def scope_info(
    scope: Scope,
    options: IntegrationOptions,
    visitor: Callable[[], object] | None,
    session: Callable[[], object] | None = None,
) -> RequestInfo:
    """Build the :class:`~produl_server.integrations.RequestInfo` of an ASGI ``http`` scope.

    Args:
        scope: The connection scope.
        options: Whether to keep the query string and the language.
        visitor: Computes the visitor id when it is needed.
        session: Computes the session key when it is needed.

    Returns:
        The path (percent-encoded), URL, referrer and language of the request.
    """
    host, referrer, language = _headers(scope)
    return build_request_info(
        scheme=scope.get("scheme") or "http",
        host=_host(scope, host),
        path=_full_path(scope.get("path"), scope.get("root_path")),
        query=scope.get("query_string") or b"",
        referrer=referrer,
        options=options,
        visitor=visitor,
        session=session,
        accept_language=language,
    )


def _headers(scope: Scope) -> tuple[bytes | None, bytes | None, bytes | None]:
    """The first ``Host``, ``Referer`` and ``Accept-Language`` of a scope."""
    host = referrer = language = None
    for name, value in scope.get("headers") or ():
        if name == b"host" and host is None:
            host = value
        elif name == b"referer" and referrer is None:
            referrer = value
        elif name == b"accept-language" and language is None:
            language = value
    return host, referrer, language


class _ScopeInfo(RequestInfo):
    """The request info of a scope, worked out when first read (issue #22, P7).

    Most requests read nothing of it, or only the path, the URL and the
    visitor (a ``track_event``); the headers are scanned, and the path
    quoted, only then, and the referrer and the language only for a
    pageview. The path and root path are taken at once: a router may
    rewrite them in the scope it hands on.
    """

    __slots__ = ("_at", "_options", "_scope")

    def __init__(
        self,
        scope: Scope,
        options: IntegrationOptions,
        visitor: Callable[[], object] | None,
        session: Callable[[], object] | None,
    ) -> None:
        self._scope = scope
        self._options = options
        self._at = (scope.get("path"), scope.get("root_path"))
        self._located = self._described = False
        self._identify(visitor, session)

    def _find_location(self) -> None:
        scope = self._scope
        self._locate(
            *request_location(
                scope.get("scheme") or "http",
                _host(scope, _headers(scope)[0]),
                _full_path(*self._at),
                scope.get("query_string") or b"",
                self._options,
            )
        )

    def _find_description(self) -> None:
        _host_header, referrer, language = _headers(self._scope)
        self._describe(
            header_text(referrer) if referrer else None,
            first_language(language) if self._options.language else None,
        )


def _content_type(headers: Iterable[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.decode("latin-1")
    return ""


class ProdulMiddleware:
    """ASGI middleware: request context for events, optional pageviews, shutdown.

    While the wrapped application handles an ``http`` request (background
    tasks and tasks it starts included: the context is a
    :class:`contextvars.ContextVar`),
    :meth:`~produl_server.integrations.ContextualProdul.track_event` fills
    ``path``, ``url`` and ``visitor_id`` from the request. With
    ``pageviews=True``, each 2xx HTML answer to a ``GET`` with a visitor id
    is tracked as a pageview once its body has been handed to the server:
    tracking never delays a byte of the response, and streaming responses
    stream as before. When the server's lifespan ends, the client is shut
    down (see :class:`ProdulLifespan`).

    Args:
        app: The ASGI application to wrap.
        client: The client to use; by default one is built from
            ``client_options`` and the ``PRODUL_*`` environment variables.
        pageviews: Track server-side pageviews.
        include_paths: See :class:`~produl_server.integrations.IntegrationOptions`.
        exclude_paths: See :class:`~produl_server.integrations.IntegrationOptions`.
        visitor_id: Called with the ASGI scope; returns the visitor id, or
            ``None``. By default there is none: ASGI has no standard place
            for the signed-in user.
        session_key: Called with the ASGI scope; returns the session key,
            or ``None``. By default there is none.
        include_query: Keep the query string in ``url``.
        language: Send the first ``Accept-Language`` tag as the pageview's
            ``l`` (on by default).
        client_options: :class:`~produl_server.Produl` arguments, when
            ``client`` is not given.

    Raises:
        ConfigurationError: An unknown option or an invalid value.
    """

    def __init__(
        self,
        app: ASGIApp,
        client: ContextualProdul | None = None,
        *,
        pageviews: bool = False,
        include_paths: Iterable[str | re.Pattern[str]] | None = None,
        exclude_paths: Iterable[str | re.Pattern[str]] | None = None,
        visitor_id: Callable[[Scope], object] | None = None,
        session_key: Callable[[Scope], object] | None = None,
        include_query: bool = False,
        language: bool = True,
        **client_options: Any,
    ) -> None:
        options = {
            "pageviews": pageviews,
            "include_paths": include_paths,
            "exclude_paths": exclude_paths,
            "visitor_id": visitor_id,
            "session_key": session_key,
            "include_query": include_query,
            "language": language,
        }
        client_kwargs, self.options = split_options(
            {**client_options, **options}, "ProdulMiddleware()"
        )
        if client is not None and client_kwargs:
            raise TypeError("pass either client= or client options, not both")
        self.app = app
        self.client = client if client is not None else build_client(client_kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one connection (the ASGI protocol)."""
        if scope["type"] != "http":
            await self._other(scope, receive, send)
            return
        chooser, sessions = self.options.visitor_id, self.options.session_key
        visitor = None if chooser is None else (lambda: chooser(scope))
        session = None if sessions is None else (lambda: sessions(scope))
        info = _ScopeInfo(scope, self.options, visitor, session)
        token = _current.set(info)
        try:
            if self.options.pageviews and scope.get("method") == "GET":
                await self._watched(scope, receive, send, info)
            else:
                await self.app(scope, receive, send)
        finally:
            _current.reset(token)

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _Lifespan(self.client, receive, send).run(self.app, scope)
        else:
            await self.app(scope, receive, send)

    async def _watched(self, scope: Scope, receive: Receive, send: Send, info: RequestInfo) -> None:
        response = _Response(self, info, send)
        try:
            await self.app(scope, receive, response.send)
        finally:
            response.finish()


class _Response:
    """Watches a response go out, and tracks its pageview once it is out."""

    __slots__ = ("_done", "_info", "_middleware", "_send", "content_type", "status")

    def __init__(self, middleware: ProdulMiddleware, info: RequestInfo, send: Send) -> None:
        self._middleware = middleware
        self._info = info
        self._send = send
        self._done = False
        self.status: int | None = None
        self.content_type = ""

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message.get("status", 200))
            self.content_type = _content_type(message.get("headers") or ())
        await self._send(message)
        if kind in _LAST or (kind == "http.response.body" and not message.get("more_body")):
            self.finish()

    def finish(self) -> None:
        """Track the pageview if the response earned one; at most once."""
        if self._done or self.status is None:
            return
        self._done = True
        info, middleware = self._info, self._middleware
        if info.path is not None and middleware.options.wants_pageview(
            "GET", self.status, self.content_type, info.path
        ):
            track_pageview_safely(middleware.client, info)


class ProdulLifespan:
    """Shut a client down when the ASGI server's lifespan ends, within its budget.

    uvicorn (and gunicorn's uvicorn workers) run the lifespan shutdown after
    their graceful shutdown; uvicorn then restores the default signal
    handler and re-raises ``SIGTERM``, so ``atexit`` never runs. This wrapper
    waits for the application's own shutdown, then awaits
    :meth:`~produl_server.Produl.ashutdown` (at most the client's
    ``shutdown_timeout``, whether the API answers or not), then tells the
    server. For an application that does not speak the lifespan protocol
    (Django's ASGI handler), it answers the server itself.

    :class:`ProdulMiddleware` does the same; use this one when you track
    without the middleware::

        application = ProdulLifespan(get_asgi_application(), get_client())

    Args:
        app: The ASGI application to wrap.
        client: The client to shut down.
    """

    def __init__(self, app: ASGIApp, client: Produl) -> None:
        self.app = app
        self.client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one connection (the ASGI protocol)."""
        if scope["type"] == "lifespan":
            await _Lifespan(self.client, receive, send).run(self.app, scope)
        else:
            await self.app(scope, receive, send)


class _Lifespan:
    """One lifespan: observes the messages, and shuts the client down at its end."""

    def __init__(self, client: Produl, receive: Receive, send: Send) -> None:
        self._client = client
        self._receive = receive
        self._send = send
        self.startup_received = False
        self.started: str | None = None  # the app's answer to startup
        self.shutdown_received = False
        self.finished = False  # shutdown answered to the server
        self._closed = False

    async def receive(self) -> Message:
        message = await self._receive()
        kind = message.get("type")
        if kind == "lifespan.startup":
            self.startup_received = True
        elif kind == "lifespan.shutdown":
            self.shutdown_received = True
        return message

    async def send(self, message: Message) -> None:
        kind = message.get("type", "")
        if kind.startswith("lifespan.startup."):
            self.started = kind
        elif kind.startswith("lifespan.shutdown."):
            # The app's shutdown handlers have run: what they tracked goes too.
            await self.close()
            self.finished = True
        await self._send(message)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._client.ashutdown()
        except Exception:
            log.exception("produl_server: shutting the client down at the lifespan's end failed")

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        try:
            await app(scope, self.receive, self.send)
        except Exception:
            if self.started is not None:
                if self.shutdown_received:
                    await self.close()
                raise
            # No answer to startup: the app does not speak lifespan.
            log.debug("produl_server: the app refused the lifespan; answering it", exc_info=True)
        if self.started == "lifespan.startup.failed" or self.finished:
            return
        await self._serve()

    async def _serve(self) -> None:
        """Answer the rest of the lifespan for an app that does not."""
        if self.started is None:
            if not self.startup_received:
                await self.receive()
            await self._send({"type": "lifespan.startup.complete"})
        while not self.shutdown_received:
            await self.receive()
        await self.close()
        self.finished = True
        await self._send({"type": "lifespan.shutdown.complete"})
