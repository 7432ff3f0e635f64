"""Where the time goes: the caller path (P1) and the sender (P2).

``python -m bench.profile [--events N] [--out FILE]`` prints, in Markdown:

* a breakdown of one ``track_event`` call into its steps, each timed alone
  with ``perf_counter_ns`` (median over many calls);
* a ``cProfile`` of the caller path (deterministic, so it inflates small
  functions; read it for shares, not absolute times);
* a ``py-spy`` sampling profile of a P2 child (whole process, every
  thread), folded by function, if ``py-spy`` is installed.

Honours ``--sdk`` / ``BENCH_SDK_PATH`` like the suite does.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench import _proc, _sdks
from bench._collector import CollectorProcess
from bench._stats import percentile


def _median_ns(call: Callable[[int], object], count: int, passes: int = 3) -> float:
    """The smallest of *passes* medians: the least disturbed pass on a shared machine."""
    clock = time.perf_counter_ns
    medians = []
    for _ in range(passes):
        samples = [0] * count
        for i in range(count):
            started = clock()
            call(i)
            samples[i] = clock() - started
        medians.append(percentile(samples, 0.5))
    return min(medians)


def caller_breakdown(url: str, key: str, count: int) -> dict[str, Any]:
    """Time each step of the caller path alone; then cProfile the whole call."""
    import queue as queue_module

    from produl_server import Produl, _event

    props = _sdks.PROPERTIES
    visitors = [f"cust_{i:07d}" for i in range(count)]
    wire = {"t": "ev", "n": _sdks.EVENT_NAME, "vi": "cust_0000001", "pr": props}
    body = _event._encode(wire).encode()
    # Delivery paused (enabled, but a huge flush_at and interval), so put()
    # is measured without a sender competing; P1 measures it with one.
    idle = Produl(
        server_key=key,
        api_url=url,
        flush_at=10**6,
        flush_interval=3600,
        max_delay=3600,
        max_queue_size=20 * count + 10,
        max_requests_per_minute=None,
    )
    worker = idle._worker
    plain: queue_module.Queue[bytes] = queue_module.Queue()
    steps: dict[str, float] = {}
    steps["timer alone"] = _median_ns(lambda i: None, count)
    steps["encode_event() (validate + snapshot + JSON)"] = _median_ns(
        lambda i: _event.encode_event(_sdks.EVENT_NAME, props, visitors[i], None, None, None), count
    )
    steps["  _properties() snapshot of 3 properties"] = _median_ns(
        lambda i: _event._properties(props), count
    )
    steps["  JSON encode of the wire dict + .encode()"] = _median_ns(
        lambda i: _event._encode(wire).encode(), count
    )
    steps["json.dumps(wire) (the P1 floor's encoder)"] = _median_ns(
        lambda i: json.dumps(wire), count
    )
    steps["Worker.put(body) (sender idle)"] = _median_ns(lambda i: worker.put(body), count)
    steps["queue.Queue.put_nowait(body) alone"] = _median_ns(
        lambda i: plain.put_nowait(body), count
    )
    steps["track_event() whole (sender idle)"] = _median_ns(
        lambda i: idle.track_event(_sdks.EVENT_NAME, props, visitor_id=visitors[i]), count
    )
    profiler = cProfile.Profile()
    profiler.enable()
    for visitor in visitors:
        idle.track_event(_sdks.EVENT_NAME, props, visitor_id=visitor)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(14)
    return {"steps_ns": steps, "cprofile": _trim_pstats(text.getvalue())}


def _trim_pstats(text: str) -> str:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    home = os.path.dirname(os.path.dirname(_sdks.__file__))
    return "\n".join(line.replace(home + os.sep, "") for line in lines[start:] if line.strip())


def fold(raw: str, top: int = 18) -> dict[str, Any]:
    """Fold py-spy raw stacks into self and inclusive sample shares per function."""
    self_count: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        count = int(number)
        frames = [_short(frame) for frame in stack.split(";")]
        total += count
        sender = any(f.startswith(("Worker._run ", "Worker._lane ")) for f in frames)
        threads["sender" if sender else "main (tracking, flush)"] += count
        self_count[frames[-1]] += count
        for frame in set(frames):
            incl[frame] += count
    share = 100.0 / max(total, 1)
    return {
        "samples": total,
        "threads": {k: round(v * share, 1) for k, v in threads.most_common()},
        "self": [(f, round(c * share, 1)) for f, c in self_count.most_common(top)],
        "inclusive": [(f, round(c * share, 1)) for f, c in incl.most_common(top + 12)],
    }


def _short(frame: str) -> str:
    # "send (produl_server/_transport.py:171)" -> "send (_transport.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.replace("\\", "/").split("/")
    package = next(
        (
            p
            for p in (
                "produl_server",
                "urllib3",
                "http",
                "json",
                "queue.py",
                "threading.py",
                "socket.py",
                "bench",
            )
            if p in parts or p in path
        ),
        "",
    )
    return f"{name} ({package + '/' if package and package != parts[-1] else ''}{parts[-1]})"


def sender_profile(url: str, key: str, events: int, out_dir: str) -> dict[str, Any] | None:
    """py-spy record a P2 produl child; None when py-spy is not installed."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        return None
    raw_path = os.path.join(out_dir, "p2-sender.pyspy.txt")
    args = json.dumps({"subject": _sdks.PRODUL, "url": url, "key": key, "events": events})
    # --gil: only the thread holding the GIL is sampled, so the shares are
    # Python CPU time, not time spent blocked in recv().
    argv = [
        spy,
        "record",
        "--gil",
        "--format",
        "raw",
        "--rate",
        "400",
        "--output",
        raw_path,
        "--",
        sys.executable,
        "-m",
        "bench._proc",
        "p2_sender",
        "child",
        args,
    ]
    subprocess.run(
        argv,
        env=_proc.child_env(),
        cwd=_proc.NEUTRAL_CWD,
        timeout=600,
        check=True,
        capture_output=True,
    )
    with open(raw_path, encoding="utf-8") as handle:
        return fold(handle.read())


