"""The ASGI middleware, driven by hand: no server, no framework."""

from __future__ import annotations

import asyncio
import time

import pytest

from produl_server import ConfigurationError
from produl_server.integrations import ContextualProdul, IntegrationOptions, current_request
from produl_server.integrations.asgi import ProdulLifespan, ProdulMiddleware, scope_info


class Recorder(ContextualProdul):
    """A client that also notes, in a shared log, when it was asked to track."""

    log: list

    def track_pageview(self, *args, **kwargs):
        self.log.append(("pageview", kwargs.get("path")))
        super().track_pageview(*args, **kwargs)


@pytest.fixture
def client(produl_collector):
    made = Recorder(server_key=produl_collector.server_key, api_url=produl_collector.url)
    made.log = []
    yield made
    made.shutdown(5)


def http_scope(path="/page", method="GET", query=b"", **extra):
    scope = {
        "type": "http",
        "method": method,
        "scheme": "http",
        "path": path,
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"shop.example"), (b"x-customer", b"c1")],
        "server": ("127.0.0.1", 8000),
    }
    scope.update(extra)
    return scope


def customer(scope):
    return dict(scope["headers"]).get(b"x-customer", b"").decode() or None


async def drive(app, scope, log):
    """Run one request; note each message the server is sent."""
    sent = []
    requested = False

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b""}
        await asyncio.Event().wait()

    async def send(message):
        log.append(("send", message["type"], message.get("more_body", False)))
        sent.append(message)

    await app(scope, receive, send)
    return sent


