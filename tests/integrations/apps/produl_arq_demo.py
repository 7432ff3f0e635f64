"""arq jobs that track events (run by a real ``arq`` worker against a real Redis in the tests)."""

import json
import os

from arq.connections import RedisSettings

from produl_server import Produl
from produl_server.integrations.arq import connect

# One client, made and connected where WorkerSettings is, before the worker;
# PRODUL_SERVER_KEY from the environment. (The tests tune it through DEMO_PRODUL_OPTIONS.)
produl = Produl(**json.loads(os.environ.get("DEMO_PRODUL_OPTIONS", "{}")))
if os.environ.get("DEMO_CONNECT", "1") == "1":
    connect(produl, flush_after_job=os.environ.get("DEMO_FLUSH_AFTER_JOB") == "1")


async def record_signup(ctx, number):
    produl.track_event("signup", {"number": number, "pid": os.getpid()}, visitor_id=f"u{number}")
    print(f"tracked {number}", flush=True)


class WorkerSettings:
    functions = [record_signup]
    queue_name = "signups"
    redis_settings = RedisSettings.from_dsn(os.environ["DEMO_REDIS_URL"])
