"""The FastAPI app P7 serves under uvicorn, with or without Produl.

``BENCH_TRACK=1`` adds the ASGI middleware and makes every request track one
event through the request context; ``BENCH_COLLECTOR`` and ``BENCH_KEY`` say
where to. ``/_stats`` reports the client's counters.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI

from bench import _guard

_guard.install()

app = FastAPI()
produl: Any = None
if os.environ.get("BENCH_TRACK") == "1":
    from produl_server.integrations import ContextualProdul
    from produl_server.integrations.asgi import ProdulMiddleware

    # As in P6: defaults, a queue that holds a whole run, a short exit budget.
    produl = ContextualProdul(
        server_key=os.environ["BENCH_KEY"],
        api_url=os.environ["BENCH_COLLECTOR"],
        max_queue_size=500_000,
        shutdown_timeout=1.0,
    )
    app.add_middleware(
        ProdulMiddleware,
        client=produl,
        visitor_id=lambda scope: scope["path"].rsplit("/", 1)[-1],
    )


@app.get("/invoice/{invoice_id}")
async def invoice(invoice_id: int) -> dict[str, Any]:
    """A small JSON answer; tracks one event (path, url, visitor from the request)."""
    if produl is not None:
        produl.track_event("invoice_paid", {"amount_cents": 4200, "currency": "EUR", "plan": "pro"})
    return {"id": invoice_id, "amount_cents": 4200, "currency": "EUR", "status": "paid"}


@app.get("/_stats")
async def stats() -> dict[str, Any]:
    """The client's counters, or ``{}`` when not tracking."""
    if produl is None:
        return {}
    counters = produl.stats
    return {
        "queued": counters.queued,
        "sent": counters.sent,
        "dropped": counters.dropped_total,
        "pending": counters.pending,
    }
