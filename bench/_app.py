"""The Flask app P6 serves under gunicorn, with or without one event per request.

``BENCH_TRACK=1`` makes every request track one event; ``BENCH_COLLECTOR``
and ``BENCH_KEY`` say where to. ``/_stats`` reports the client's counters
and the CPU time produl itself used (:mod:`bench._own`).
"""

from __future__ import annotations

import os
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


@app.get("/invoice/<int:invoice_id>")
def invoice(invoice_id: int) -> Any:
    """A small JSON answer, like an API endpoint; tracks one event when enabled."""
    data = {"id": invoice_id, "amount_cents": 4200, "currency": "EUR", "status": "paid"}
    if produl is not None:
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
