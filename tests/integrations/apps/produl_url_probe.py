"""One request with a non-ASCII path and a non-ASCII, percent-encoded query.

Every integration must turn it into the same ``p``, ``u`` and ``r``
(``tests/integrations/test_request_info.py``). Run as a script, it sends it
through Django's WSGI and ASGI handlers (the demo project, with
``include_query``) and flushes.
"""

import asyncio
import os

PATH = "/echo/caf\u00e9"
# Escapes stay as they are; the raw UTF-8 bytes of "ü" get escaped.
QUERY = b"q=cr%C3%A8me+br%C3%BBl%C3%A9e&w=\xc3\xbc&e=a%20b"
REFERER = "https://ref.example/caf\u00e9".encode()
HOST = "localhost"  # allowed by the Django demo
VISITOR = "7"
# The site's own header for the browser tracker's session (item 5 of #20),
# and a language list whose first tag every integration must send as ``l``.
SESSION = "s-42"
ACCEPT_LANGUAGE = "fr-CH, fr;q=0.9, en;q=0.8"
EXPECTED_LANGUAGE = "fr-CH"

EXPECTED_PATH = "/echo/caf%C3%A9"
EXPECTED_URL = "http://localhost/echo/caf%C3%A9?q=cr%C3%A8me+br%C3%BBl%C3%A9e&w=%C3%BC&e=a%20b"
EXPECTED_REFERRER = "https://ref.example/caf\u00e9"


def environ():
    """The request as a WSGI server hands it over: bytes decoded as latin-1."""
    import io
    import sys

    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": PATH.encode().decode("latin-1"),
        "QUERY_STRING": QUERY.decode("latin-1"),
        "SERVER_NAME": HOST,
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": HOST,
        "HTTP_REFERER": REFERER.decode("latin-1"),
        "HTTP_X_CUSTOMER": VISITOR,
        "HTTP_X_DEMO_USER": VISITOR,
        "HTTP_X_SITE_SESSION": SESSION,
        "HTTP_ACCEPT_LANGUAGE": ACCEPT_LANGUAGE,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def scope():
    """The request as an ASGI server hands it over."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "root_path": "",
        "query_string": QUERY,
        "headers": [
            (b"host", HOST.encode()),
            (b"referer", REFERER),
            (b"x-customer", VISITOR.encode()),
            (b"x-demo-user", VISITOR.encode()),
            (b"x-site-session", SESSION.encode()),
            (b"accept-language", ACCEPT_LANGUAGE.encode()),
        ],
        "server": (HOST, 80),
        "client": ("127.0.0.1", 50000),
    }


def call_wsgi(app):
    """Send the request through a WSGI app; return the status line."""
    seen = []
    body = app(environ(), lambda status, headers, exc_info=None: seen.append(status))
    try:
        b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return seen[0]


async def call_asgi(app):
    """Send the request through an ASGI app; return the status code."""
    requested = False
    sent = []
    forever = asyncio.Event()

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await forever.wait()  # no disconnect
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope(), receive, send)
    return sent[0]["status"]


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "produl_django_demo.settings")
    from django.core.asgi import get_asgi_application
    from django.core.wsgi import get_wsgi_application

    from produl_server.integrations.django import get_client

    print("wsgi", call_wsgi(get_wsgi_application()), flush=True)
    print("asgi", asyncio.run(call_asgi(get_asgi_application())), flush=True)
    print("flushed", get_client().flush(10), flush=True)


if __name__ == "__main__":
    main()
