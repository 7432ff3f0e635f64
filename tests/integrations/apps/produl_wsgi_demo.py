"""A plain WSGI app wrapped in ProdulMiddleware (served by uWSGI in the tests)."""

import json
import os

from produl_server.integrations.wsgi import ProdulMiddleware


def hello(environ, start_response):
    if environ["PATH_INFO"] != "/healthz":
        # path, url and visitor_id are filled in from the request.
        application.client.track_event("hello", {"pid": os.getpid()})
    mode = "sync" if application.client.config.sync_mode else "thread"
    start_response("200 OK", [("Content-Type", "text/html"), ("X-Produl-Mode", mode)])
    return [b"<h1>Hello</h1>"]


application = ProdulMiddleware(
    hello,
    pageviews=True,
    exclude_paths=[r"/healthz$"],
    visitor_id=lambda environ: environ.get("HTTP_X_CUSTOMER"),
    # The tests tune the client through DEMO_PRODUL_OPTIONS.
    **json.loads(os.environ.get("DEMO_PRODUL_OPTIONS", "{}")),
)
