"""A Flask app with the Produl extension (served by gunicorn in the tests)."""

import os

from flask import Flask

from produl_server.integrations.flask import ProdulFlask

app = Flask(__name__)
app.config["PRODUL_PAGEVIEWS"] = True
app.config["PRODUL_EXCLUDE_PATHS"] = [r"/healthz$"]
# Who the visitor is: here a header set by an upstream auth proxy.
app.config["PRODUL_VISITOR_ID"] = lambda request: request.headers.get("X-Customer")
# The browser tracker's session, which this site's pages copy into a cookie
# of the site's own choosing (the name is the site's, not Produl's).
app.config["PRODUL_SESSION_KEY"] = lambda request: request.cookies.get("demo_session")
# PRODUL_SERVER_KEY / PRODUL_API_URL come from the environment; any other
# option can too, e.g. FLASK_PRODUL_FLUSH_AT=50 sets PRODUL_FLUSH_AT.
app.config.from_prefixed_env()

produl = ProdulFlask(app)


@app.get("/items/<int:number>")
def item(number):
    produl.track_event("item_viewed", {"number": number, "pid": os.getpid()})
    return f"<h1>Item {number}</h1>"


@app.get("/healthz")
def healthz():
    return "ok", {"Content-Type": "text/plain"}
