"""P6, overhead on a real app: a Flask app under gunicorn, with and without tracking.

``bench/_app.py`` serves a small JSON endpoint; with tracking on, each
request also calls ``track_event`` once (produl's defaults, but a queue that
holds the whole run). Gunicorn runs one sync worker, and a load client in
its own process (``wrk`` if installed, else ``bench/_load.py``) keeps a few
connections busy on loopback. Each repeat starts a fresh gunicorn for each
variant (in turn first), warms it up for a second, then measures. The
collector enforces the real quota, so during a run produl queues and paces,
as it would in a busy app.

Three variants run in turn: untracked; the floor, which per request does
only ``json.dumps`` of the same event and ``Queue.put`` (what any SDK that
encodes on the caller's thread pays at least); and tracked. The judged
figure is the CPU time gunicorn's processes (master and worker, from
``/proc``) spend per answered request, tracked against the floor, paired
repeat by repeat: what produl costs beyond the cheapest possible design,
counting everything (the call, the sender thread, GC, memory). It is far
less sensitive to other load on a shared 2-core machine than requests per
second, which is reported, as is the ratio to the untracked app.

The pacer lets a fresh client send a whole window's quota (2,000 requests)
at once; with a backlog, the next 2,000 go as those leave the window, 61 s
later, and so on. A busy app therefore sends one window's quota per 61 s.
The warm-up lasts until the tracked client has sent its first quota, and a
full run then measures 61 s: one window, which holds exactly one window's
sends (the notes give the count per run). A shorter run (``--quick``) puts a
whole window's sends into fewer requests and overstates the overhead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from bench import _overhead, _own, _proc
from bench._collector import CollectorProcess
from bench._overhead import CONNECTIONS, FLOOR, PLAIN, TRACKED
from bench._report import Line, Result, Sizes
from bench._stats import Summary

#: The collector's quota, and so the sends in one window.
QUOTA = 2000
#: The target (issue #22): CPU per request with produl at most 1.05x the
#: same app doing only the floor (json+put of the same event), paired by
#: repeat, median. Against the untracked app, and requests/s: reported.
CPU_TARGET = 1.05
_WARMUP_SECONDS = 1.0
#: The longest wait for a tracked client's first window to be sent.
_FIRST_WINDOW_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of *pid* and its children (gunicorn's master and worker)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    # The worker is the master's child; /proc/PID/task/PID/children is not
    # in every kernel, so scan for the parent id.
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    for one in pids:
        try:
            with open(f"/proc/{one}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
        return json.loads(response.read())


class _Gunicorn:
    def __init__(self, track: bool | str, collector: CollectorProcess) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = _proc.child_env(
            {
                "BENCH_TRACK": track if isinstance(track, str) else "1" if track else "0",
                "BENCH_COLLECTOR": collector.url,
                "BENCH_KEY": collector.key,
            }
        )
        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            "1",
            "--worker-class",
            "sync",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--log-level",
            "warning",
            "--graceful-timeout",
            "5",
            "bench._app:app",
        ]
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=_proc.NEUTRAL_CWD,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise _proc.ChildError(f"gunicorn exited {self.proc.returncode}")
            try:
                _get_json(self.base + "/_stats", 1.0)
                return
            except OSError:
                time.sleep(0.1)
        raise _proc.ChildError("gunicorn did not answer in time")

    def close(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()  # gunicorn's graceful stop: workers finish and exit
        _proc.stop(self.proc, grace=8.0)
        return (
            self.proc.stderr.read().decode("utf-8", "replace")[-2000:] if self.proc.stderr else ""
        )


def _load(url: str, seconds: float) -> dict[str, float]:
    wrk = shutil.which("wrk")
    if wrk:
        out = subprocess.run(
            [wrk, "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", url],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        ).stdout
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        errors = re.search(r"Socket errors:.*?timeout (\d+)", out)
        return {
            "rps": rate,
            "errors": float(bad.group(1)) if bad else 0.0,
            "timeouts": float(errors.group(1)) if errors else 0.0,
        }
    out = subprocess.run(
        [sys.executable, "-m", "bench._load", url, str(seconds), str(CONNECTIONS)],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
        env=_proc.child_env(),
        cwd=_proc.NEUTRAL_CWD,
    ).stdout
    data = json.loads(out.strip().splitlines()[-1])
    return {"rps": data["requests"] / data["seconds"], "errors": data["errors"], "timeouts": 0.0}


def _first_window_sent(base: str) -> bool:
    """Whether a tracked server sent its first window (all it queued, or the quota)."""
    stats = _get_json(base + "/_stats")
    return int(stats.get("sent", 0)) >= min(QUOTA, int(stats.get("queued", 0)))


def measure_one(base: str, pid: int, seconds: float) -> dict[str, Any]:
    """Warm a ready server up, then load it for *seconds*: rate, CPU, and the sends in between.

    The warm-up is a second of load, then, for a tracked server, a wait
    (without load) until its first window's quota is sent; untracked
    servers report no sends and go on at once.
    """
    url = base + "/invoice/4242"
    _load(url, _WARMUP_SECONDS)
    deadline = time.monotonic() + _FIRST_WINDOW_TIMEOUT
    while not _first_window_sent(base) and time.monotonic() < deadline:
        time.sleep(0.2)
    before = _get_json(base + "/_stats")
    cpu = _cpu_seconds(pid)
    result = _load(url, seconds)
    result["seconds"] = seconds
    result["cpu_s"] = _cpu_seconds(pid) - cpu
    after = result["stats"] = _get_json(base + "/_stats")
    result["sent_in_window"] = after.get("sent", 0) - before.get("sent", 0)
    for figure in ("caller_s", "threads_s", "gc_s"):
        result[figure] = after.get(figure, 0.0) - before.get(figure, 0.0)
    return result


def measure(sizes: Sizes) -> dict[str, Any]:
    """Alternate fresh untracked, floor and tracked servers under the same load."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in _overhead.VARIANTS}
    with CollectorProcess(rate_limit=2000) as collector:
        for repeat in range(sizes.p6_repeats):
            for variant in _overhead.order(repeat):
                done = runs[variant]
                track = {PLAIN: False, FLOOR: "floor", TRACKED: True}[variant]
                server = _Gunicorn(track, collector)
                try:
                    server.wait_ready()
                    result = measure_one(server.base, server.proc.pid, sizes.p6_seconds)
                finally:
                    server.close()
                done.append(result)
    return {"runs": runs, "client": "wrk" if shutil.which("wrk") else "bench/_load.py"}


