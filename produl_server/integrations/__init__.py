"""Framework integrations: Django, Flask, Celery, WSGI and ASGI servers, serverless handlers.

Each submodule imports its framework when it is imported itself, never
before: ``import produl_server`` stays free of every framework, and none of
them is a dependency of the package.

* :mod:`produl_server.integrations.django`: middleware configured from
  ``settings.PRODUL``;
* :mod:`produl_server.integrations.flask`: the ``ProdulFlask`` extension;
* :mod:`produl_server.integrations.wsgi`: middleware for any WSGI app, and
  uWSGI thread detection;
* :mod:`produl_server.integrations.asgi`: middleware for any ASGI app
  (FastAPI, Starlette, ...), which also shuts the client down with the server;
* :mod:`produl_server.integrations.celery`: flush when a worker or a pool
  process stops;
* :mod:`produl_server.integrations.serverless`: flush at the end of each
  invocation.

This module holds what they share and has no framework import at all: the
per-request context (a :class:`contextvars.ContextVar`), the one builder of
a request's :class:`RequestInfo` that every integration uses, the
:class:`ContextualProdul` client that reads it, and the option parsing.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs

from .._client import Produl
from .._event import PageviewData, is_language_tag
from .._protocol import MAX_ID, MAX_PATH, MAX_URL
from ..exceptions import ConfigurationError

__all__ = [
    "ContextualProdul",
    "IntegrationOptions",
    "RequestInfo",
    "current_request",
    "request_context",
]

log = logging.getLogger("produl_server")

#: A visitor id as the integrations hand it to the client.
VisitorId = str | int

# Characters left as they are when a decoded path is quoted again; the same
# set browsers leave alone in ``location.pathname``.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"


@attrs.frozen
class JobOptions:
    """What a task-queue integration's ``connect()`` was last told (RQ, Dramatiq, Huey, arq)."""

    flush_after_job: bool = False
    shutdown_timeout: float | None = None


def flush_deadline(clients: list[Produl], budget: float | None) -> tuple[float, float]:
    """The shared *budget* (default: the clients' largest ``shutdown_timeout``) and its deadline."""
    if budget is None:
        budget = max(client.config.shutdown_timeout for client in clients)
    return budget, time.monotonic() + budget


def report_flush(client: Produl, done: bool, why: str, budget: float) -> None:
    """Warn about the events a flush left queued.

    False with nothing pending means drops, each already logged and reported.
    """
    if not done and client.stats.pending:
        log.warning(
            "produl_server: %d event(s) still pending after the %s flush (%.1f s budget)",
            client.stats.pending,
            why,
            budget,
        )


def flush_clients(clients: list[Produl], budget: float | None, why: str) -> None:
    """Flush *clients* within one shared *budget*, as a worker process ends or a job does.

    Never raises: the flush runs inside a job that has already succeeded, or
    a task queue's own shutdown, which an exception would disturb.

    Args:
        clients: The clients to flush.
        budget: Seconds for all of them; ``None`` is their largest
            ``shutdown_timeout``.
        why: The moment, for the log lines.
    """
    if not clients:
        return
    budget, deadline = flush_deadline(clients, budget)
    for client in clients:
        try:
            done = client.flush(max(0.0, deadline - time.monotonic()))
        except Exception:
            log.exception("produl_server: flush at %s failed", why)
            continue
        report_flush(client, done, why, budget)


def quote_path(path: str) -> str:
    """Percent-encode a decoded request path the way a browser shows it.

    Args:
        path: A decoded path such as ``/café/menu``.

    Returns:
        ``/caf%C3%A9/menu``; characters that are already escapes stay as they are.
    """
    if _ALREADY_QUOTED.fullmatch(path):
        return path  # the common case, several times faster than quote()
    return urllib.parse.quote(path, safe=_PATH_SAFE)


_ALREADY_QUOTED = re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=\-._~%]*")


# Characters a query string keeps as they are; every other byte is
# percent-encoded, and existing escapes stay as they are.
_QUERY_SAFE = "=&;:@!$'()*+,/?%-._~"


