"""One request-info builder: the same URL gives the same p, u, r, sk and l everywhere.

The request has a non-ASCII path and a query string with both escapes and
raw UTF-8 bytes (``produl_url_probe``); WSGI, Flask, Django (under WSGI and
under ASGI) and ASGI must all report it the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys

import produl_url_probe as probe
import pytest
from integration_support import APPS, app_env

from produl_server import Produl
from produl_server.integrations import ContextualProdul
from produl_server.integrations.asgi import ProdulMiddleware as AsgiMiddleware
from produl_server.integrations.wsgi import ProdulMiddleware as WsgiMiddleware

EXPECTED = [
    {
        "t": "ev",
        "n": "probe",
        "p": probe.EXPECTED_PATH,
        "u": probe.EXPECTED_URL,
        "vi": "7",
        "sk": probe.SESSION,
    },
    {
        "t": "pv",
        "p": probe.EXPECTED_PATH,
        "u": probe.EXPECTED_URL,
        "vi": "7",
        "sk": probe.SESSION,
        "r": probe.EXPECTED_REFERRER,
        "l": probe.EXPECTED_LANGUAGE,
    },
]


def client_for(collector) -> ContextualProdul:
    return ContextualProdul(server_key=collector.server_key, api_url=collector.url)


def delivered(collector, client) -> list[dict]:
    assert client.flush(10)
    client.shutdown(5)
    return collector.events


def test_wsgi(produl_collector):
    client = client_for(produl_collector)

    def app(environ, start_response):
        client.track_event("probe")
        start_response("200 OK", [("Content-Type", "text/html")])
        return [b"<p>probe</p>"]

    middleware = WsgiMiddleware(
        app,
        client,
        pageviews=True,
        include_query=True,
        visitor_id=lambda environ: environ["HTTP_X_CUSTOMER"],
        session_key=lambda environ: environ.get("HTTP_X_SITE_SESSION"),
    )
    assert probe.call_wsgi(middleware) == "200 OK"
    assert delivered(produl_collector, client) == EXPECTED


def test_flask(produl_collector):
    flask = pytest.importorskip("flask")
    from produl_server.integrations.flask import ProdulFlask, get_client

    app = flask.Flask("produl_probe")
    app.config.update(
        PRODUL_SERVER_KEY=produl_collector.server_key,
        PRODUL_API_URL=produl_collector.url,
        PRODUL_PAGEVIEWS=True,
        PRODUL_INCLUDE_QUERY=True,
        PRODUL_VISITOR_ID=lambda request: request.headers["X-Customer"],
        PRODUL_SESSION_KEY=lambda request: request.headers.get("X-Site-Session"),
    )
    produl = ProdulFlask(app)

    @app.get("/echo/<name>")
    def echo(name):
        produl.track_event("probe")
        return "<p>probe</p>"

    assert probe.call_wsgi(app) == "200 OK"
    assert delivered(produl_collector, get_client(app)) == EXPECTED


def test_asgi(produl_collector):
    client = client_for(produl_collector)

    async def app(scope, receive, send):
        client.track_event("probe")
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/html; charset=utf-8")],
            }
        )
        await send({"type": "http.response.body", "body": b"<p>probe</p>"})

    middleware = AsgiMiddleware(
        app,
        client,
        pageviews=True,
        include_query=True,
        visitor_id=lambda scope: dict(scope["headers"])[b"x-customer"].decode(),
        session_key=lambda scope: dict(scope["headers"])[b"x-site-session"].decode(),
    )
    assert asyncio.run(probe.call_asgi(middleware)) == 200
    assert delivered(produl_collector, client) == EXPECTED


@pytest.mark.slow
def test_django_under_wsgi_and_asgi(produl_collector):
    pytest.importorskip("django")
    # Django's settings are per process: the demo project runs in its own.
    options = '{"include_query": true, "session_key": "produl_django_demo.auth.site_session"}'
    env = app_env(produl_collector, DEMO_PRODUL_OPTIONS=options)
    done = subprocess.run(
        [sys.executable, str(APPS / "produl_url_probe.py")],
        env=env,
        cwd=str(APPS),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["wsgi", "200", "OK", "asgi", "200", "flushed", "True"]
    assert produl_collector.events == EXPECTED + EXPECTED


@pytest.mark.parametrize("name", ["track_event", "track_pageview"])
def test_contextual_client_takes_the_same_arguments(name):
    assert inspect.signature(getattr(ContextualProdul, name)) == inspect.signature(
        getattr(Produl, name)
    )


def test_contextual_client_has_the_async_methods():
    for name in ("aflush", "ashutdown"):
        method = getattr(ContextualProdul, name)
        assert inspect.iscoroutinefunction(method)
        assert method is getattr(Produl, name)
