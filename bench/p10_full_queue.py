"""P10, the full-queue path: what a ``track_event`` call costs once the queue is full.

During an outage the queue fills within seconds, and from then on every
call is refused (counted, and dropped or spooled). That path runs on the
request handler's thread as often as the happy one does, so it must cost no
more than an accepted call, never stall, and hold no memory per refusal.

A fresh interpreter builds a client (``max_queue_size`` events) against a
collector that never answers, times each of the calls that fill the queue
(accepted), then each of ``calls`` more (refused), and reads RSS before and
after the refused ones. No ``on_error`` hook and no spool: the bare path.
The ``produl_server`` logger is silenced, as the throttled warning would
otherwise be the only output.

Floor, in the same child: ``json.dumps`` of the same event and
``Queue.put_nowait`` on a full ``queue.Queue`` (which raises ``Full``), the
cheapest refusal a queue-based SDK can make.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import time
from typing import Any

from bench import _guard, _proc
from bench._collector import CollectorProcess
from bench._report import Line, Result, Sizes
from bench._stats import Summary, ratio
from bench.p4_memory import _rss_bytes


def child(url: str, key: str, queue_size: int, calls: int) -> dict[str, Any]:
    """Fill the queue, then time *calls* refused calls and the floor's."""
    _guard.install()
    from produl_server import Produl

    logging.getLogger("produl_server").disabled = True
    produl = Produl(
        server_key=key,
        api_url=url,
        max_queue_size=queue_size,
        request_timeout=600.0,
        max_requests_per_minute=None,
    )
    visitors = [f"cust_{i:07d}" for i in range(queue_size + calls)]
    clock = time.perf_counter
    track = produl.track_event

    started = clock()
    for visitor in visitors[:queue_size]:
        track("invoice_paid", {"amount_cents": 4900}, visitor_id=visitor)
    accepted = (clock() - started) / queue_size

    rss = _rss_bytes()
    slowest = 0.0
    started = clock()
    for visitor in visitors[queue_size:]:
        began = clock()
        track("invoice_paid", {"amount_cents": 4900}, visitor_id=visitor)
        slowest = max(slowest, clock() - began)
    refused = (clock() - started) / calls
    rss_growth = _rss_bytes() - rss

    full: queue.Queue[bytes] = queue.Queue(1)
    full.put_nowait(b"")
    dumps = json.dumps
    floor_slowest = 0.0
    started = clock()
    for visitor in visitors[queue_size:]:
        began = clock()
        body = dumps(
            {"t": "ev", "n": "invoice_paid", "vi": visitor, "pr": {"amount_cents": 4900}}
        ).encode()
        with contextlib.suppress(queue.Full):
            full.put_nowait(body)
        floor_slowest = max(floor_slowest, clock() - began)
    floor = (clock() - started) / calls

    stats = produl.stats
    result = {
        "accepted_s": accepted,
        "refused_s": refused,
        "floor_s": floor,
        "slowest_s": slowest,
        "floor_slowest_s": floor_slowest,
        "rss_growth": rss_growth,
        # The sender holds a few events out of the queue, so a few more calls
        # than max_queue_size are accepted: each call is pending or counted.
        "refused_counted": stats.dropped.get("queue_full", 0) + stats.pending,
        "refused_by_guard": len(_guard.refused),
    }
    return result  # _proc.emit leaves at once: the hung collector must not hold the exit


def measure(sizes: Sizes) -> list[dict[str, Any]]:
    """Fresh children, one after another, against one hung collector."""
    args = {"queue_size": sizes.p10_queue, "calls": sizes.p10_calls}
    with CollectorProcess(rate_limit=None) as collector:
        collector.command("hang")
        args.update(url=collector.url, key=collector.key)
        runs = [
            _proc.run_child("p10_full_queue", "child", args, timeout=120)
            for _ in range(sizes.p10_repeats)
        ]
        collector.command("release")
    return runs


def run(sizes: Sizes) -> Result:
    """P10 as table rows."""
    runs = measure(sizes)
    refused = Summary.of([r["refused_s"] * 1e6 for r in runs])
    accepted = Summary.of([r["accepted_s"] * 1e6 for r in runs])
    floor = Summary.of([r["floor_s"] * 1e6 for r in runs])
    slowest = Summary.of([r["slowest_s"] * 1e3 for r in runs])
    # The same calls of the floor in the same child: the slowest of 200,000
    # calls is mostly the machine (a preempted process, the GIL's 5 ms
    # switch interval when another thread wants it), whatever the call does.
    floor_slowest = Summary.of([r.get("floor_slowest_s", 0.0) * 1e3 for r in runs])
    rss = Summary.of([r["rss_growth"] / 1e6 for r in runs])
    counted = all(r["refused_counted"] == sizes.p10_queue + sizes.p10_calls for r in runs)
    to_accepted = ratio(refused.median, accepted.median)
    lines = [
        Line(
            "P10",
            f"refused call, queue full ({sizes.p10_calls:,} calls)",
            refused.show("µs"),
            f"json+put on a full queue {floor.show('µs')}",
            "",
            f"{to_accepted:.2f}x accepted ({accepted.show('µs')}); "
            f"{ratio(refused.median, floor.median):.2f}x floor",
            "≤ 1.0x an accepted call",
            to_accepted <= 1.0 and counted,
        ),
        Line(
            "P10",
            "slowest refused call",
            slowest.show("ms"),
            f"slowest json+put on a full queue {floor_slowest.show('ms')}",
            "",
            f"{ratio(slowest.median, floor_slowest.median):.2f}x floor",
            "≤ 1 ms",
            slowest.median <= 1.0,
        ),
        Line(
            "P10",
            "RSS growth over the refused calls",
            rss.show("MB"),
            "",
            "",
            "",
            "≤ 1 MB (the queue's own bound is reached before)",
            rss.median <= 1.0,
        ),
    ]
    notes = [
        (__doc__ or "").split("\n\n", 1)[1].strip(),
        f"{sizes.p10_repeats} runs, a queue of {sizes.p10_queue:,} events. Every refused "
        f"call was counted as dropped (queue_full): {'yes' if counted else '**no**'}.",
    ]
    return Result("P10", "the full-queue path", lines, notes, {"runs": runs})
