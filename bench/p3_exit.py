"""P3, exit latency: what tracking one event adds to a short script's exit.

Each run is a fresh ``python script.py``. The script imports the SDK,
builds a client, tracks one event, records ``time.monotonic_ns()`` on its
last line and returns; the parent records the same clock (system-wide on
Linux) when the process has ended. The difference is the script's exit
latency: the SDK's exit hooks plus interpreter teardown. The figure is that
minus the exit latency of the same script without any tracking (no SDK
imported), paired run by run, variants interleaved. Each tracked run uses a
fresh visitor id and must reach the collector (``delivered``).

The whole script's wall time over the bare script is shown too: it adds the
import and the client's construction, which a short-lived script also pays.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import _proc, _sdks
from bench._collector import CollectorProcess, CollectorStats
from bench._report import Line, Result, Sizes
from bench._stats import Summary

BARE = "bare script"
#: produl imported and a client built, but nothing tracked: splits produl's
#: figure into interpreter teardown of its imports and the delivery itself.
IDLE = "produl, no event"

_PRELUDE = """\
import sys, time
sys.path.append({root!r})  # after PYTHONPATH: the snapshot or --sdk comes first
from bench import _guard
_guard.install()
"""
_END = 'print("returned-at", time.monotonic_ns(), flush=True)\n'

_TRACK = {
    _sdks.PRODUL: """\
from produl_server import Produl
client = Produl(server_key={key!r}, api_url={url!r})
client.track_event("invoice_paid", {{"amount_cents": 4200, "currency": "EUR", "plan": "pro"}},
                   visitor_id=sys.argv[1])
""",
    _sdks.SEGMENT: """\
import logging
from segment.analytics import Client
logging.getLogger("segment").setLevel(logging.CRITICAL)
client = Client(write_key={key!r}, host={url!r})
client.track(user_id=sys.argv[1], event="invoice_paid",
             properties={{"amount_cents": 4200, "currency": "EUR", "plan": "pro"}})
""",
    _sdks.POSTHOG: """\
import logging
from posthog import Posthog
logging.getLogger("posthog").setLevel(logging.CRITICAL)
client = Posthog({key!r}, host={url!r}, personal_api_key=None,
                 enable_exception_autocapture=False, enable_local_evaluation=False)
client.capture("invoice_paid", distinct_id=sys.argv[1],
               properties={{"amount_cents": 4200, "currency": "EUR", "plan": "pro"}})
