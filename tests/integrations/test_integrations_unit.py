"""In-process tests: option parsing, context filling, pageview rules, the uWSGI fallback."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from produl_server import ConfigurationError
from produl_server.integrations import (
    ContextualProdul,
    RequestInfo,
    build_client,
    current_request,
    first_language,
    request_context,
    split_options,
)
from produl_server.integrations.wsgi import ProdulMiddleware, uwsgi_threads_enabled

flask = pytest.importorskip("flask")
from produl_server.integrations.flask import ProdulFlask  # noqa: E402


@pytest.fixture
def contextual(produl_collector):
    client = ContextualProdul(
        server_key=produl_collector.server_key, api_url=produl_collector.url, flush_at=1
    )
    yield client
    client.shutdown(5)


def test_unknown_and_invalid_options_fail_at_startup():
    with pytest.raises(ConfigurationError, match=r"unknown option\(s\) \['flush_ta'\]"):
        split_options({"flush_ta": 3}, "settings.PRODUL")
    with pytest.raises(ConfigurationError, match="not a regular expression"):
        split_options({"exclude_paths": ["("]}, "settings.PRODUL")
    with pytest.raises(ConfigurationError, match="pageviews must be True or False"):
        split_options({"pageviews": "yes"}, "settings.PRODUL")
    with pytest.raises(ConfigurationError, match="visitor_id must be callable"):
        split_options({"visitor_id": 3}, "settings.PRODUL")
    client, options = split_options({"flush_at": 3, "pageviews": True}, "x")
    assert client == {"flush_at": 3}
    assert options.pageviews


def test_pageview_rules():
    _, options = split_options(
        {"pageviews": True, "include_paths": [r"/docs/"], "exclude_paths": [r"/docs/private"]}, "x"
    )
    assert options.wants_pageview("GET", 200, "text/html; charset=utf-8", "/docs/a")
    assert not options.wants_pageview("GET", 200, "text/html", "/blog/a")
    assert not options.wants_pageview("GET", 200, "text/html", "/docs/private/a")
    assert not options.wants_pageview("POST", 200, "text/html", "/docs/a")
    assert not options.wants_pageview("GET", 404, "text/html", "/docs/a")
    assert not options.wants_pageview("GET", 200, "application/json", "/docs/a")


def test_context_fills_what_the_caller_left_out(contextual, produl_collector):
    info = RequestInfo(
        path="/cart",
        url="https://shop.example/cart",
        referrer="https://ref.example/",
        visitor=lambda: 42,
    )
    assert current_request() is None
    with request_context(info):
        assert current_request() is info
        contextual.track_event("filled")
        contextual.track_event("own_path", path="/checkout")
        contextual.track_event("own_all", path="/x", url="https://other.example/x", visitor_id="me")
        contextual.track_pageview()
    assert current_request() is None
    contextual.track_event("outside", visitor_id="v")
    assert contextual.flush(5)
    filled, own_path, own_all, pageview, outside = produl_collector.events
    assert filled == {
        "t": "ev",
        "n": "filled",
        "p": "/cart",
        "u": "https://shop.example/cart",
        "vi": "42",
    }
    assert own_path["u"] == "https://shop.example/checkout"
    assert (own_all["u"], own_all["vi"]) == ("https://other.example/x", "me")
    assert pageview == {
        "t": "pv",
        "p": "/cart",
        "u": "https://shop.example/cart",
        "vi": "42",
        "r": "https://ref.example/",
    }
    assert outside == {"t": "ev", "n": "outside", "vi": "v"}


def test_a_failing_visitor_function_never_breaks_the_request(caplog):
    def broken():
        raise RuntimeError("database down")

    info = RequestInfo(path="/" + "a" * 3000, url="https://x/", visitor=broken)
    assert info.path is None  # too long for the collector: not filled in
    assert info.visitor_id is None
    assert "visitor_id function failed" in caplog.text


def test_uwsgi_without_threads_falls_back_to_sync_mode(monkeypatch, produl_collector, caplog):
    # uWSGI >= 2.0.31 always has threads, so the old behaviour is simulated
    # here with the one attribute the detection reads.
    assert uwsgi_threads_enabled() is None
    monkeypatch.setitem(sys.modules, "uwsgi", types.SimpleNamespace(has_threads=0, opt={}))
    assert uwsgi_threads_enabled() is False
    caplog.set_level(logging.WARNING, "produl_server")
    options = {"server_key": produl_collector.server_key, "api_url": produl_collector.url}
    client = build_client(options)
    try:
        assert client.config.sync_mode
        assert "--enable-threads" in caplog.text
        client.track_event("sent_before_returning", visitor_id="v")
        assert len(produl_collector.events) == 1
        assert not build_client(options | {"sync_mode": False}).config.sync_mode
    finally:
        client.shutdown(5)
    monkeypatch.setitem(sys.modules, "uwsgi", types.SimpleNamespace(has_threads=1))
    assert uwsgi_threads_enabled() is True


def make_flask_app(collector, **config):
    app = flask.Flask("produl_unit")
    app.config.update(
        PRODUL_SERVER_KEY=collector.server_key,
        PRODUL_API_URL=collector.url,
        PRODUL_FLUSH_AT=1,
        **config,
    )
    produl = ProdulFlask(app)

    @app.route("/page/<name>", methods=["GET", "POST"])
    def page(name):
        produl.track_event("seen", {"name": name})
        return f"<p>{name}</p>"

    @app.get("/data")
    def data():
        return {"ok": True}

    return app, produl


def test_flask_extension_pageviews_and_context(produl_collector):
    app, produl = make_flask_app(
        produl_collector,
        PRODUL_PAGEVIEWS=True,
        PRODUL_EXCLUDE_PATHS=[r"/page/secret"],
        PRODUL_INCLUDE_QUERY=True,
        PRODUL_VISITOR_ID=lambda request: request.headers.get("X-Customer"),
    )
    with app.test_client() as http:
        assert http.get("/page/a?x=1", headers={"X-Customer": "c1"}).status_code == 200
        assert http.get("/page/b").status_code == 200  # anonymous: event only
        assert http.post("/page/c", headers={"X-Customer": "c1"}).status_code == 200
        assert http.get("/page/secret", headers={"X-Customer": "c1"}).status_code == 200
        assert http.get("/data", headers={"X-Customer": "c1"}).status_code == 200
        assert http.get("/missing", headers={"X-Customer": "c1"}).status_code == 404
    with app.app_context():
        assert produl.flush(5)
        produl.client.shutdown(5)
    events = produl_collector.events
    pageviews = [e for e in events if e["t"] == "pv"]
    assert pageviews == [
        {"t": "pv", "p": "/page/a", "u": "http://localhost/page/a?x=1", "vi": "c1"}
    ]
    seen = {e["pr"]["name"]: e for e in events if e["t"] == "ev"}
    assert set(seen) == {"a", "b", "c", "secret"}
    assert "vi" not in seen["b"]
    assert seen["c"]["p"] == "/page/c"
    assert current_request() is None


def test_flask_config_errors_name_the_key(produl_collector):
    app = flask.Flask("produl_bad")
    app.config.update(PRODUL_SERVER_KEY=produl_collector.server_key, PRODUL_FLUSHAT=3)
    with pytest.raises(ConfigurationError, match="flushat"):
        ProdulFlask(app)


def test_wsgi_middleware_in_process(produl_collector):
    from werkzeug.test import Client

    def app(environ, start_response):
        middleware.client.track_event("body")
        start_response("200 OK", [("Content-Type", "text/html")])
        yield b"<p>streamed</p>"
        middleware.client.track_event("while_streaming")

    middleware = ProdulMiddleware(
        app,
        server_key=produl_collector.server_key,
        api_url=produl_collector.url,
        flush_at=1,
        pageviews=True,
    )
    try:
        client = Client(middleware)
        response = client.get("/caf\u00e9", environ_overrides={"REMOTE_USER": "alice"})
        assert response.status_code == 200
        assert response.get_data() == b"<p>streamed</p>"
        response.close()
        assert middleware.client.flush(5)
    finally:
        middleware.client.shutdown(5)
    events = produl_collector.events
    assert [e.get("n", "pv") for e in events] == ["body", "while_streaming", "pv"]
    assert {e["p"] for e in events} == {"/caf%C3%A9"}
    assert {e["vi"] for e in events} == {"alice"}


def test_produl_enabled_0_turns_the_flask_extension_off_without_a_key(
    monkeypatch, produl_collector
):
    monkeypatch.delenv("PRODUL_SERVER_KEY", raising=False)
    monkeypatch.setenv("PRODUL_ENABLED", "0")
    app = flask.Flask("produl_off")
    app.config["PRODUL_PAGEVIEWS"] = True
    app.config["PRODUL_API_URL"] = produl_collector.url
    produl = ProdulFlask(app)

    @app.get("/page")
    def page():
        produl.track_event("seen", visitor_id="u1")
        return "ok"

    assert app.test_client().get("/page").status_code == 200
    with app.app_context():
        assert produl.client.config.enabled is False
        assert produl.client.flush(timeout=5)
    assert produl_collector.requests == []


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("fr-CH, fr;q=0.9, en;q=0.8", "fr-CH"),
        ("en-US;q=0.8,de", "en-US"),
        ("  de  ", "de"),
        (b"pt-BR,pt", "pt-BR"),
        ("*", None),
        ("*, en;q=0.5", None),  # the first tag is not a language: none is sent
        ("en_US", None),
        ("<script>", None),
        ("a" * 40, None),
        ("", None),
        (None, None),
    ],
)
def test_first_language_of_accept_language(header, expected):
    assert first_language(header) == expected


def test_session_and_language_options_fail_at_startup():
    with pytest.raises(ConfigurationError, match="session_key must be callable"):
        split_options({"session_key": "not.resolved"}, "x", lambda path: 3)
    with pytest.raises(ConfigurationError, match="session_key must be a callable"):
        split_options({"session_key": "a.b"}, "x")
    with pytest.raises(ConfigurationError, match="language must be True or False"):
        split_options({"language": "no"}, "x")
    _, options = split_options({}, "x")
    assert options.language is True
    assert options.session_key is None


def test_context_fills_session_key_and_language(contextual, produl_collector):
    info = RequestInfo(
        path="/cart",
        url="https://shop.example/cart",
        visitor=lambda: 7,
        session=lambda: "s-1",
        language="de-AT",
    )
    with request_context(info):
        contextual.track_event("filled")
        contextual.track_event("own", session_key="mine")
        contextual.track_pageview()
        contextual.track_pageview(language="it", session_key="mine")
    assert contextual.flush(5)
    filled, own, pageview, own_pageview = produl_collector.events
    assert filled["sk"] == "s-1"
    assert "l" not in filled
    assert own["sk"] == "mine"
    assert (pageview["sk"], pageview["l"]) == ("s-1", "de-AT")
    assert (own_pageview["sk"], own_pageview["l"]) == ("mine", "it")


def test_a_failing_session_function_never_breaks_the_request(caplog):
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("cache down")

    info = RequestInfo(path="/a", url="https://x/a", session=broken)
    assert info.session_key is None
    assert info.session_key is None
    assert calls == [1]  # computed once per request
    assert "session_key function failed" in caplog.text
    assert RequestInfo(path="/a", url=None, session=lambda: True).session_key is None
    assert RequestInfo(path="/a", url=None, session=lambda: "s" * 300).session_key is None
    assert RequestInfo(path="/a", url=None, language="no such tag").language is None


def wsgi_html(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/html")])
    return [b"<p>hi</p>"]


def run_wsgi(app, **headers):
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/hello",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        **headers,
    }
    body = app(environ, lambda status, headers, exc_info=None: None)
    b"".join(body)
    body.close()


@pytest.mark.parametrize("language", [True, False])
def test_wsgi_pageview_language_can_be_turned_off(contextual, produl_collector, language):
    middleware = ProdulMiddleware(
        wsgi_html,
        contextual,
        pageviews=True,
        language=language,
        visitor_id=lambda environ: "v",
        session_key=lambda environ: environ.get("HTTP_X_SITE_SESSION"),
    )
    run_wsgi(middleware, HTTP_ACCEPT_LANGUAGE="nl-BE,nl", HTTP_X_SITE_SESSION="s-9")
    assert contextual.flush(5)
    (pageview,) = produl_collector.events
    assert pageview["sk"] == "s-9"
    assert pageview.get("l") == ("nl-BE" if language else None)


def test_flask_language_off_and_session_from_config(produl_collector):
    app = flask.Flask("produl_language_off")
    app.config.update(
        PRODUL_SERVER_KEY=produl_collector.server_key,
        PRODUL_API_URL=produl_collector.url,
        PRODUL_PAGEVIEWS=True,
        PRODUL_LANGUAGE=False,
        PRODUL_VISITOR_ID=lambda request: "v",
        PRODUL_SESSION_KEY=lambda request: request.cookies.get("site_sk"),
    )
    ProdulFlask(app)

    @app.get("/")
    def index():
        return "<p>hi</p>"

    test_client = app.test_client()
    test_client.set_cookie("site_sk", "s-3")
    assert test_client.get("/", headers={"Accept-Language": "en"}).status_code == 200
    client = app.extensions["produl_server"].client
    assert client.flush(5)
    client.shutdown(5)
    (pageview,) = produl_collector.events
    assert pageview["sk"] == "s-3"
    assert "l" not in pageview