def header_text(value: str | bytes) -> str:
    """A header value as text, from bytes or from a PEP 3333 "bytes as latin-1" string.

    WSGI servers, Django and Werkzeug hand headers over as their bytes decoded
    as latin-1; ASGI servers hand over the bytes. Both become the UTF-8 text
    a browser meant (an invalid sequence becomes U+FFFD).

    Args:
        value: The header value.

    Returns:
        The decoded text.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    try:
        return value.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return value  # already text


def first_language(header: str | bytes | None) -> str | None:
    """The first language tag of an ``Accept-Language`` header, if it is a valid one.

    ``fr-CH, fr;q=0.9, en;q=0.8`` gives ``fr-CH``. The tag is checked by the
    rule ``track_pageview(language=...)`` applies (letters, then hyphenated
    subtags of letters and digits, at most 35 characters); anything else
    (``*``, garbage, an empty header) gives ``None``, so a client's odd header
    never costs a pageview.

    Args:
        header: The header value (see :func:`header_text`), or ``None``.

    Returns:
        The tag as the client wrote it, or ``None``.
    """
    if not header:
        return None
    text = header_text(header) if isinstance(header, bytes) else header
    tag = text.split(",", 1)[0].split(";", 1)[0].strip()
    return tag if tag and is_language_tag(tag) else None


def build_request_info(
    *,
    scheme: str,
    host: str | None,
    path: str,
    query: bytes,
    referrer: str | bytes | None,
    options: IntegrationOptions,
    visitor: Callable[[], object] | None,
    session: Callable[[], object] | None = None,
    accept_language: str | bytes | None = None,
) -> RequestInfo:
    """The :class:`RequestInfo` of a request: one encoding for every integration.

    WSGI, Django, Flask and ASGI all build their request info here, so the
    same request gives the same ``path`` and ``url`` under each of them.

    Args:
        scheme: ``http`` or ``https``.
        host: The ``Host`` header (or server name and port); ``None`` when it
            is unknown or not allowed, which leaves the URL out.
        path: The decoded request path, script or root path included.
        query: The raw query string, as the client sent its bytes.
        referrer: The ``Referer`` header (see :func:`header_text`).
        options: Whether to keep the query string and the language.
        visitor: Computes the visitor id when it is needed.
        session: Computes the session key when it is needed.
        accept_language: The ``Accept-Language`` header, if any.

    Returns:
        The percent-encoded path, the URL (with the query string,
        percent-encoded, when ``include_query`` is on), the referrer and the
        language (unless ``language`` is off).
    """
    path, url = request_location(scheme, host, path, query, options)
    return RequestInfo(
        path=path,
        url=url,
        referrer=header_text(referrer) if referrer else None,
        visitor=visitor,
        session=session,
        language=first_language(accept_language) if options.language else None,
    )


def request_location(
    scheme: str, host: str | None, path: str, query: bytes, options: IntegrationOptions
) -> tuple[str, str | None]:
    """The ``(path, url)`` of a request, as :func:`build_request_info` gives them."""
    path = quote_path(path)
    if not path.startswith("/"):
        path = "/" + path
    url = None
    if host:
        url = f"{scheme}://{host}{path}"
        if options.include_query and query:
            url += "?" + urllib.parse.quote_from_bytes(query, safe=_QUERY_SAFE)
    return path, url


def _as_visitor_id(value: object, what: str = "a visitor id") -> VisitorId | None:
    """A visitor id (or session key) from whatever its function returned, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        # True/False are ints to Python but never a meaningful visitor.
        raise TypeError(f"{what} must be a str, int or UUID, not {value!r}")
    if isinstance(value, int | str):
        return value
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{what} must be a str, int or UUID, not {type(value).__name__}")


def _resolve_id(function: Callable[[], object] | None, option: str) -> VisitorId | None:
    """Call a visitor_id or session_key function; problems are logged, never raised."""
    name = option.replace("_", " ")
    try:
        value = _as_visitor_id(function() if function is not None else None, "a " + name)
    except Exception:
        log.exception("produl_server: the %s function failed; no %s", option, name)
        return None
    if isinstance(value, str) and len(value) > MAX_ID:
        log.warning("produl_server: %s longer than %d characters ignored", name, MAX_ID)
        return None
    return value


