"""Django: middleware configured from ``settings.PRODUL``.

Add the middleware after ``AuthenticationMiddleware`` and configure it::

    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "produl_server.integrations.django.ProdulMiddleware",
    ]
    PRODUL = {
        "pageviews": True,
        "exclude_paths": [r"/admin/", r"/healthz$"],
    }

Then, in a view, :func:`get_client` returns the process's one client, and
``get_client().track_event("signup")`` fills ``path``, ``url`` and the
visitor from the request.

``settings.PRODUL`` takes every :class:`~produl_server.Produl` argument
(``server_key`` and ``api_url`` default to the ``PRODUL_SERVER_KEY`` and
``PRODUL_API_URL`` environment variables) and the
:class:`~produl_server.integrations.IntegrationOptions`; ``visitor_id`` may
be a dotted path, and so may ``session_key``. The default visitor id is the
signed-in user's primary key; anonymous requests get no pageview and no
visitor id. There is no default session key (Django's own session key is a
credential, never sent).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.core.signals import setting_changed
from django.http import HttpRequest, HttpResponseBase
from django.utils.functional import empty
from django.utils.module_loading import import_string

from ..exceptions import ConfigurationError
from . import (
    ContextualProdul,
    IntegrationOptions,
    RequestInfo,
    _current,
    build_client,
    build_request_info,
    split_options,
)
from .wsgi import track_pageview_safely

__all__ = ["ProdulMiddleware", "default_visitor_id", "get_client"]

log = logging.getLogger("produl_server")

_lock = threading.Lock()
_state: tuple[ContextualProdul, IntegrationOptions] | None = None


def default_visitor_id(request: HttpRequest) -> object:
    """The signed-in user's primary key, or ``None`` for anonymous requests.

    In async views, ``request.user`` cannot load the user from the database
    (Django raises ``SynchronousOnlyOperation``): the user that
    ``await request.auser()`` loaded is used instead, so call it before
    tracking (the middleware does, before a pageview).

    Args:
        request: The request.

    Returns:
        ``request.user.pk`` when the user is authenticated, else ``None``.
    """
    # Where Django 5's request.auser() keeps the user it loaded.
    user = getattr(request, "_acached_user", None)
    if user is None:
        user = getattr(request, "user", None)
        if _unloaded(user) and _in_event_loop():
            return None  # loading it here would query the database in the loop
    if user is not None and user.is_authenticated:
        return user.pk
    return None


def _unloaded(user: object) -> bool:
    """Whether *user* is AuthenticationMiddleware's lazy user, not loaded yet."""
    return getattr(user, "_wrapped", None) is empty


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _load() -> tuple[ContextualProdul, IntegrationOptions]:
    global _state
    state = _state
    if state is not None:
        return state
    with _lock:
        if _state is None:
            raw = getattr(settings, "PRODUL", {})
            if not isinstance(raw, Mapping):
                raise ConfigurationError(f"settings.PRODUL must be a dict, not {raw!r}")
            options, integration = split_options(raw, "settings.PRODUL", import_string)
            _state = (build_client(options), integration)
        return _state


def get_client() -> ContextualProdul:
    """The process's one client, built from ``settings.PRODUL`` on first use.

    Returns:
        The shared :class:`~produl_server.integrations.ContextualProdul`.

    Raises:
        ConfigurationError: ``settings.PRODUL`` is invalid or no server key
            is configured.
    """
    return _load()[0]


def _settings_changed(*, setting: str, **_: Any) -> None:
    # override_settings(PRODUL=...) in a project's tests must take effect.
    global _state
    if setting == "PRODUL":
        with _lock:
            old, _state = _state, None
        if old is not None:
            old[0].shutdown()


setting_changed.connect(_settings_changed, dispatch_uid="produl_server.settings_changed")


def _raw_query(request: HttpRequest) -> bytes:
    scope = getattr(request, "scope", None)  # Django's ASGIRequest keeps the bytes
    if isinstance(scope, dict) and isinstance(scope.get("query_string"), bytes):
        raw: bytes = scope["query_string"]
        return raw
    query = request.META.get("QUERY_STRING") or ""
    try:
        return query.encode("latin-1")  # PEP 3333: the bytes, as latin-1
    except UnicodeEncodeError:
        return query.encode()


def _request_info(request: HttpRequest, options: IntegrationOptions) -> RequestInfo:
    try:
        host: str | None = request.get_host()
    except DisallowedHost:
        host = None
    chooser = options.visitor_id or default_visitor_id
    sessions = options.session_key
    return build_request_info(
        scheme=request.scheme or "http",
        host=host,
        path=request.path,
        query=_raw_query(request),
        referrer=request.META.get("HTTP_REFERER"),
        options=options,
        visitor=lambda: chooser(request),
        session=None if sessions is None else (lambda: sessions(request)),
        accept_language=request.META.get("HTTP_ACCEPT_LANGUAGE"),
    )


class ProdulMiddleware:
    """Request context for events in views, and optional server-side pageviews.

    A pageview is tracked for a ``GET`` answered with a 2xx HTML response
    whose path passes ``include_paths`` / ``exclude_paths`` and whose
    visitor id is not ``None``. Tracking problems are logged, never raised
    into the response.

    It is both sync and async capable: under ASGI, in a chain of async
    capable middleware, async views run without a hop to a thread.

    Args:
        get_response: The next middleware or view (Django's middleware protocol).

    Raises:
        ConfigurationError: ``settings.PRODUL`` is invalid (at startup).
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            # Django then calls (and awaits) this instance as a coroutine function.
            markcoroutinefunction(self)
        _load()

    def __call__(self, request: HttpRequest) -> Any:
        """Handle one request (returns an awaitable in async mode)."""
        if self.async_mode:
            return self.__acall__(request)
        client, options = _load()
        info = _request_info(request, options)
        token = _current.set(info)
        try:
            response = self.get_response(request)
        finally:
            _current.reset(token)
        if _wants_pageview(options, request, response, info):
            track_pageview_safely(client, info)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        """Handle one request under ASGI, without leaving the event loop."""
        client, options = _load()
        info = _request_info(request, options)
        token = _current.set(info)
        try:
            response: HttpResponseBase = await self.get_response(request)
        finally:
            _current.reset(token)
        if _wants_pageview(options, request, response, info):
            if options.visitor_id is None:
                # The default visitor reads request.user, which may query
                # the database: load it the async way first, then look again.
                await _load_user(request)
                info.forget_visitor()
            track_pageview_safely(client, info)
        return response


def _wants_pageview(
    options: IntegrationOptions, request: HttpRequest, response: HttpResponseBase, info: RequestInfo
) -> bool:
    return info.path is not None and options.wants_pageview(
        request.method or "", response.status_code, response.get("Content-Type", ""), info.path
    )


async def _load_user(request: HttpRequest) -> None:
    auser = getattr(request, "auser", None)  # Django 5+, AuthenticationMiddleware
    if auser is None:
        return
    try:
        await auser()
    except Exception:
        log.exception("produl_server: could not load the user of the request")
