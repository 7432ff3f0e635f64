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
be a dotted path. The default visitor id is the signed-in user's primary
key; anonymous requests get no pageview and no visitor id.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.core.signals import setting_changed
from django.http import HttpRequest, HttpResponseBase
from django.utils.module_loading import import_string

from ..exceptions import ConfigurationError
from . import (
    ContextualProdul,
    IntegrationOptions,
    RequestInfo,
    _current,
    build_client,
    quote_path,
    split_options,
)
from .wsgi import track_pageview_safely

__all__ = ["ProdulMiddleware", "default_visitor_id", "get_client"]

_lock = threading.Lock()
_state: tuple[ContextualProdul, IntegrationOptions] | None = None


def default_visitor_id(request: HttpRequest) -> object:
    """The signed-in user's primary key, or ``None`` for anonymous requests.

    Args:
        request: The request.

    Returns:
        ``request.user.pk`` when the user is authenticated, else ``None``.
    """
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return user.pk
    return None


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


def _request_info(request: HttpRequest, options: IntegrationOptions) -> RequestInfo:
    path = quote_path(request.path)
    try:
        url: str | None = f"{request.scheme}://{request.get_host()}{path}"
    except DisallowedHost:
        url = None
    query = request.META.get("QUERY_STRING")
    if url is not None and options.include_query and query:
        url += "?" + query
    chooser = options.visitor_id or default_visitor_id
    return RequestInfo(
        path=path,
        url=url,
        referrer=request.headers.get("Referer"),
        visitor=lambda: chooser(request),
    )


class ProdulMiddleware:
    """Request context for events in views, and optional server-side pageviews.

    A pageview is tracked for a ``GET`` answered with a 2xx HTML response
    whose path passes ``include_paths`` / ``exclude_paths`` and whose
    visitor id is not ``None``. Tracking problems are logged, never raised
    into the response.

    Args:
        get_response: The next middleware or view (Django's middleware protocol).

    Raises:
        ConfigurationError: ``settings.PRODUL`` is invalid (at startup).
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        _load()

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        """Handle one request."""
        client, options = _load()
        info = _request_info(request, options)
        token = _current.set(info)
        try:
            response = self.get_response(request)
        finally:
            _current.reset(token)
        if info.path is not None and options.wants_pageview(
            request.method or "", response.status_code, response.get("Content-Type", ""), info.path
        ):
            track_pageview_safely(client, info)
        return response
