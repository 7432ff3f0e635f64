"""WSGI: a middleware for any WSGI application, and uWSGI thread detection.

Wrap an application that has no integration of its own (Falcon, Pyramid,
Bottle, a bare WSGI callable)::

    from produl_server.integrations.wsgi import ProdulMiddleware

    application = ProdulMiddleware(application, pageviews=True)

Forking servers need nothing more: the client's sender thread is started
lazily in the process that tracks, and a forked worker gets a fresh, empty
sender (gunicorn ``--preload``, uWSGI without ``--lazy-apps``).
"""

from __future__ import annotations

import contextvars
import importlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import (
    ContextualProdul,
    IntegrationOptions,
    RequestInfo,
    _current,
    build_client,
    build_request_info,
    header_text,
    split_options,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ProdulMiddleware", "uwsgi_threads_enabled"]

log = logging.getLogger("produl_server")


def uwsgi_threads_enabled() -> bool | None:
    """Whether this process is a uWSGI worker in which Python threads run.

    uWSGI before 2.0.31 starts Python without thread support unless it is
    given ``--enable-threads`` (or ``--threads N``); a background sender
    thread then only runs while a request is being handled, so events can
    wait for the next request, or for ever. uWSGI 2.0.31 enables threads by
    default.

    Returns:
        ``None`` outside of uWSGI; else True or False.
    """
    try:
        # Built into the uWSGI binary: importable only inside a uWSGI process.
        uwsgi: Any = importlib.import_module("uwsgi")
    except ImportError:
        return None
    has_threads = getattr(uwsgi, "has_threads", None)
    if has_threads is not None:
        return bool(has_threads)
    opt = getattr(uwsgi, "opt", {})
    if opt.get("enable-threads"):
        return True
    threads = opt.get("threads")
    try:
        return threads is not None and int(threads) > 1
    except (TypeError, ValueError):
        return False


def environ_info(
    environ: WSGIEnvironment,
    options: IntegrationOptions,
    visitor: Callable[[], object] | None,
    session: Callable[[], object] | None = None,
) -> RequestInfo:
    """Build the :class:`~produl_server.integrations.RequestInfo` of a WSGI request.

    Args:
        environ: The WSGI environment.
        options: Whether to keep the query string and the language.
        visitor: Computes the visitor id when it is needed.
        session: Computes the session key when it is needed.

    Returns:
        The path (percent-encoded), URL, referrer and language of the request.
    """
    scheme = environ.get("wsgi.url_scheme", "http")
    host = environ.get("HTTP_HOST")
    if not host:
        host = environ.get("SERVER_NAME", "localhost")
        port = environ.get("SERVER_PORT", "")
        if port and port != {"http": "80", "https": "443"}.get(scheme):
            host = f"{host}:{port}"
    # PEP 3333: environ strings are the request's bytes decoded as latin-1.
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return build_request_info(
        scheme=scheme,
        host=host,
        path=header_text(path),
        query=environ.get("QUERY_STRING", "").encode("latin-1"),
        referrer=environ.get("HTTP_REFERER"),
        options=options,
        visitor=visitor,
        session=session,
        accept_language=environ.get("HTTP_ACCEPT_LANGUAGE"),
    )


class ProdulMiddleware:
    """WSGI middleware: request context for events, and optional pageviews.

    While the wrapped application handles a request (including while its
    response body is iterated),
    :meth:`~produl_server.integrations.ContextualProdul.track_event` fills
    ``path``, ``url`` and ``visitor_id`` from the request. With
    ``pageviews=True`` each 2xx HTML answer to a ``GET`` with a visitor id is
    tracked as a pageview once the body has been sent, with the session key
    of the ``session_key`` function and the language of ``Accept-Language``.

    Args:
        app: The WSGI application to wrap.
        client: The client to use; by default one is built from ``options``
            and the ``PRODUL_*`` environment variables.
        options: :class:`~produl_server.Produl` arguments and the
            :class:`~produl_server.integrations.IntegrationOptions` (the
            default ``visitor_id`` is ``environ["REMOTE_USER"]``, the user
            the server authenticated, if any; ``session_key`` is called with
            the environ too, and has no default).

    Raises:
        ConfigurationError: An unknown option or an invalid value.
    """

    def __init__(
        self, app: WSGIApplication, client: ContextualProdul | None = None, **options: Any
    ) -> None:
        client_options, self.options = split_options(options, "ProdulMiddleware()")
        if client is not None and client_options:
            raise TypeError("pass either client= or client options, not both")
        self.app = app
        self.client = client if client is not None else build_client(client_options)

    def _visitor(self, environ: WSGIEnvironment) -> object:
        chooser = self.options.visitor_id
        if chooser is not None:
            return chooser(environ)
        return environ.get("REMOTE_USER") or None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Handle one request (the WSGI protocol)."""
        sessions = self.options.session_key
        info = environ_info(
            environ,
            self.options,
            lambda: self._visitor(environ),
            None if sessions is None else (lambda: sessions(environ)),
        )
        context = contextvars.copy_context()
        context.run(_current.set, info)
        seen: list[str] = []

        def capture(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None, /
        ) -> Callable[[bytes], object]:
            seen[:] = [status, next((v for k, v in headers if k.lower() == "content-type"), "")]
            return start_response(status, headers, exc_info)

        body = context.run(self.app, environ, capture)
        return _Body(body, context, lambda: self._after(environ, info, seen))

    def _after(self, environ: WSGIEnvironment, info: RequestInfo, seen: list[str]) -> None:
        if not seen or info.path is None:
            return
        try:
            status = int(seen[0].split(None, 1)[0])
        except ValueError:
            return
        method = environ.get("REQUEST_METHOD", "GET")
        if self.options.wants_pageview(method, status, seen[1], info.path):
            track_pageview_safely(self.client, info)


def track_pageview_safely(client: ContextualProdul, info: RequestInfo) -> None:
    """Track the pageview of *info*, if it has a visitor; never raise.

    Args:
        client: Where to track it.
        info: The request; its visitor id decides whether there is a pageview.
    """
    visitor = info.visitor_id
    if visitor is None or info.path is None:
        return
    try:
        client.track_pageview(
            path=info.path,
            url=info.url,
            referrer=info.referrer,
            visitor_id=visitor,
            session_key=info.session_key,
            language=info.language,
        )
    except Exception:
        # Analytics must never turn a good response into an error page.
        log.exception("produl_server: could not track the pageview of %s", info.path)


class _Body:
    """The application's response body, iterated and closed inside the request context."""

    def __init__(
        self, body: Iterable[bytes], context: contextvars.Context, after: Callable[[], None]
    ) -> None:
        self._body = body
        self._iterator: Iterator[bytes] | None = None
        self._context = context
        self._after = after

    def __iter__(self) -> _Body:
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = self._context.run(iter, self._body)
        return self._context.run(next, self._iterator)

    def close(self) -> None:
        """Close the application's body, then track the pageview (PEP 3333 ``close``)."""
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                self._context.run(close)
        finally:
            self._context.run(self._after)