class RequestInfo:
    """What an integration knows about the request being handled.

    The visitor id and the session key are computed on first use and then
    kept, because the functions behind them may touch the session or the
    database.

    Args:
        path: The request path, percent-encoded, starting with ``/``.
        url: The full URL, e.g. ``https://shop.example/cart``.
        referrer: The ``Referer`` header, if any.
        visitor: Returns the visitor id for this request, or ``None``.
        session: Returns the session key for this request, or ``None``.
        language: The visitor's language tag (from ``Accept-Language``), if any.
    """

    __slots__ = (
        "_described",
        "_language",
        "_located",
        "_path",
        "_referrer",
        "_resolved",
        "_session",
        "_session_key",
        "_session_resolved",
        "_url",
        "_visitor",
        "_visitor_id",
    )

    def __init__(
        self,
        *,
        path: str | None,
        url: str | None,
        referrer: str | None = None,
        visitor: Callable[[], object] | None = None,
        session: Callable[[], object] | None = None,
        language: str | None = None,
    ) -> None:
        self._locate(path, url)
        self._describe(referrer, language)
        self._identify(visitor, session)

    def _locate(self, path: str | None, url: str | None) -> None:
        # Values the collector would refuse are left out here, so that
        # filling them in can never make a user's track_event() call fail.
        if path is not None and (not path.startswith("/") or len(path) > MAX_PATH):
            path = url = None
        if url is not None and len(url) > MAX_URL:
            url = None
        self._path = path
        self._url = url
        self._located = True

    def _describe(self, referrer: str | None, language: str | None) -> None:
        if referrer is not None and (not referrer or len(referrer) > MAX_URL):
            referrer = None
        self._referrer = referrer
        if language is not None and not is_language_tag(language):
            language = None
        self._language = language
        self._described = True

    def _identify(
        self, visitor: Callable[[], object] | None, session: Callable[[], object] | None
    ) -> None:
        self._visitor = visitor
        self._resolved = visitor is None
        self._visitor_id: VisitorId | None = None
        self._session = session
        self._session_resolved = session is None
        self._session_key: VisitorId | None = None

    def __repr__(self) -> str:
        return f"<RequestInfo path={self.path!r}>"

    # A subclass may leave the location or the description to be worked out
    # when first read (the ASGI middleware does): these fill them then.
    def _find_location(self) -> None:
        raise NotImplementedError

    def _find_description(self) -> None:
        raise NotImplementedError

    @property
    def path(self) -> str | None:
        """The request path, percent-encoded, starting with ``/``; ``None`` if unusable."""
        if not self._located:
            self._find_location()
        return self._path

    @property
    def url(self) -> str | None:
        """The full URL of the request, or ``None`` when its host is not known."""
        if not self._located:
            self._find_location()
        return self._url

    @property
    def referrer(self) -> str | None:
        """The ``Referer`` header, if any."""
        if not self._described:
            self._find_description()
        return self._referrer

    @property
    def language(self) -> str | None:
        """The visitor's language tag (from ``Accept-Language``), if any."""
        if not self._described:
            self._find_description()
        return self._language

    @property
    def visitor_id(self) -> VisitorId | None:
        """The visitor id for this request, or ``None`` when there is none.

        A visitor-id function that raises, or returns something that is not
        an id, is logged and counts as "no visitor": analytics never break a
        request.
        """
        if not self._resolved:
            self._resolved = True
            self._visitor_id = _resolve_id(self._visitor, "visitor_id")
        return self._visitor_id

    @property
    def session_key(self) -> VisitorId | None:
        """The session key for this request, or ``None`` when there is none.

        Computed by the integration's ``session_key`` function on first use,
        with the same rules as :attr:`visitor_id`: a function that raises or
        returns something that is not an id counts as "no session key".
        """
        if not self._session_resolved:
            self._session_resolved = True
            self._session_key = _resolve_id(self._session, "session_key")
        return self._session_key

    def forget_visitor(self) -> None:
        """Compute the visitor id and session key again on next use (once the user is loaded)."""
        self._resolved = self._visitor is None
        self._visitor_id = None
        self._session_resolved = self._session is None
        self._session_key = None

    def url_for(self, path: str) -> str | None:
        """The URL of *path* on the host of this request.

        Args:
            path: A path starting with ``/``.

        Returns:
            ``scheme://host`` of the current URL followed by *path*, or
            ``None`` when the current URL is not known.
        """
        if self.url is None:
            return None
        parts = urllib.parse.urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}{path}"


_current: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar(
    "produl_server_request", default=None
)


def current_request() -> RequestInfo | None:
    """The :class:`RequestInfo` of the request being handled, if any.

    Returns:
        The info the integration's middleware set for this request (thread,
        or asyncio task), or ``None`` outside of a request.
    """
    return _current.get()


