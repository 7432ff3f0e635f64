"""Flask: the :class:`ProdulFlask` extension, configured from ``app.config``.

::

    from flask import Flask
    from produl_server.integrations.flask import ProdulFlask

    app = Flask(__name__)
    app.config["PRODUL_PAGEVIEWS"] = True
    produl = ProdulFlask(app)

    @app.post("/signup")
    def signup():
        produl.track_event("signup")   # path, url and visitor filled in
        ...

Every :class:`~produl_server.Produl` argument and every
:class:`~produl_server.integrations.IntegrationOptions` field is read from
the config key of the same name, upper-cased, with a ``PRODUL_`` prefix:
``PRODUL_SERVER_KEY``, ``PRODUL_API_URL``, ``PRODUL_FLUSH_AT``,
``PRODUL_PAGEVIEWS``, ``PRODUL_EXCLUDE_PATHS``, ``PRODUL_VISITOR_ID``,
``PRODUL_SESSION_KEY``, ``PRODUL_LANGUAGE`` …
``PRODUL_SERVER_KEY`` and ``PRODUL_API_URL`` fall back to the environment
variables of the same names, so ``app.config.from_prefixed_env()`` works too.

The default visitor id is Flask-Login's ``current_user.get_id()`` when
Flask-Login is installed and the user is signed in, else the
``REMOTE_USER`` the server authenticated; otherwise there is none, and no
pageview is tracked.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import flask

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

__all__ = ["ProdulFlask", "default_visitor_id", "get_client"]

log = logging.getLogger("produl_server")

_EXTENSION = "produl_server"
_PREFIX = "PRODUL_"


def default_visitor_id(request: flask.Request) -> object:
    """Flask-Login's signed-in user id, else ``REMOTE_USER``, else ``None``.

    Args:
        request: The request.

    Returns:
        The visitor id, or ``None`` when the visitor is anonymous.
    """
    # Only when the app itself uses Flask-Login: never import it here.
    login = sys.modules.get("flask_login")
    user = getattr(login, "current_user", None)
    if user is not None and getattr(user, "is_authenticated", False):
        return user.get_id()
    return request.remote_user or None


class _State:
    def __init__(self, client: ContextualProdul, options: IntegrationOptions) -> None:
        self.client = client
        self.options = options


def _state(app: flask.Flask | None = None) -> _State:
    target = app if app is not None else flask.current_app
    try:
        state: _State = target.extensions[_EXTENSION]
    except KeyError:
        raise RuntimeError(
            "produl_server is not set up on this app: call ProdulFlask(app) or init_app(app)"
        ) from None
    return state


def get_client(app: flask.Flask | None = None) -> ContextualProdul:
    """The client of *app* (default: the current app).

    Args:
        app: A Flask app that :class:`ProdulFlask` was initialised on.

    Returns:
        Its :class:`~produl_server.integrations.ContextualProdul`.

    Raises:
        RuntimeError: The extension was not initialised on the app.
    """
    return _state(app).client


class ProdulFlask:
    """The Flask extension: one client per app, request context, pageviews.

    Args:
        app: The app to set up now; or call :meth:`init_app` later.
    """

    def __init__(self, app: flask.Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Build the app's client from its config and register the request hooks.

        Args:
            app: The Flask app.

        Raises:
            ConfigurationError: An unknown ``PRODUL_*`` key, an invalid
                value, or no server key.
        """
        raw = {
            key[len(_PREFIX) :].lower(): value
            for key, value in app.config.items()
            if key.startswith(_PREFIX)
        }
        options, integration = split_options(raw, "app.config['PRODUL_*']")
        app.extensions[_EXTENSION] = _State(build_client(options), integration)
        app.before_request(_before_request)
        app.after_request(_after_request)
        app.teardown_request(_teardown_request)

    @property
    def client(self) -> ContextualProdul:
        """The current app's client."""
        return get_client()

    def track_event(self, name: str, properties: dict[str, Any] | None = None, **kw: Any) -> None:
        """Track an event with the current app's client.

        Args:
            name: The event name.
            properties: The event properties.
            kw: The other arguments of
                :meth:`~produl_server.integrations.ContextualProdul.track_event`.
        """
        get_client().track_event(name, properties, **kw)

    def track_pageview(self, **kw: Any) -> None:
        """Track a pageview with the current app's client.

        Args:
            kw: The arguments of
                :meth:`~produl_server.integrations.ContextualProdul.track_pageview`.
        """
        get_client().track_pageview(**kw)

    def flush(self, timeout: float | None = None) -> bool:
        """Flush the current app's client; see :meth:`produl_server.Produl.flush`.

        Args:
            timeout: Seconds to wait at most.

        Returns:
            Whether everything queued was handled in time.
        """
        return get_client().flush(timeout)


def _request_info(options: IntegrationOptions) -> RequestInfo:
    request = flask.request
    chooser = options.visitor_id or default_visitor_id
    sessions = options.session_key
    return build_request_info(
        scheme=request.scheme,
        host=request.host,
        path=request.path,
        query=request.query_string,
        referrer=request.environ.get("HTTP_REFERER"),
        options=options,
        visitor=lambda: chooser(request),
        session=None if sessions is None else (lambda: sessions(request)),
        accept_language=request.environ.get("HTTP_ACCEPT_LANGUAGE"),
    )


def _before_request() -> None:
    state = _state()
    token = _current.set(_request_info(state.options))
    flask.g._produl_token = token


def _after_request(response: flask.Response) -> flask.Response:
    state = _state()
    info = _current.get()
    if (
        info is not None
        and info.path is not None
        and state.options.wants_pageview(
            flask.request.method, response.status_code, response.content_type or "", info.path
        )
    ):
        track_pageview_safely(state.client, info)
    return response


def _teardown_request(_exc: BaseException | None) -> None:
    token = flask.g.pop("_produl_token", None)
    if token is None:
        return
    try:
        _current.reset(token)
    except ValueError:
        # Set in another context (an async view run elsewhere): clear instead.
        _current.set(None)
