"""P5, sustained delivery under the 2,000 requests/minute quota at 100 ms latency.

The collector enforces Produl's quota (2,000 keyed requests per minute per
IP, ``429`` with ``Retry-After`` over it) and holds every answer 100 ms, a
realistic round trip to a distant region. A fresh interpreter queues a
backlog of ``backlog`` events at once with produl's defaults (its own pacer
at 2,000/minute) and a queue that holds them all, then watches
``stats.sent`` until the backlog is delivered or the window ends.

The figure is the delivery rate over the whole run (first event queued to
last delivered, or to the end of the window) as a fraction of the quota;
the rate in successive slices of the run is shown as median (min..max).
The collector counts every ``429``. With one request at a time, 100 ms per
request caps a sender at 600 per minute, whatever its pacer allows.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from bench import _guard, _proc, _sdks
from bench._collector import CollectorProcess
from bench._report import Line, Result, Sizes
from bench._stats import Summary

QUOTA_PER_MINUTE = 2000
LATENCY_SECONDS = 0.1
_POLL_SECONDS = 0.25


def child(url: str, key: str, backlog: int, window: float) -> dict[str, Any]:
    """Queue *backlog* events and watch them leave for at most *window* seconds."""
    _guard.install()
    client = _sdks.make(_sdks.PRODUL, url, key, max_queue_size=backlog + 1000)
    produl = client.raw
    started = time.monotonic()
    for index in range(backlog):
        client.track(f"cust_{index:07d}")
    queued_in = time.monotonic() - started
    timeline: list[tuple[float, int]] = [(0.0, 0)]
    deadline = started + window
    while True:
        now = time.monotonic()
        sent = produl.stats.sent
        timeline.append((now - started, sent))
        if sent >= backlog or now >= deadline:
            break
        time.sleep(min(_POLL_SECONDS, max(0.0, deadline - now)))
    stats = produl.stats
    return {
        "timeline": timeline,
        "queued_in_s": queued_in,
        "sent": stats.sent,
        "retried": stats.retried,
        "dropped": stats.dropped,
        "backlog": backlog,
        "refused": _guard.refused,
    }


def slice_rates(timeline: list[tuple[float, int]], width: float) -> list[float]:
    """Events per minute in consecutive *width*-second slices while the backlog lasted."""
    if len(timeline) < 2:
        return []
    end = timeline[-1][0]
    rates, start = [], 0.0
    while start + width <= end + 1e-9:
        first = _sent_at(timeline, start)
        last = _sent_at(timeline, start + width)
        rates.append((last - first) * 60.0 / width)
        start += width
    return rates


def _sent_at(timeline: list[tuple[float, int]], moment: float) -> float:
    """Linear interpolation of the sent counter at *moment*."""
    for (t0, s0), (t1, s1) in itertools.pairwise(timeline):
        if t0 <= moment <= t1:
            return s0 + (s1 - s0) * ((moment - t0) / (t1 - t0) if t1 > t0 else 1.0)
    return float(timeline[-1][1])


def measure(sizes: Sizes) -> dict[str, Any]:
    """One run against a quota-enforcing, slow collector."""
    with CollectorProcess(rate_limit=QUOTA_PER_MINUTE, latency=LATENCY_SECONDS) as collector:
        result: dict[str, Any] = _proc.run_child(
            "p5_quota",
            "child",
            {
                "url": collector.url,
                "key": collector.key,
                "backlog": sizes.p5_backlog,
                "window": sizes.p5_window,
            },
            timeout=sizes.p5_window + 120,
        )
        stats = collector.stats()
    result["collector_429"] = stats.rate_limited
    result["collector_events"] = stats.events
    return result


def run(sizes: Sizes) -> Result:
    """P5 as a table row."""
    raw = measure(sizes)
    timeline = [(float(t), int(s)) for t, s in raw["timeline"]]
    elapsed, sent = timeline[-1]
    overall = sent * 60.0 / elapsed if elapsed > 0 else 0.0
    fraction = overall / QUOTA_PER_MINUTE
    rates = slice_rates(timeline, sizes.p5_slice) or [overall]
    slices = Summary.of(rates)
    drained = sent >= raw["backlog"]
    met = fraction >= 0.95 and raw["collector_429"] == 0
    lines = [
        Line(
            "P5",
            f"delivery under quota, 100 ms latency, backlog {raw['backlog']:,}",
            f"{overall:,.0f}/min overall; slices {slices.show('/min', 3)}",
            f"quota {QUOTA_PER_MINUTE:,}/min",
            "",
            f"{fraction:.1%} of quota; {raw['collector_429']} x 429",
            "≥ 95% of quota, zero 429s",
            met,
        ),
    ]
    how = (
        f"drained in {elapsed:.0f} s"
        if drained
        else f"window ended after {elapsed:.0f} s with {raw['backlog'] - sent:,} still queued"
    )
    notes = [
        (__doc__ or "").split("\n\n", 1)[1].strip(),
        f"This run: {sent:,} of {raw['backlog']:,} events delivered, {how}; slices of "
        f"{sizes.p5_slice:g} s; the collector stored {raw['collector_events']:,} events "
        f"and answered {raw['collector_429']} x 429; produl counted {raw['retried']} "
        f"retries. One run per suite run: its repetition is the slices, and a full "
        f"run takes minutes (``--quick`` uses a smaller backlog and a shorter window "
        f"for development; the published figure comes from the full run).",
    ]
    return Result("P5", "sustained delivery under the quota", lines, notes, raw)
