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

``redis_url`` both ways: two more subjects differ only in it. Both pace at
1,000,000 requests per minute, a quota that never binds but that the sender
takes from before every request: without ``redis_url`` from the host-wide
quota file (a ``quota_dir`` of the child's own, as in production), with it
from the window in a local ``redis-server`` (a round trip per request). The
two run back to back in each round, in turn first, and the ratio judged is
the median of the rounds' ratios, with its min..max.

One more subject sets a ``before_send`` hook (it looks at one property and
returns the event) and four ``default_properties``: what those options cost
a call, reported beside the plain figure.
"""

from __future__ import annotations

import contextlib
import gc
import json
import queue
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench import _guard, _proc, _redis, _sdks
from bench._collector import CollectorProcess
from bench._report import Line, Result, Sizes
from bench._stats import Summary, percentile, ratio

FLOOR_PUT = "floor: put"
FLOOR_JSON = "floor: json+put"
TIMER = "timer"
#: produl paced by the host-wide quota file: the "without redis_url" figure.
PACED = "produl, host quota"
#: The same with redis_url: the quota window in Redis.
REDIS = "produl, redis_url"
#: A pace that never binds, so the sender takes from the quota per request.
UNBOUND_RATE = 1_000_000
#: produl with a before_send hook and four default properties (issue #20).
HOOKED = "produl, before_send + default_properties"
DEFAULTS = {
    "environment": "production",
    "release": "2026.12.1",
    "service": "billing",
    "region": "eu",
}


def _redact(event: dict[str, Any]) -> dict[str, Any]:
    """A typical before_send: drop one property if present, keep the event."""
    event.get("pr", {}).pop("email", None)
    return event


def child(
    subject: str, url: str, key: str, calls: int, rounds: int, redis_url: str = ""
) -> dict[str, Any]:
    """Time *rounds* x *calls* calls of *subject* in this process."""
    _guard.install()
    total = calls * rounds + calls
    visitors = [f"cust_{i:07d}" for i in range(total)]
    client: _sdks.Client | None = None
    track: Callable[[str], None]
    scratch = contextlib.ExitStack()
    if subject in (*_sdks.ALL, PACED, REDIS, HOOKED):
        options: dict[str, Any] = {}
        if subject in (_sdks.PRODUL, HOOKED):
            options["max_requests_per_minute"] = None
        if subject == HOOKED:
            options.update(before_send=_redact, default_properties=DEFAULTS)
        elif subject == PACED:
            options["max_requests_per_minute"] = UNBOUND_RATE
            options["quota_dir"] = scratch.enter_context(
                tempfile.TemporaryDirectory(prefix="bench-p1-quota-")
            )
        elif subject == REDIS:
            options["max_requests_per_minute"] = UNBOUND_RATE
            options["redis_url"] = redis_url
        kind = _sdks.PRODUL if subject in (PACED, REDIS, HOOKED) else subject
        client = _sdks.make(kind, url, key, max_queue_size=total + 1000, **options)
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
    quota = None
    if client is not None and subject in (PACED, REDIS):
        quota = getattr(client.raw.stats, "quota", None)  # what the client says it uses
    scratch.close()
    return {
        "medians_ns": medians,
        "p99s_ns": p99s,
        "pending_at_end": pending,
        "quota": quota,
        "refused": _guard.refused,
    }


def measure(sizes: Sizes, subjects: list[str]) -> dict[str, dict[str, Any]]:
    """Round-robin over subjects, one fresh child per subject per round.

    Interleaving spreads any drift in the machine's load over every subject
    alike, instead of charging it to whichever ran at the wrong moment.
    The ``redis_url`` pair runs only when a ``redis-server`` can be started.
    """
    raw: dict[str, dict[str, Any]] = {}
    order = [TIMER, FLOOR_PUT, FLOOR_JSON, *subjects]
    with contextlib.ExitStack() as stack:
        collector = stack.enter_context(CollectorProcess(rate_limit=None))
        redis_url = ""
        if REDIS in order:
            redis = stack.enter_context(_redis.RedisServer())
            redis_url = redis.url
        for round_index in range(sizes.p1_rounds):
            for subject in _paired(order, round_index):
                result = _proc.run_child(
                    "p1_caller",
                    "child",
                    {
                        "subject": subject,
                        "url": collector.url,
                        "key": collector.key,
                        "calls": sizes.p1_calls,
                        "rounds": 1,
                        "redis_url": redis_url,
                    },
                    timeout=120 + sizes.p1_calls / 500,
                )
                into = raw.setdefault(
                    subject,
                    {
                        "medians_ns": [],
                        "p99s_ns": [],
                        "pending_at_end": [],
                        "quota": [],
                        "refused": [],
                    },
                )
                into["quota"].append(result["quota"])
                into["medians_ns"] += result["medians_ns"]
                into["p99s_ns"] += result["p99s_ns"]
                into["pending_at_end"].append(result["pending_at_end"])
                into["refused"] += result["refused"]
    return raw


def run(sizes: Sizes, peers: list[str]) -> Result:
    """P1 as table rows."""
    no_redis = _redis.missing()
    pair = [] if no_redis else [PACED, REDIS]
    if no_redis:
        print(f"bench: warning: P1 without its redis_url line: {no_redis}", file=sys.stderr)
    raw = measure(sizes, [_sdks.PRODUL, HOOKED, *peers, *pair])
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
    lines.append(_redis_line(med, raw, no_redis))
    lines.append(
        Line(
            "P1",
            "caller cost with before_send and 4 default properties, median per call",
            med[HOOKED].show("µs"),
            f"without them {ours.show('µs')}",
            "",
            f"{ratio(med[HOOKED].median, ours.median):.2f}x without",
            "(reported)",
            None,
        )
    )
    notes = [
        "\n\n".join((__doc__ or "").split("\n\n")[1:]).strip(),
        f"{sizes.p1_rounds} rounds of {sizes.p1_calls:,} calls per subject, each round in "
        f"a fresh process after a warm-up of as many calls, subjects interleaved round by "
        f"round; each round gives a median and a p99, and the table shows the median of "
        f"those with their min..max. The empty timed call costs "
        f"{med[TIMER].show('µs')} (median) and is inside every figure.",
    ]
    if not fastest:
        notes.append("No peer was installed, so the peer half of the target is not judged.")
    if no_redis:
        notes.append(f"The redis_url line was not measured: {no_redis} ({_redis.INSTALL_HINT}).")
    else:
        quotas = {s: sorted({str(q) for q in raw[s]["quota"]}) for s in (PACED, REDIS)}
        notes.append(
            f"With and without redis_url, p99 per call: {p99[REDIS].show('µs')} and "
            f"{p99[PACED].show('µs')}. The clients reported their quota as "
            f"{', '.join(quotas[REDIS])} with redis_url and {', '.join(quotas[PACED])} "
            "without (``stats.quota``)."
        )
    return Result("P1", "caller cost of track_event", lines, notes, raw)


REDIS_TARGET = 1.1


def _paired(order: list[str], round_index: int) -> list[str]:
    """*order*, with the redis_url pair run back to back, the other way round every other round.

    The pair's ratio is taken round by round: two children that run one
    after the other share the machine's state (its other load, its clock
    speed) far better than two medians over the whole run do.
    """
    if REDIS not in order or round_index % 2 == 0:
        return order
    rest = [s for s in order if s not in (PACED, REDIS)]
    return [*rest, REDIS, PACED]


def paired_ratios(raw: dict[str, dict[str, Any]]) -> list[float]:
    """With over without redis_url, one ratio per round."""
    return [
        ratio(with_redis, without)
        for with_redis, without in zip(
            raw[REDIS]["medians_ns"], raw[PACED]["medians_ns"], strict=True
        )
    ]


def _redis_line(
    med: dict[str, Summary], raw: dict[str, dict[str, Any]], no_redis: str | None
) -> Line:
    what = "caller cost with redis_url, median per call"
    target = f"≤ {REDIS_TARGET:g}x without redis_url"
    if no_redis:
        return Line("P1", what, f"not measured: {no_redis}", "", "", "", target, None)
    with_redis, without = med[REDIS], med[PACED]
    to_without = Summary.of(paired_ratios(raw))
    return Line(
        "P1",
        what,
        with_redis.show("µs"),
        f"without redis_url {without.show('µs')}",
        "",
        f"{to_without.median:.2f}x without ({to_without.low:.2f}..{to_without.high:.2f})",
        target,
        to_without.median <= REDIS_TARGET,
    )