@contextlib.contextmanager
def request_context(info: RequestInfo) -> Iterator[RequestInfo]:
    """Make *info* the current request for the code inside the ``with`` block.

    The integrations do this for you; use it for a host they do not cover.

    Args:
        info: What is known about the request.

    Yields:
        *info*.
    """
    token = _current.set(info)
    try:
        yield info
    finally:
        _current.reset(token)


class ContextualProdul(Produl):
    """A :class:`~produl_server.Produl` that fills fields from the current request.

    Inside a request handled by one of the integrations, ``track_event``
    and ``track_pageview`` fill every field you leave out from the request:
    ``path`` and ``url`` (the URL of a path you give is built on the
    request's host), ``referrer`` and ``language`` for pageviews, and
    ``visitor_id`` and ``session_key`` from the integration's functions. What
    you pass always wins. Outside a request it behaves exactly like
    :class:`~produl_server.Produl`.

    It takes the same arguments as :class:`~produl_server.Produl`.
    """

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
        """Queue a custom event, completed from the current request.

        See :meth:`produl_server.Produl.track_event` for the arguments.
        """
        info = _current.get()
        if info is not None:
            if path is None and url is None:
                path, url = info.path, info.url
            elif path is not None and url is None:
                url = info.url_for(path)
            if visitor_id is None:
                visitor_id = info.visitor_id
            if session_key is None:
                session_key = info.session_key
        super().track_event(
            name,
            properties,
            visitor_id=visitor_id,
            path=path,
            url=url,
            session_key=session_key,
        )

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
        """Queue a pageview, completed from the current request.

        A :class:`~produl_server.PageviewData` is sent as it is; keyword
        arguments left out are filled from the request. See
        :meth:`produl_server.Produl.track_pageview` for the arguments.
        """
        info = _current.get()
        if data is None and info is not None:
            if path is None and url is None:
                path, url = info.path, info.url
                if referrer is None:
                    referrer = info.referrer
            elif path is not None and url is None:
                url = info.url_for(path)
            if visitor_id is None:
                visitor_id = info.visitor_id
            if session_key is None:
                session_key = info.session_key
            if language is None:
                language = info.language
        if data is not None:
            super().track_pageview(data)
            return
        super().track_pageview(
            path=path,
            visitor_id=visitor_id,
            url=url,
            title=title,
            referrer=referrer,
            session_key=session_key,
            language=language,
        )


def _client_parameters() -> frozenset[str]:
    return frozenset(inspect.signature(Produl.__init__).parameters) - {"self"}


def _patterns(name: str, value: object) -> tuple[re.Pattern[str], ...]:
    if value is None:
        return ()
    if isinstance(value, str | re.Pattern):
        value = [value]
    if not isinstance(value, Iterable):
        raise ConfigurationError(f"{name} must be a list of regular expressions, not {value!r}")
    compiled = []
    for item in value:
        if isinstance(item, re.Pattern):
            compiled.append(item)
            continue
        if not isinstance(item, str):
            raise ConfigurationError(f"{name} must hold regular expressions, not {item!r}")
        try:
            compiled.append(re.compile(item))
        except re.error as exc:
            raise ConfigurationError(
                f"{name}: {item!r} is not a regular expression: {exc}"
            ) from None
    return tuple(compiled)


@attrs.frozen(kw_only=True)
class IntegrationOptions:
    """The web integrations' own options, next to the client's.

    Attributes:
        pageviews: Track a server-side pageview for each successful
            (2xx) HTML response to a ``GET`` request that has a visitor id.
        include_paths: Regular expressions matched at the start of the path
            (``re.match``); when any are given, only matching paths get
            pageviews.
        exclude_paths: Regular expressions matched the same way; matching
            paths never get pageviews. Wins over ``include_paths``.
        visitor_id: Called with the framework's request object; returns the
            visitor id, or ``None`` for "do not track this visitor". ``None``
            means the integration's default (the signed-in user's id).
        session_key: Called with the same request object; returns the
            session key (``sk``) of the request's pageview and events, or
            ``None`` for none. ``None`` (the default) sends no session key:
            the SDK never invents one.
        include_query: Keep the query string in the ``url`` of pageviews and
            events. Off by default: query strings often carry tokens and
            e-mail addresses.
        language: Send the first tag of the request's ``Accept-Language``
            header as the pageview's language (``l``). On by default; a
            header whose first tag is not a valid language tag sends none.
    """

    pageviews: bool = False
    include_paths: tuple[re.Pattern[str], ...] = ()
    exclude_paths: tuple[re.Pattern[str], ...] = ()
    visitor_id: Callable[[Any], object] | None = None
    session_key: Callable[[Any], object] | None = None
    include_query: bool = False
    language: bool = True

    def wants_pageview(self, method: str, status: int, content_type: str, path: str) -> bool:
        """Whether a response earns a pageview (before the visitor id is known).

        Args:
            method: The request method.
            status: The response status code.
            content_type: The response ``Content-Type`` header ('' if none).
            path: The request path.

        Returns:
            True for a 2xx HTML answer to a GET on a path the patterns allow.
        """
        if not self.pageviews or method != "GET" or not 200 <= status < 300:
            return False
        kind = content_type.split(";", 1)[0].strip().lower()
        if kind not in ("text/html", "application/xhtml+xml"):
            return False
        if self.include_paths and not any(p.match(path) for p in self.include_paths):
            return False
        return not any(p.match(path) for p in self.exclude_paths)