def report(events: int, calls: int) -> str:
    """Both profiles as Markdown."""
    out: list[str] = []
    with CollectorProcess(rate_limit=None) as collector:
        caller = _proc.run_child(
            "profile",
            "caller_breakdown",
            {"url": collector.url, "key": collector.key, "count": calls},
            timeout=300,
        )
        with tempfile.TemporaryDirectory() as tmp:
            sender = sender_profile(collector.url, collector.key, events, tmp)
    out += [
        "### Caller path: one `track_event`, step by step",
        "",
        f"Median of {calls:,} calls each, this machine, timer included:",
        "",
        "| step | median µs |",
        "|---|---|",
    ]
    out += [f"| {name} | {ns / 1000:.2f} |" for name, ns in caller["steps_ns"].items()]
    out += [
        "",
        "cProfile of the same calls (tottime order; cProfile inflates small "
        "functions, read the shares):",
        "",
        "```",
        caller["cprofile"],
        "```",
        "",
    ]
    if sender is None:
        out += ["(py-spy not installed: no sender profile)"]
        return "\n".join(out)
    out += [
        f"### Sender: py-spy of a P2 run ({events:,} events, whole process)",
        "",
        f"{sender['samples']:,} samples of the thread holding the GIL (`py-spy --gil`), "
        "imports included. By thread: "
        + ", ".join(f"{k} {v}%" for k, v in sender["threads"].items()),
        "",
        "| self % | function |",
        "|---|---|",
    ]
    out += [f"| {share} | `{name}` |" for name, share in sender["self"]]
    out += ["", "| inclusive % | function |", "|---|---|"]
    out += [f"| {share} | `{name}` |" for name, share in sender["inclusive"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Print the profiles."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=10_000, help="P2 events under py-spy")
    parser.add_argument("--calls", type=int, default=20_000, help="caller calls per step")
    parser.add_argument("--sdk", help="measure the produl_server in this directory")
    parser.add_argument("--out", help="write the Markdown here too")
    args = parser.parse_args(argv)
    if args.sdk:
        os.environ[_proc.SDK_PATH_VARIABLE] = os.path.abspath(args.sdk)
    text = report(args.events, args.calls)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