def html_app(client, status=200, content_type=b"text/html", chunks=(b"<p>", b"</p>")):
    async def app(scope, receive, send):
        client.track_event("inside")
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type)],
            }
        )
        for n, chunk in enumerate(chunks):
            more = n < len(chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

    return app


def test_pageview_is_tracked_after_the_last_byte_left(client, produl_collector):
    middleware = ProdulMiddleware(html_app(client), client, pageviews=True, visitor_id=customer)
    asyncio.run(drive(middleware, http_scope(), client.log))
    assert client.log == [
        ("send", "http.response.start", False),
        ("send", "http.response.body", True),
        ("send", "http.response.body", False),
        ("pageview", "/page"),
    ]
    assert client.flush(5)
    inside, pageview = produl_collector.events
    assert inside == {
        "t": "ev",
        "n": "inside",
        "p": "/page",
        "u": "http://shop.example/page",
        "vi": "c1",
    }
    assert pageview == {"t": "pv", "p": "/page", "u": "http://shop.example/page", "vi": "c1"}
    assert current_request() is None


@pytest.mark.parametrize(
    ("scope", "status", "content_type"),
    [
        (http_scope(method="POST"), 200, b"text/html"),
        (http_scope(), 404, b"text/html"),
        (http_scope(), 200, b"application/json"),
        (http_scope(path="/healthz"), 200, b"text/html"),
        (http_scope(headers=[(b"host", b"shop.example")]), 200, b"text/html"),  # no visitor
    ],
)
def test_no_pageview_where_the_rules_say_none(
    client, produl_collector, scope, status, content_type
):
    app = html_app(client, status, content_type)
    middleware = ProdulMiddleware(
        app, client, pageviews=True, visitor_id=customer, exclude_paths=[r"/healthz"]
    )
    asyncio.run(drive(middleware, scope, client.log))
    assert client.flush(5)
    assert [e["t"] for e in produl_collector.events] == ["ev"]


def test_a_failing_app_after_the_start_still_gets_its_pageview(client):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("boom")

    middleware = ProdulMiddleware(app, client, pageviews=True, visitor_id=customer)
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(drive(middleware, http_scope(), client.log))
    # No content type: not HTML, so no pageview; and nothing else broke.
    assert client.log == [("send", "http.response.start", False)]
    assert current_request() is None


def test_context_follows_into_tasks_started_by_the_request(client, produl_collector):
    later = []

    async def app(scope, receive, send):
        async def background():
            await asyncio.sleep(0)
            client.track_event("from_task")

        later.append(asyncio.create_task(background()))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main():
        await drive(ProdulMiddleware(app, client, visitor_id=customer), http_scope(), [])
        assert current_request() is None
        await asyncio.gather(*later)

    asyncio.run(main())
    assert client.flush(5)
    (event,) = produl_collector.events
    assert (event["p"], event["vi"]) == ("/page", "c1")


def test_websockets_pass_through_untouched(client):
    seen = []

    async def app(scope, receive, send):
        seen.append((scope, receive, send, current_request()))

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        pass

    scope = {"type": "websocket", "path": "/ws", "headers": []}
    asyncio.run(ProdulMiddleware(app, client)(scope, receive, send))
    assert seen == [(scope, receive, send, None)]


def test_options_fail_at_startup(client):
    with pytest.raises(ConfigurationError, match="unknown option"):
        ProdulMiddleware(html_app(client), flush_ta=3)
    with pytest.raises(TypeError, match="either client= or client options"):
        ProdulMiddleware(html_app(client), client, flush_at=3)


def test_scope_info_builds_the_url_like_every_integration():
    options = IntegrationOptions()
    # No Host header: the server's address, default ports left out.
    info = scope_info(
        http_scope(headers=[], server=("10.0.0.1", 443), scheme="https"), options, None
    )
    assert info.url == "https://10.0.0.1/page"
    info = scope_info(http_scope(headers=[], server=("10.0.0.1", 8080)), options, None)
    assert info.url == "http://10.0.0.1:8080/page"
    # Nothing known about the host: no URL, the path still.
    info = scope_info(http_scope(headers=[], server=None), options, None)
    assert (info.path, info.url) == ("/page", None)
    # An old server whose path leaves out the root path.
    info = scope_info(http_scope(path="/page", root_path="/shop"), options, None)
    assert info.path == "/shop/page"
    # The query string only when asked for.
    info = scope_info(http_scope(query=b"token=secret"), options, None)
    assert info.url == "http://shop.example/page"


class Server:
    """The server's side of a lifespan, with the time each answer came."""

    def __init__(self):
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.answers: list[str] = []
        self.answered = asyncio.Event()

    async def receive(self):
        return await self.inbox.get()

    async def send(self, message):
        self.answers.append(message["type"])
        self.answered.set()

    async def step(self, message):
        self.answered.clear()
        await self.inbox.put({"type": message})
        await asyncio.wait_for(self.answered.wait(), 30)

    async def run(self, app):
        task = asyncio.create_task(app({"type": "lifespan"}, self.receive, self.send))
        await self.step("lifespan.startup")
        started = time.monotonic()
        await self.step("lifespan.shutdown")
        took = time.monotonic() - started
        await asyncio.wait_for(task, 30)
        return took


def lifespan_app(client):
    """A framework-like app: answers the lifespan, tracks in its shutdown handler."""

    async def app(scope, receive, send):
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                client.track_event("app_stopped", visitor_id="v")
                await send({"type": "lifespan.shutdown.complete"})
                return

    return app


def django_like(scope, receive, send):
    async def refuse():
        raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")

    return refuse()


@pytest.mark.parametrize("wrapper", [ProdulMiddleware, ProdulLifespan])
@pytest.mark.parametrize("speaks_lifespan", [True, False])
def test_the_lifespan_end_delivers_what_is_queued(produl_collector, wrapper, speaks_lifespan):
    client = ContextualProdul(
        server_key=produl_collector.server_key,
        api_url=produl_collector.url,
        flush_at=1000,
        flush_interval=600,
        max_delay=600,
    )
    app = lifespan_app(client) if speaks_lifespan else django_like
    client.track_event("queued", visitor_id="v")
    server = Server()
    asyncio.run(server.run(wrapper(app, client)))
    assert server.answers == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    expected = ["queued", "app_stopped"] if speaks_lifespan else ["queued"]
    # Delivered before the server heard that the shutdown was complete.
    assert [e["n"] for e in produl_collector.events] == expected
    assert client.stats.pending == 0


def test_the_lifespan_end_stays_within_the_budget_when_the_api_hangs(hung_collector):
    client = ContextualProdul(
        server_key=hung_collector.server_key,
        api_url=hung_collector.url,
        shutdown_timeout=0.5,
        flush_interval=600,
    )
    client.track_event("stuck", visitor_id="v")
    client.flush(0)  # one request hangs at the collector
    server = Server()
    took = asyncio.run(server.run(ProdulMiddleware(lifespan_app(client), client)))
    assert server.answers == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert took < 5, took  # the budget is 0.5 s; generous for a loaded machine


def test_a_failed_startup_is_left_to_the_server(client):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    server = Server()

    async def main():
        task = asyncio.create_task(
            ProdulMiddleware(app, client)({"type": "lifespan"}, server.receive, server.send)
        )
        await server.step("lifespan.startup")
        await asyncio.wait_for(task, 30)

    asyncio.run(main())
    assert server.answers == ["lifespan.startup.failed"]


def test_aflush_and_ashutdown_never_block_the_loop(hung_collector):
    client = ContextualProdul(
        server_key=hung_collector.server_key,
        api_url=hung_collector.url,
        shutdown_timeout=0.3,
        spool_dir=False,  # no spool: the event left at the end is counted lost
    )
    client.track_event("stuck", visitor_id="v")

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        beat = asyncio.create_task(ticker())
        assert await client.aflush(0.3) is False
        with pytest.raises(asyncio.TimeoutError):
            # timeout=None waits until done: cancelling the await is fine.
            await asyncio.wait_for(client.aflush(), 0.2)
        await client.ashutdown()
        beat.cancel()
        return ticks

    started = time.monotonic()
    ticks = asyncio.run(main())
    assert ticks >= 10  # the loop ran while the client waited
    assert time.monotonic() - started < 10
    assert client.stats.dropped.get("shutdown") == 1


@pytest.mark.parametrize(
    "path", ["/invoice/4242", "/caf\u00e9", "/a b", "/a%20b", "/x?y", "/~user/+;=@", "/\u00fc/%"]
)
def test_quote_path_fast_path_agrees_with_quote(path):
    import urllib.parse

    from produl_server.integrations import _PATH_SAFE, quote_path

    assert quote_path(path) == urllib.parse.quote(path, safe=_PATH_SAFE)


@pytest.mark.parametrize("language", [True, False])
def test_pageview_carries_the_session_key_and_the_language(client, produl_collector, language):
    def session(scope):
        return dict(scope["headers"]).get(b"x-site-session", b"").decode() or None

    middleware = ProdulMiddleware(
        html_app(client),
        client,
        pageviews=True,
        visitor_id=customer,
        session_key=session,
        language=language,
    )
    headers = [
        (b"host", b"shop.example"),
        (b"x-customer", b"c1"),
        (b"x-site-session", b"s-5"),
        (b"accept-language", b"es-419, es;q=0.9"),
    ]
    asyncio.run(drive(middleware, http_scope(headers=headers), client.log))
    assert client.flush(5)
    inside, pageview = produl_collector.events
    assert inside["sk"] == "s-5"
    assert "l" not in inside
    assert pageview["sk"] == "s-5"
    assert pageview.get("l") == ("es-419" if language else None)


class CountedHeaders(list):
    """A scope's header list that counts how often it is read through."""

    reads = 0

    def __iter__(self):
        type(self).reads += 1
        return super().__iter__()


def test_a_request_that_tracks_nothing_never_reads_its_headers(client, produl_collector):
    # issue #22, P7: the request info is worked out when first read, so a
    # request that tracks nothing pays for no header scan, no quoting.
    async def app(scope, receive, send):
        assert current_request() is not None
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    CountedHeaders.reads = 0
    scope = http_scope(headers=CountedHeaders([(b"host", b"shop.example")]))
    asyncio.run(drive(ProdulMiddleware(app, client), scope, []))
    assert CountedHeaders.reads == 0
    assert client.flush(5)
    assert produl_collector.events == []


def test_the_event_has_the_path_the_request_came_with_though_a_router_rewrites_it(
    client, produl_collector
):
    async def app(scope, receive, send):
        # A router that mounts a sub-application rewrites the scope it hands on.
        scope["path"], scope["root_path"] = "/items", "/api"
        client.track_event("inside")
        info = current_request()
        assert (info.referrer, info.language) == ("https://ref.example/", "fr-CH")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    headers = [
        (b"host", b"shop.example"),
        (b"x-customer", b"c1"),
        (b"referer", b"https://ref.example/"),
        (b"accept-language", b"fr-CH, fr;q=0.9"),
    ]
    scope = http_scope(path="/api/items", headers=headers)
    asyncio.run(drive(ProdulMiddleware(app, client, visitor_id=customer), scope, []))
    assert client.flush(5)
    (event,) = produl_collector.events
    assert (event["p"], event["u"], event["vi"]) == (
        "/api/items",
        "http://shop.example/api/items",
        "c1",
    )