_INTEGRATION_KEYS = frozenset(attrs.fields_dict(IntegrationOptions))


def split_options(
    options: Mapping[str, Any],
    source: str,
    resolve: Callable[[str], Any] | None = None,
) -> tuple[dict[str, Any], IntegrationOptions]:
    """Split one settings mapping into client arguments and integration options.

    Args:
        options: Lower-case option names to values.
        source: Where the options came from, for error messages
            (e.g. ``settings.PRODUL``).
        resolve: Turns a dotted path given as ``visitor_id`` or
            ``session_key`` into the callable (Django's ``import_string``, say).

    Returns:
        The keyword arguments for :class:`ContextualProdul`, and the rest.

    Raises:
        ConfigurationError: An unknown option, or an invalid value.
    """
    client_keys = _client_parameters()
    unknown = sorted(set(options) - client_keys - _INTEGRATION_KEYS)
    if unknown:
        valid = ", ".join(sorted(client_keys | _INTEGRATION_KEYS))
        raise ConfigurationError(f"{source}: unknown option(s) {unknown}; valid: {valid}")
    client = {key: value for key, value in options.items() if key in client_keys}
    functions = {}
    for name in ("visitor_id", "session_key"):
        function = options.get(name)
        if isinstance(function, str):
            if resolve is None:
                raise ConfigurationError(f"{source}: {name} must be a callable")
            try:
                function = resolve(function)
            except ImportError as exc:
                raise ConfigurationError(f"{source}: {name}: {exc}") from None
        if function is not None and not callable(function):
            raise ConfigurationError(f"{source}: {name} must be callable, not {function!r}")
        functions[name] = function
    flags = {}
    for flag, default in (("pageviews", False), ("include_query", False), ("language", True)):
        value = options.get(flag, default)
        if not isinstance(value, bool):
            raise ConfigurationError(f"{source}: {flag} must be True or False, not {value!r}")
        flags[flag] = value
    integration = IntegrationOptions(
        pageviews=flags["pageviews"],
        include_query=flags["include_query"],
        language=flags["language"],
        include_paths=_patterns("include_paths", options.get("include_paths")),
        exclude_paths=_patterns("exclude_paths", options.get("exclude_paths")),
        visitor_id=functions["visitor_id"],
        session_key=functions["session_key"],
    )
    return client, integration


_warned_no_threads = threading.Event()


def build_client(options: Mapping[str, Any]) -> ContextualProdul:
    """Build the shared client of a web integration, suited to the host.

    Under a uWSGI that runs Python without thread support, a sender thread
    would never get to run between requests, so the client is built with
    ``sync_mode=True`` unless ``sync_mode`` was set explicitly, and a
    warning says so once per process.

    Args:
        options: Keyword arguments for :class:`ContextualProdul`.

    Returns:
        The client.

    Raises:
        ConfigurationError: A missing key or an invalid option.
    """
    options = dict(options)
    if "sync_mode" not in options:
        from .wsgi import uwsgi_threads_enabled  # noqa: PLC0415 -- avoid an import cycle

        if uwsgi_threads_enabled() is False:
            options["sync_mode"] = True
            if not _warned_no_threads.is_set():
                _warned_no_threads.set()
                log.warning(
                    "produl_server: uWSGI runs without Python threads, so events are sent "
                    "while the request waits (sync_mode=True). Start uWSGI with "
                    "--enable-threads to send them in the background."
                )
    return ContextualProdul(**options)
