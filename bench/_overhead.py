"""What P6 and P7 share: an app's CPU per request and requests/s, paired by repeat.

Three variants of the same app run in turn: ``untracked``; ``floor``, which
does per request only the cheapest thing any queue-based SDK must do for the
same event (``json.dumps`` and ``Queue.put``, for P7 inside a no-op pure-ASGI
middleware); and ``tracked``, with produl. The judged figure is tracked
against the floor: what produl costs beyond the cheapest possible design,
counting everything (the call, the sender, GC, memory).
"""

from __future__ import annotations

from typing import Any

from bench._report import Sizes
from bench._stats import Summary

#: Connections the load client keeps busy.
CONNECTIONS = 4
PLAIN = "untracked"
FLOOR = "floor"
TRACKED = "tracked"
VARIANTS = (PLAIN, FLOOR, TRACKED)


def order(repeat: int) -> tuple[str, ...]:
    """The variants in this repeat's order: each goes first in turn, so drift favours none."""
    shift = repeat % len(VARIANTS)
    return VARIANTS[shift:] + VARIANTS[:shift]


def cpu_per_request(runs: list[dict[str, Any]]) -> Summary:
    """The server's CPU time per answered request, in µs."""
    return Summary.of([r["cpu_s"] * 1e6 / max(r["rps"] * r["seconds"], 1) for r in runs])


def paired_cpu_ratio(runs: dict[str, list[dict[str, Any]]], against: str = PLAIN) -> Summary:
    """Tracked / *against* CPU per request, repeat by repeat."""
    return Summary.of(
        [
            (t["cpu_s"] / max(t["rps"], 1e-9)) / max(p["cpu_s"] / max(p["rps"], 1e-9), 1e-12)
            for t, p in zip(runs[TRACKED], runs[against], strict=True)
        ]
    )


def paired_rps_ratio(runs: dict[str, list[dict[str, Any]]], against: str = PLAIN) -> Summary:
    """Tracked / *against* requests per second, repeat by repeat."""
    return Summary.of(
        [t["rps"] / p["rps"] for t, p in zip(runs[TRACKED], runs[against], strict=True)]
    )


def clean(runs: dict[str, list[dict[str, Any]]]) -> tuple[int, float]:
    """Events dropped in the tracked runs, and failed requests in all runs."""
    dropped = sum(r["stats"].get("dropped", 0) for r in runs[TRACKED])
    errors = sum(r["errors"] + r["timeouts"] for rs in runs.values() for r in rs)
    return dropped, errors


def note(raw: dict[str, Any], sizes: Sizes) -> str:
    """The load, the repeats, and what the tracked clients queued and sent."""
    runs = raw["runs"]
    dropped, errors = clean(runs)
    queued = [r["stats"].get("queued", 0) for r in runs[TRACKED]]
    in_window = ", ".join(f"{r.get('sent_in_window', 0):,}" for r in runs[TRACKED])
    return (
        f"Load client: {raw['client']}, {CONNECTIONS} connections; {sizes.p6_repeats} repeats of "
        f"{sizes.p6_seconds:g} s per variant. Events queued per tracked run (median): "
        f"{Summary.of(queued).median:,.0f}; sent during each measured run: {in_window}; "
        f"dropped in all tracked runs: {dropped}; failed requests in all runs: {errors:.0f}."
    )
