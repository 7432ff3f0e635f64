"""P8, exit curve: a script that tracks 1,000 events and ends, by collector latency.

Each run is a fresh ``python script.py`` that imports the SDK, builds a client
with default options (``shutdown_timeout`` 5 s, the client's own pace of
2,000 requests a minute), tracks 1,000 events in a loop, records
``time.monotonic_ns()`` on its last line and returns, without calling
``flush()`` or ``shutdown()``: whatever is still queued is left to the exit
hook. The collector enforces 2,000 keyed requests a minute and answers every
request after the latency of the row (0, 10, 50, 100 ms), reset between runs.

Per run: the events the collector stored, its ``429`` answers, the script's
whole wall time (start to end of process, as the parent sees it) and its exit
time (from the last line to the end of the process: the exit hook plus
interpreter teardown). The floor is the wall time of the same script without
the SDK (the loop runs, nothing is tracked). Latencies are interleaved run by
run, the bare script first in each round.

The target: at 0, 10 and 50 ms every run delivers 1,000/1,000, at 100 ms
at least 900/1,000; at every latency the median exit time stays within
``shutdown_timeout``, with no 429. Each run has a default spool of its own
(a fresh ``XDG_STATE_HOME``), so one run's leftovers never count in the next.

Then, the same script re-run as a new user would (issue #22), at 0 ms: four
runs within one minute against the same collector of 2,000 a minute, then a
fifth once that minute has passed, all sharing one default spool. The
third and fourth runs find the quota used up and keep their events; the
target is that the collector has all 4,000 events of the first four runs,
each once, by the end of the fifth.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import _proc
from bench._collector import CollectorProcess
from bench._report import Line, Result, Sizes, rst_table
from bench._stats import Summary

EVENTS = 1_000
LATENCIES_MS = (0, 10, 50, 100)
COLLECTOR_LIMIT = 2_000
SHUTDOWN_TIMEOUT = 5.0  # produl_server's default; the script does not set it
BARE = "bare"

_SCRIPT = """\
import sys, time
run = sys.argv[1]
sys.path.append({root!r})  # after PYTHONPATH: the snapshot or --sdk comes first
from bench import _guard
_guard.install()
{sdk}
for i in range({events}):
    {track}
print("returned-at", time.monotonic_ns(), flush=True)
"""
_SDK = """\
import produl_server
from produl_server import Produl
print("produl-from", produl_server.__file__, flush=True)
client = Produl(server_key={key!r}, api_url={url!r})
"""
_TRACK = 'client.track_event("exit_curve", {"i": i, "plan": "pro"}, visitor_id=f"{run}-{i % 97}")'


def _script(directory: Path, name: str, sdk: str, track: str) -> Path:
    body = _SCRIPT.format(root=str(_proc.ROOT), sdk=sdk, events=EVENTS, track=track)
    path = directory / f"bench_p8_{name}.py"
    path.write_text(body, encoding="utf-8")
    return path


def _once(script: Path, run: str, timeout: float, state: str | None = None) -> dict[str, Any]:
    started = time.monotonic_ns()
    with tempfile.TemporaryDirectory(prefix="bench-p8-state-") as fresh:
        proc = _run(script, run, timeout, state or fresh)
    ended = time.monotonic_ns()
    return _figures(script, proc, started, ended)


def _run(script: Path, run: str, timeout: float, state: str) -> subprocess.CompletedProcess[str]:
    """One script run; *state* is its ``XDG_STATE_HOME`` (where its default spool lives)."""
    return subprocess.run(
        [sys.executable, str(script), run],
        capture_output=True,
        text=True,
        env=_proc.child_env({"XDG_STATE_HOME": state}),
        cwd=_proc.NEUTRAL_CWD,
        timeout=timeout,
        check=False,
    )


def _figures(
    script: Path, proc: subprocess.CompletedProcess[str], started: int, ended: int
) -> dict[str, Any]:
    marks: list[int] = []
    where = ""
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "returned-at":
            marks.append(int(value))
        elif key == "produl-from":
            where = value.strip()
    if proc.returncode != 0 or not marks:
        raise _proc.ChildError(f"{script.name} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return {
        "wall_s": (ended - started) / 1e9,
        "exit_s": (ended - marks[-1]) / 1e9,
        "produl_from": where,
        "stderr_tail": proc.stderr[-300:],
    }


def _settled(collector: CollectorProcess, timeout: float = 3.0) -> dict[str, int]:
    """The collector's counts once no request is held any more."""
    deadline = time.monotonic() + timeout
    stats = collector.stats()
    while stats.held and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = collector.stats()
    return {"delivered": stats.events, "rate_limited": stats.rate_limited, "held": stats.held}


def measure(runs: int, latencies_ms: list[int]) -> dict[str, Any]:
    """``runs`` rounds of: the bare script, then one tracked script per latency."""
    out: dict[str, list[dict[str, Any]]] = {BARE: [], **{str(ms): [] for ms in latencies_ms}}
    with (
        CollectorProcess(rate_limit=COLLECTOR_LIMIT) as collector,
        tempfile.TemporaryDirectory(prefix="bench-p8-") as tmp,
    ):
        sdk = _SDK.format(key=collector.key, url=collector.url)
        tracked = _script(Path(tmp), "produl", sdk, _TRACK)
        bare = _script(Path(tmp), BARE, "", "pass")
        _once(bare, "warmup", 60)  # warm the OS file cache
        for index in range(runs):
            out[BARE].append(_once(bare, f"bare-{index}", 60))
            for ms in latencies_ms:
                collector.command(f"latency {ms / 1000}")
                collector.command("reset")
                figures = _once(tracked, f"p8-{ms}-{index}", 120)
                figures.update(_settled(collector))
                out[str(ms)].append(figures)
        collector.command("latency 0")
    return {"runs": out, "count": runs, "events": EVENTS, "collector_limit": COLLECTOR_LIMIT}