""",
}


def _script(directory: Path, subject: str, url: str, key: str) -> Path:
    body = _PRELUDE.format(root=str(_proc.ROOT))
    if subject == IDLE:
        body += _TRACK[_sdks.PRODUL].format(key=key, url=url).split("client.track_event")[0]
    elif subject != BARE:
        body += _TRACK[subject].format(key=key, url=url)
    # Not "segment.py": the script's folder comes first on sys.path.
    path = directory / f"bench_p3_{subject.replace(' ', '_')}.py"
    path.write_text(body + _END, encoding="utf-8")
    return path


def _once(script: Path, visitor: str, timeout: float) -> dict[str, float]:
    started = time.monotonic_ns()
    proc = subprocess.run(
        [sys.executable, str(script), visitor],
        capture_output=True,
        text=True,
        env=_proc.child_env(),
        cwd=_proc.NEUTRAL_CWD,
        timeout=timeout,
        check=False,
    )
    ended = time.monotonic_ns()
    marks = [line.split() for line in proc.stdout.splitlines() if line.startswith("returned-at")]
    if proc.returncode != 0 or not marks:
        raise _proc.ChildError(f"{script.name} exited {proc.returncode}: {proc.stderr[-1500:]}")
    returned = int(marks[-1][1])
    return {"exit_ms": (ended - returned) / 1e6, "wall_ms": (ended - started) / 1e6}


def _arrived(subject: str, before: CollectorStats, after: CollectorStats) -> int:
    if subject == _sdks.PRODUL:
        return after.events - before.events
    return after.peer_events - before.peer_events


def measure(sizes: Sizes, subjects: list[str]) -> dict[str, Any]:
    """Interleave bare and tracked runs; raw per-run figures and deliveries."""
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in [BARE, IDLE, *subjects]}
    delivered: dict[str, int] = dict.fromkeys(subjects, 0)
    with (
        CollectorProcess(rate_limit=None) as collector,
        tempfile.TemporaryDirectory(prefix="bench-p3-") as tmp,
    ):
        scripts = {s: _script(Path(tmp), s, collector.url, collector.key) for s in runs}
        for subject in runs:  # one unmeasured run each: warm the OS file cache
            _once(scripts[subject], "warmup", 60)
        for index in range(sizes.p3_runs):
            for subject, done in runs.items():
                before = collector.stats()
                done.append(_once(scripts[subject], f"p3-{subject}-{index}", 60))
                if subject not in (BARE, IDLE):
                    # A late request still counts, as long as it came: wait briefly.
                    deadline = time.monotonic() + 2.0
                    while True:
                        arrived = _arrived(subject, before, collector.stats())
                        if arrived >= 1 or time.monotonic() > deadline:
                            break
                        time.sleep(0.02)
                    delivered[subject] += arrived >= 1
    return {"runs": runs, "delivered": delivered, "count": sizes.p3_runs}


def run(sizes: Sizes, peers: list[str]) -> Result:
    """P3 as a table row."""
    raw = measure(sizes, [_sdks.PRODUL, *peers])
    runs, count = raw["runs"], raw["count"]
    bare = runs[BARE]
    extra = {
        s: Summary.of([r["exit_ms"] - b["exit_ms"] for r, b in zip(rs, bare, strict=True)])
        for s, rs in runs.items()
        if s != BARE
    }
    wall = {
        s: Summary.of([r["wall_ms"] - b["wall_ms"] for r, b in zip(rs, bare, strict=True)])
        for s, rs in runs.items()
        if s != BARE
    }
    ours = extra[_sdks.PRODUL]
    ran = [p for p in peers if p in extra]
    best = min(ran, key=lambda p: extra[p].median) if ran else None
    all_arrived = raw["delivered"][_sdks.PRODUL] == count
    met = all_arrived and best is not None and ours.median <= extra[best].median
    bare_exit = Summary.of([b["exit_ms"] for b in bare])

    def arrived(subject: str) -> str:
        return f"{raw['delivered'][subject]}/{count} arrived"

    idle = extra.pop(IDLE)
    wall.pop(IDLE)
    lines = [
        Line(
            "P3",
            "exit latency added by 1 event",
            f"{ours.show('ms')}, {arrived(_sdks.PRODUL)}",
            f"bare script exit {bare_exit.show('ms')}",
            "; ".join(f"{p} {extra[p].show('ms')}, {arrived(p)}" for p in ran) or "not installed",
            f"{ours.median - extra[best].median:+.1f} ms vs {best}" if best else "",
            "≤ best peer; 100% arrive",
            met if best else None,
        ),
        Line(
            "P3",
            "whole script over bare (import+init+exit)",
            wall[_sdks.PRODUL].show("ms"),
            f"bare script wall {Summary.of([b['wall_ms'] for b in bare]).show('ms')}",
            "; ".join(f"{p} {wall[p].show('ms')}" for p in ran),
            "",
            "(reported)",
            None,
        ),
    ]
    notes = [
        (__doc__ or "").split("\n\n", 1)[1].strip(),
        f"{count} runs per variant after one warm-up run each. Peers run with their "
        "defaults (only the host set, side channels off); their exit hooks flush "
        "with their own budgets.",
        f"The same produl script without the track call (client built, nothing "
        f"tracked) exits {idle.show('ms')} later than the bare script: that much of "
        f"produl's figure is interpreter teardown of what it imports, not delivery.",
    ]
    return Result("P3", "exit latency of a script that tracks one event", lines, notes, raw)
