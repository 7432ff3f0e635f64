"""A Celery app whose tasks track events (run with a real Redis broker in the tests)."""

import json
import os

from celery import Celery

from produl_server import Produl
from produl_server.integrations.celery import connect

app = Celery("produl_celery_demo", broker=os.environ["DEMO_BROKER_URL"])

# One client per process, made at import; PRODUL_SERVER_KEY from the environment.
# (The tests tune the client through DEMO_PRODUL_OPTIONS.)
produl = Produl(**json.loads(os.environ.get("DEMO_PRODUL_OPTIONS", "{}")))
if os.environ.get("DEMO_CONNECT", "1") == "1":
    # Flush when a pool process or the worker stops (and, if asked, after each task).
    connect(produl, flush_after_task=os.environ.get("DEMO_FLUSH_AFTER_TASK") == "1")


@app.task
def record_signup(number):
    produl.track_event("signup", {"number": number, "pid": os.getpid()}, visitor_id=f"u{number}")
