"""P1, caller cost: the time one ``track_event`` takes on the caller's thread.

Each subject runs in a fresh interpreter: a warm-up, then ``rounds`` rounds
of ``calls`` back-to-back calls, each timed alone with
``time.perf_counter_ns``. The sender is running and busy: the collector
answers at once and produl's pacer is off, so its thread delivers while the
caller works and competes with it for the GIL, as it would in a busy app.
Peers deliver too (to the collector's peer endpoint).

Floors, same harness: ``queue.Queue.put`` of a prebuilt wire dict, and
``json.dumps`` of it plus the put. The "timer" figure is an empty timed
call: what the measurement itself costs, included in every figure.
"""

from __future__ import annotations

import gc
import json
import queue
import time
from collections.abc import Callable
from typing import Any

from bench import _guard, _proc, _sdks
from bench._collector import CollectorProcess
from bench._report import Line, Result, Sizes
from bench._stats import Summary, percentile, ratio

FLOOR_PUT = "floor: put"
FLOOR_JSON = "floor: json+put"
TIMER = "timer"


def child(subject: str, url: str, key: str, calls: int, rounds: int) -> dict[str, Any]:
    """Time *rounds* x *calls* calls of *subject* in this process."""
    _guard.install()
    total = calls * rounds + calls
    visitors = [f"cust_{i:07d}" for i in range(total)]
    client: _sdks.Client | None = None
    track: Callable[[str], None]
    if subject in _sdks.ALL:
        options: dict[str, Any] = {}
        if subject == _sdks.PRODUL:
            options["max_requests_per_minute"] = None
        client = _sdks.make(subject, url, key, max_queue_size=total + 1000, **options)
        track = client.track
    else:
        sink: queue.Queue[Any] = queue.Queue()
        wires = {
            v: {"t": "ev", "n": _sdks.EVENT_NAME, "vi": v, "pr": _sdks.PROPERTIES} for v in visitors
        }
        put, dumps = sink.put, json.dumps
        if subject == FLOOR_PUT:

            def track(visitor_id: str) -> None:
                put(wires[visitor_id])
        elif subject == FLOOR_JSON:

            def track(visitor_id: str) -> None:
                put(dumps(wires[visitor_id]))
        else:

            def track(visitor_id: str) -> None:
                wires[visitor_id]

    clock = time.perf_counter_ns
    medians, p99s = [], []
    for round_index in range(rounds + 1):  # round 0 is the warm-up
        base = round_index * calls
        samples = [0] * calls
        for i in range(calls):
            visitor = visitors[base + i]
            started = clock()
            track(visitor)
            samples[i] = clock() - started
        if round_index:
            medians.append(percentile(samples, 0.5))
            p99s.append(percentile(samples, 0.99))
        gc.collect()
    pending = client.pending() if client is not None else 0
    return {
        "medians_ns": medians,
        "p99s_ns": p99s,
        "pending_at_end": pending,
        "refused": _guard.refused,
    }


def measure(sizes: Sizes, subjects: list[str]) -> dict[str, dict[str, Any]]:
    """Round-robin over subjects, one fresh child per subject per round.

    Interleaving spreads any drift in the machine's load over every subject
    alike, instead of charging it to whichever ran at the wrong moment.
    """
    raw: dict[str, dict[str, Any]] = {}
    order = [TIMER, FLOOR_PUT, FLOOR_JSON, *subjects]
    with CollectorProcess(rate_limit=None) as collector:
        for _ in range(sizes.p1_rounds):
            for subject in order:
                result = _proc.run_child(
                    "p1_caller",
                    "child",
                    {
                        "subject": subject,
                        "url": collector.url,
                        "key": collector.key,
                        "calls": sizes.p1_calls,
                        "rounds": 1,
                    },
                    timeout=120 + sizes.p1_calls / 500,
                )
                into = raw.setdefault(
                    subject, {"medians_ns": [], "p99s_ns": [], "pending_at_end": [], "refused": []}
                )
                into["medians_ns"] += result["medians_ns"]
                into["p99s_ns"] += result["p99s_ns"]
                into["pending_at_end"].append(result["pending_at_end"])
                into["refused"] += result["refused"]
    return raw


def run(sizes: Sizes, peers: list[str]) -> Result:
    """P1 as table rows."""
    raw = measure(sizes, [_sdks.PRODUL, *peers])
    med = {s: Summary.of(r["medians_ns"]).scaled(1e-3) for s, r in raw.items()}
    p99 = {s: Summary.of(r["p99s_ns"]).scaled(1e-3) for s, r in raw.items()}
    ours = med[_sdks.PRODUL]
    to_json = ratio(ours.median, med[FLOOR_JSON].median)
    ran = [p for p in peers if p in med]
    fastest = min(ran, key=lambda p: med[p].median) if ran else None
    to_peer = ratio(ours.median, med[fastest].median) if fastest else None
    met = to_json <= 3.0 and (to_peer is not None and to_peer <= 1 / 3)
    peers_text = ", ".join(f"{p} {med[p].show('µs')}" for p in ran) or "not installed"
    ratio_text = f"{to_json:.2f}x json+put"
    if to_peer is not None:
        ratio_text += f"; {to_peer:.3f}x {fastest}"
    lines = [
        Line(
            "P1",
            "caller cost, median per call",
            ours.show("µs"),
            f"put {med[FLOOR_PUT].show('µs')}; json+put {med[FLOOR_JSON].show('µs')}",
            peers_text,
            ratio_text,
            "≤ 3x json+put and ≤ 1/3 of the faster peer",
            met if fastest else None,
        ),
        Line(
            "P1",
            "caller cost, p99 per call",
            p99[_sdks.PRODUL].show("µs"),
            f"put {p99[FLOOR_PUT].show('µs')}; json+put {p99[FLOOR_JSON].show('µs')}",
            ", ".join(f"{p} {p99[p].show('µs')}" for p in ran) or "not installed",
            f"{ratio(p99[_sdks.PRODUL].median, p99[FLOOR_JSON].median):.2f}x json+put",
            "(reported)",
            None,
        ),
    ]
    notes = [
        (__doc__ or "").split("\n\n", 1)[1].strip(),
        f"{sizes.p1_rounds} rounds of {sizes.p1_calls:,} calls per subject, each round in "
        f"a fresh process after a warm-up of as many calls, subjects interleaved round by "
        f"round; each round gives a median and a p99, and the table shows the median of "
        f"those with their min..max. The empty timed call costs "
        f"{med[TIMER].show('µs')} (median) and is inside every figure.",
    ]
    if not fastest:
        notes.append("No peer was installed, so the peer half of the target is not judged.")
    return Result("P1", "caller cost of track_event", lines, notes, raw)
