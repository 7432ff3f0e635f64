"""The Flask app P6 serves under gunicorn, with or without one event per request.

``BENCH_TRACK=1`` makes every request track one event; ``BENCH_COLLECTOR``
and ``BENCH_KEY`` say where to. ``BENCH_TRACK=floor`` does instead what P1
calls its floor, ``json.dumps`` of the same event and ``Queue.put``, so that
``bench/p6_floor.py`` can measure the floor inside a real request.
``/_stats`` reports the client's counters and the CPU time produl itself
used (:mod:`bench._own`).
"""

from __future__ import annotations

import json
import os
import queue
from typing import Any

from flask import Flask, jsonify

from bench import _guard
from bench._own import OwnCpu

_guard.install()
own = OwnCpu()

app = Flask(__name__)
produl: Any = None
if os.environ.get("BENCH_TRACK") == "1":
    from produl_server import Produl

    # Defaults, except a queue that holds a whole run (the pacer sends 2,000
    # a minute; a benchmark makes more) and a short exit budget.
    produl = Produl(
        server_key=os.environ["BENCH_KEY"],
        api_url=os.environ["BENCH_COLLECTOR"],
        max_queue_size=500_000,
        shutdown_timeout=1.0,
    )


_floor_queue: queue.Queue[bytes] | None = None
if os.environ.get("BENCH_TRACK") == "floor":
    _floor_queue = queue.Queue()


def _floor(invoice_id: int) -> None:
    """P1's floor for the same event: encode it, queue it; no validation, no sender."""
    assert _floor_queue is not None
    event = {
        "t": "ev",
        "n": "invoice_paid",
        "p": f"/invoice/{invoice_id}",
        "u": f"https://server/invoice/{invoice_id}",
        "vi": f"cust_{invoice_id}",
        "pr": {"amount_cents": 4200, "currency": "EUR", "plan": "pro"},
    }
    _floor_queue.put_nowait(json.dumps(event, separators=(",", ":")).encode())


@app.get("/invoice/<int:invoice_id>")
def invoice(invoice_id: int) -> Any:
    """A small JSON answer, like an API endpoint; tracks one event when enabled."""
    data = {"id": invoice_id, "amount_cents": 4200, "currency": "EUR", "status": "paid"}
    if _floor_queue is not None:
        own.timed(_floor, invoice_id)
    elif produl is not None:
        own.timed(
            produl.track_event,
            "invoice_paid",
            {"amount_cents": 4200, "currency": "EUR", "plan": "pro"},
            visitor_id=f"cust_{invoice_id}",
            path=f"/invoice/{invoice_id}",
        )
    return jsonify(data)


@app.get("/_stats")
def stats() -> Any:
    """The client's counters (none when not tracking), and produl's own CPU so far."""
    if produl is None:
        return jsonify(own.figures())
    counters = produl.stats
    return jsonify(
        {
            "queued": counters.queued,
            "sent": counters.sent,
            "dropped": counters.dropped_total,
            "pending": counters.pending,
            **own.figures(),
        }
    )