def _per_request(run: dict[str, Any], figure: str) -> float:
    return float(run.get(figure, 0.0)) * 1e6 / max(run["rps"] * run["seconds"], 1)


def _own_per_request(tracked: dict[str, Any], plain: dict[str, Any]) -> float:
    """produl's own µs per request: its calls, its threads, and the GC time it added."""
    added_gc = max(0.0, _per_request(tracked, "gc_s") - _per_request(plain, "gc_s"))
    return _per_request(tracked, "caller_s") + _per_request(tracked, "threads_s") + added_gc


def _own_line(runs: dict[str, list[dict[str, Any]]], plain_cpu: Summary, clean: bool) -> Line:
    pairs = list(zip(runs[TRACKED], runs[PLAIN], strict=True))
    own = Summary.of([_own_per_request(t, p) for t, p in pairs])
    counted = Summary.of(
        [1 + _own_per_request(t, p) / max(_per_request(p, "cpu_s"), 1e-9) for t, p in pairs]
    )
    return Line(
        "P6",
        "produl's own CPU per request, counted in the server (calls, threads, added GC)",
        own.show("µs", 3),
        f"untracked {plain_cpu.show('µs', 3)}",
        "",
        f"{counted.median:.3f}x ({counted.low:.3f}..{counted.high:.3f}) untracked",
        "(reported)",
        None,
    )


def _own_note(runs: dict[str, list[dict[str, Any]]]) -> str:
    parts = []
    for tracked, plain in zip(runs[TRACKED], runs[PLAIN], strict=True):
        parts.append(
            f"track_event {_per_request(tracked, 'caller_s'):.1f}, threads "
            f"{_per_request(tracked, 'threads_s'):.1f}, GC {_per_request(tracked, 'gc_s'):.1f} "
            f"(untracked {_per_request(plain, 'gc_s'):.1f})"
        )
    return "Counted per request, µs, repeat by repeat: " + "; ".join(parts) + "."


def run(sizes: Sizes) -> Result:
    """P6 as table rows: CPU per request first, requests/s second, produl's own CPU third."""
    raw = measure(sizes)
    runs = raw["runs"]
    plain = Summary.of([r["rps"] for r in runs[PLAIN]])
    tracked = Summary.of([r["rps"] for r in runs[TRACKED]])
    rps = _overhead.paired_rps_ratio(runs)
    cpu = {variant: _overhead.cpu_per_request(rs) for variant, rs in runs.items()}
    paired = _overhead.paired_cpu_ratio(runs, FLOOR)
    untracked = _overhead.paired_cpu_ratio(runs)
    dropped, errors = _overhead.clean(runs)
    lines = [
        Line(
            "P6",
            "Flask + gunicorn CPU per request (master + worker), 1 event each",
            cpu[TRACKED].show("µs", 3),
            f"floor app (json+put) {cpu[FLOOR].show('µs', 3)}",
            "",
            f"{paired.median:.3f}x ({paired.low:.3f}..{paired.high:.3f}) floor",
            f"≤ {CPU_TARGET:.2f}x floor",
            paired.median <= CPU_TARGET and dropped == 0 and errors == 0,
        ),
        Line(
            "P6",
            "the same, against the untracked app",
            cpu[TRACKED].show("µs", 3),
            f"untracked {cpu[PLAIN].show('µs', 3)}",
            "",
            f"{untracked.median:.3f}x ({untracked.low:.3f}..{untracked.high:.3f}) untracked",
            "(reported)",
            None,
        ),
        Line(
            "P6",
            "Flask + gunicorn, requests/s with 1 event each",
            tracked.show("req/s", 3),
            f"untracked {plain.show('req/s', 3)}",
            "",
            f"{rps.median:.1%} ({rps.low:.1%}..{rps.high:.1%}) of untracked",
            "(reported)",
            None,
        ),
        _own_line(runs, cpu[PLAIN], dropped == 0 and errors == 0),
    ]
    notes = [
        (__doc__ or "").split("\n\n", 1)[1].strip(),
        _overhead.note(raw, sizes),
        (_own.__doc__ or "").split("\n\n", 1)[1].strip(),
        _own_note(runs),
    ]
    return Result("P6", "overhead on a Flask app under gunicorn", lines, notes, raw)
