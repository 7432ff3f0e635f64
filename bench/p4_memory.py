"""P4, memory held per queued event while delivery is stalled.

The collector hangs: it reads every request and never answers, so each SDK
really is trying to deliver, with its first request (or batch) in flight
and everything else queued behind it. That is what an outage or a stalled
network looks like from inside the process. A fresh interpreter per run
tracks one warm-up event and has it sent (threads, pools, the first
connection and its lazy imports start), then starts ``tracemalloc``, tracks
``events`` more, lets the sender settle for a second, collects garbage and
reads the traced memory still held. The figure is that divided by the
events.

Every SDK gets a queue bound above ``events`` and a request timeout far
beyond the run, so no event is dropped or retried during it; the run checks
that they are all still held. RSS growth is shown too (it also counts
allocator slack and memory ``tracemalloc`` does not see).
"""

from __future__ import annotations

import gc
import os
import time
import tracemalloc
from typing import Any

from bench import _guard, _proc, _sdks
from bench._collector import CollectorProcess
from bench._report import Line, Result, Sizes
from bench._stats import Summary, ratio

_SETTLE_SECONDS = 1.0
#: The target (issue #22): what v0.1 held, a body and a slot of the queue;
#: about 0.15x the better peer.
TARGET_BYTES = 150


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def child(subject: str, url: str, key: str, events: int) -> dict[str, Any]:
    """Queue *events* events behind a hung collector; bytes held per event."""
    _guard.install()
    visitors = [f"cust_{i:07d}" for i in range(events)]
    client = _sdks.make(subject, url, key, max_queue_size=events + 1000, request_timeout=600.0)
    client.track("warmup")
    if subject == _sdks.PRODUL:
        # The peers send their warm-up event within half a second; produl
        # holds it for flush_interval (5 s), past the settle below, and its
        # first connection (the idna codec it imports: about 120 KB, 12 B
        # per event here) would be counted as memory held per queued event.
        # A flush that does not wait sends it now; it hangs like theirs.
        client.raw.flush(timeout=0)
    time.sleep(_SETTLE_SECONDS)
    gc.collect()
    rss = _rss_bytes()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for visitor in visitors:
        client.track(visitor)
    time.sleep(_SETTLE_SECONDS)
    gc.collect()
    held_bytes = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    rss_growth = _rss_bytes() - rss
    dropped = client.raw.stats.dropped_total if subject == _sdks.PRODUL else 0
    return {
        "bytes_per_event": held_bytes / events,
        "rss_per_event": rss_growth / events,
        "pending": client.pending(),
        "dropped": dropped,
        "refused": _guard.refused,
    }


def measure(sizes: Sizes, subjects: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Interleaved runs against one hung collector; raw figures per subject."""
    raw: dict[str, list[dict[str, Any]]] = {s: [] for s in subjects}
    with CollectorProcess(rate_limit=None) as collector:
        collector.command("hang")
        for _ in range(sizes.p4_repeats):
            for subject in subjects:
                before = collector.stats().events
                result = _proc.run_child(
                    "p4_memory",
                    "child",
                    {
                        "subject": subject,
                        "url": collector.url,
                        "key": collector.key,
                        "events": sizes.p4_events,
                    },
                    timeout=180 + sizes.p4_events / 100,
                )
                result["delivered_meanwhile"] = collector.stats().events - before
                raw[subject].append(result)
        collector.command("release")
    return raw


def run(sizes: Sizes, peers: list[str]) -> Result:
    """P4 as a table row."""
    raw = measure(sizes, [_sdks.PRODUL, *peers])
    held = {s: Summary.of([r["bytes_per_event"] for r in runs]) for s, runs in raw.items()}
    rss = {s: Summary.of([r["rss_per_event"] for r in runs]) for s, runs in raw.items()}
    ours = held[_sdks.PRODUL]
    ran = [p for p in peers if p in held]
    best = min(ran, key=lambda p: held[p].median) if ran else None
    intact = all(r["dropped"] == 0 and r["delivered_meanwhile"] == 0 for r in raw[_sdks.PRODUL])
    to_peer = ratio(ours.median, held[best].median) if best else None
    lines = [
        Line(
            "P4",
            f"memory per queued event ({sizes.p4_events:,} queued, delivery stalled)",
            ours.show("B"),
            "",
            "; ".join(f"{p} {held[p].show('B')}" for p in ran) or "not installed",
            f"{to_peer:.3f}x {best}" if to_peer is not None else "",
            f"≤ {TARGET_BYTES} B",
            ours.median <= TARGET_BYTES and intact,
        ),
        Line(
            "P4",
            "RSS growth per queued event",
            rss[_sdks.PRODUL].show("B"),
            "",
            "; ".join(f"{p} {rss[p].show('B')}" for p in ran),
            "",
            "(reported)",
            None,
        ),
    ]
    pending = {s: Summary.of([r["pending"] for r in runs]).median for s, runs in raw.items()}
    notes = [
        (__doc__ or "").split("\n\n", 1)[1].strip(),
        f"{sizes.p4_repeats} runs per subject, interleaved. Events visibly pending at "
        "the end (median; peers hold up to one more batch in flight): "
        + ", ".join(f"{s} {v:,.0f}" for s, v in pending.items())
        + ".",
    ]
    return Result("P4", "memory per queued event", lines, notes, raw)
