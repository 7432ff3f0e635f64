"""Dramatiq actors that track events (a real ``dramatiq`` worker runs them in the tests)."""

import json
import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from produl_server import Produl
from produl_server.integrations.dramatiq import connect

dramatiq.set_broker(RedisBroker(url=os.environ["DEMO_REDIS_URL"]))

# One client per worker process, made when the process imports this module;
# PRODUL_SERVER_KEY from the environment. (The tests tune it through DEMO_PRODUL_OPTIONS.)
produl = Produl(**json.loads(os.environ.get("DEMO_PRODUL_OPTIONS", "{}")))
if os.environ.get("DEMO_CONNECT", "1") == "1":
    connect(produl, flush_after_job=os.environ.get("DEMO_FLUSH_AFTER_JOB") == "1")


@dramatiq.actor(queue_name="signups", max_retries=0)
def record_signup(number):
    produl.track_event("signup", {"number": number, "pid": os.getpid()}, visitor_id=f"u{number}")
    print(f"tracked {number}", flush=True)
