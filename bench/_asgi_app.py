"""The FastAPI app P7 serves under uvicorn, with or without Produl.

``BENCH_TRACK=1`` adds the ASGI middleware and makes every request track one
event through the request context; ``BENCH_COLLECTOR`` and ``BENCH_KEY`` say
where to. ``BENCH_TRACK=floor`` adds instead a pure-ASGI middleware that only
passes the request's path and visitor on, and the endpoint does ``json.dumps``
of the same event and ``Queue.put``: the cheapest design with the same
shape. ``/_stats`` reports the client's counters.
"""

from __future__ import annotations

import contextvars
import json
import os
import queue
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


_floor_queue: queue.Queue[bytes] | None = None
_floor_request: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("floor")


class _FloorMiddleware:
    """A pure-ASGI middleware that does nothing but hand the path and visitor on."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            _floor_request.set((path, path.rsplit("/", 1)[-1]))
        await self.app(scope, receive, send)


if os.environ.get("BENCH_TRACK") == "floor":
    _floor_queue = queue.Queue()
    app.add_middleware(_FloorMiddleware)


def _floor() -> None:
    """P1's floor for the same event: encode it, queue it; no validation, no sender."""
    assert _floor_queue is not None
    path, visitor = _floor_request.get()
    event = {
        "t": "ev",
        "n": "invoice_paid",
        "p": path,
        "u": f"http://127.0.0.1{path}",
        "vi": visitor,
        "pr": {"amount_cents": 4200, "currency": "EUR", "plan": "pro"},
    }
    _floor_queue.put_nowait(json.dumps(event, separators=(",", ":")).encode())


@app.get("/invoice/{invoice_id}")
async def invoice(invoice_id: int) -> dict[str, Any]:
    """A small JSON answer; tracks one event (path, url, visitor from the request)."""
    if _floor_queue is not None:
        _floor()
    elif produl is not None:
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
