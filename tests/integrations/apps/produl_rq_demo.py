"""RQ jobs that track events (run by a real ``rq worker`` against a real Redis in the tests)."""

import json
import os

from produl_server import Produl
from produl_server.integrations.rq import connect

# One client per process, made at import; PRODUL_SERVER_KEY from the environment.
# (The tests tune the client through DEMO_PRODUL_OPTIONS.)
produl = Produl(**json.loads(os.environ.get("DEMO_PRODUL_OPTIONS", "{}")))
if os.environ.get("DEMO_CONNECT", "1") == "1":
    connect(produl, flush_after_job=os.environ.get("DEMO_FLUSH_AFTER_JOB") == "1")


def record_signup(number):
    produl.track_event("signup", {"number": number, "pid": os.getpid()}, visitor_id=f"u{number}")


def work(redis_url, kind):
    """Run a worker, as RQ's docs suggest for preloading: the client is made
    and connect() called in the worker before it forks its first horse."""
    from redis import Redis
    from rq.worker import SimpleWorker, Worker

    worker_class = SimpleWorker if kind == "simple" else Worker
    worker_class(["default"], connection=Redis.from_url(redis_url)).work()