RERUNS = 4
#: Seconds the fifth run waits after the last accepted request of the first
#: four: the collector's bucket is full again after 60.
QUOTA_MINUTE = 61.0


def reruns() -> dict[str, Any]:
    """Four runs within a minute, then a fifth after it, sharing one default spool."""
    with tempfile.TemporaryDirectory(prefix="bench-p8-rerun-") as tmp:
        db = str(Path(tmp) / "events.sqlite3")
        state = str(Path(tmp) / "state")
        runs: list[dict[str, Any]] = []
        with CollectorProcess(rate_limit=COLLECTOR_LIMIT, db=db) as collector:
            sdk = _SDK.format(key=collector.key, url=collector.url)
            tracked = _script(Path(tmp), "produl", sdk, _TRACK)
            started = time.monotonic()
            for index in range(RERUNS):
                figures = _once(tracked, f"rerun{index}", 120, state)
                figures.update(_settled(collector))
                runs.append(figures)
            within = time.monotonic() - started
            time.sleep(max(0.0, started + within + QUOTA_MINUTE - time.monotonic()))
            figures = _once(tracked, f"rerun{RERUNS}", 120, state)
            figures.update(_settled(collector))
            runs.append(figures)
        delivered = _delivered_by_run(db)
    first = [f"rerun{index}" for index in range(RERUNS)]
    return {
        "runs": runs,
        "four_runs_s": within,
        "first_four": sum(len(delivered.get(run, [])) for run in first),
        "first_four_distinct": sum(len(set(delivered.get(run, []))) for run in first),
        "fifth_own": len(delivered.get(f"rerun{RERUNS}", [])),
    }


def _delivered_by_run(db: str) -> dict[str, list[int]]:
    """The event numbers the collector stored, by run (from the visitor id ``run-n``)."""
    out: dict[str, list[int]] = {}
    connection = sqlite3.connect(db)
    try:
        for visitor, body in connection.execute("SELECT vi, body FROM events"):
            run = str(visitor).rpartition("-")[0]
            out.setdefault(run, []).append(int(json.loads(body)["pr"]["i"]))
    finally:
        connection.close()
    return out


def curve(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One summary per latency: delivered, 429s, exit and wall seconds."""
    rows = []
    for key, runs in raw["runs"].items():
        if key == BARE:
            continue
        rows.append(
            {
                "latency_ms": int(key),
                "delivered": Summary.of([r["delivered"] for r in runs]),
                "rate_limited": Summary.of([r["rate_limited"] for r in runs]),
                "exit_s": Summary.of([r["exit_s"] for r in runs]),
                "wall_s": Summary.of([r["wall_s"] for r in runs]),
            }
        )
    return rows


def run(sizes: Sizes) -> Result:
    """P8 as table rows, one per latency, and the curve as a note."""
    raw = measure(sizes.p8_runs, list(LATENCIES_MS))
    count = raw["count"]
    bare = Summary.of([r["wall_s"] for r in raw["runs"][BARE]])
    rows = curve(raw)
    lines = []
    for row in rows:
        ms, delivered, exit_s = row["latency_ms"], row["delivered"], row["exit_s"]
        wanted = EVENTS if ms <= 50 else 900
        no_429 = row["rate_limited"].high == 0
        met = exit_s.median <= SHUTDOWN_TIMEOUT and delivered.low >= wanted and no_429
        lines.append(
            Line(
                "P8",
                f"{EVENTS:,} events then exit, {ms} ms latency",
                f"exit {exit_s.show('s')}; {delivered.show(digits=4)}/{EVENTS:,} arrived",
                f"bare script wall {bare.show('s')}",
                "",
                f"wall {row['wall_s'].median / bare.median:.0f}x bare; "
                f"{row['rate_limited'].median:.0f} x 429",
                f"≥ {wanted:,}/{EVENTS:,} every run; exit ≤ {SHUTDOWN_TIMEOUT:g} s; 0 x 429",
                met,
            )
        )
    again = reruns()
    raw["reruns"] = again
    wanted = RERUNS * EVENTS
    lines.append(
        Line(
            "P8",
            f"{RERUNS} runs within a minute, then a 5th (2,000/min collector)",
            f"{again['first_four_distinct']:,}/{wanted:,} of the first {RERUNS} arrived "
            "by the end of the 5th",
            f"{RERUNS} runs took {again['four_runs_s']:.0f} s",
            "",
            "per run: "
            + ", ".join(
                f"{r['delivered'] - (again['runs'][i - 1]['delivered'] if i else 0):,}"
                for i, r in enumerate(again["runs"])
            )
            + " arrived",
            f"{wanted:,}/{wanted:,}, none twice",
            again["first_four_distinct"] == wanted and again["first_four"] == wanted,
        )
    )
    table = rst_table(
        f"Exit curve: median (min..max) of {count} runs per latency",
        ["latency", f"delivered/{EVENTS:,}", "429s", "exit seconds", "whole script seconds"],
        [
            [
                f"{row['latency_ms']} ms",
                row["delivered"].show(digits=4),
                row["rate_limited"].show(digits=4),
                row["exit_s"].show(),
                row["wall_s"].show(),
            ]
            for row in rows
        ],
    )
    notes = [
        (__doc__ or "").split("\n\n", 1)[1].strip(),
        table,
        f"The bare script (the same loop, no SDK imported) runs {bare.show('s')} from "
        "start to end. Exit seconds include interpreter teardown, which the bare "
        "script pays too (a few milliseconds).",
    ]
    return Result(
        "P8", "exit curve of a 1,000-event script by collector latency", lines, notes, raw
    )
