"""Huey tasks that track events (a real ``huey_consumer`` runs them in the tests)."""

import json
import os

from huey import RedisHuey

from produl_server import Produl
from produl_server.integrations.huey import connect

huey = RedisHuey("signups", url=os.environ["DEMO_REDIS_URL"])

# One client, made where the Huey instance is; a process consumer's workers
# are forked from the consumer and inherit both. PRODUL_SERVER_KEY from the
# environment. (The tests tune it through DEMO_PRODUL_OPTIONS.)
produl = Produl(**json.loads(os.environ.get("DEMO_PRODUL_OPTIONS", "{}")))
if os.environ.get("DEMO_CONNECT", "1") == "1":
    connect(produl, huey, flush_after_job=os.environ.get("DEMO_FLUSH_AFTER_JOB") == "1")


@huey.task()
def record_signup(number):
    produl.track_event("signup", {"number": number, "pid": os.getpid()}, visitor_id=f"u{number}")
    print(f"tracked {number}", flush=True)
