"""A serverless (AWS Lambda style) handler that flushes before it returns."""

from produl_server import Produl
from produl_server.integrations.serverless import flush_after

# Made once per process ("cold start"); PRODUL_SERVER_KEY from the environment.
produl = Produl()


@flush_after(produl, timeout=2.0)
def handler(event, context):
    for step in range(event["steps"]):
        produl.track_event(
            "order_step",
            {"invocation": event["invocation"], "step": step},
            visitor_id=event["customer"],
        )
    return {"statusCode": 204}
