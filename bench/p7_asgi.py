"""P7, overhead on an ASGI app: FastAPI under uvicorn, with and without Produl.

``bench/_asgi_app.py`` serves a small JSON endpoint; tracked, it runs behind
:class:`~produl_server.integrations.asgi.ProdulMiddleware` and each request
calls ``track_event`` once, its path, URL and visitor filled in from the
request context. uvicorn runs one process (the event loop in its main
thread); the load client and the way each repeat runs are P6's: fresh
servers, each variant first in turn, a warm-up that lasts until the
tracked client's first window is sent, then the measurement (61 s in a
full run: one whole quota window, see P6), the figures paired repeat by
repeat.

Three variants, as in P6: untracked; the floor, a no-op pure-ASGI
middleware and, in the endpoint, ``json.dumps`` and ``Queue.put`` of the same
event; and tracked. The figure judged is the CPU time the uvicorn process
spent per request (from ``/proc``), tracked against the floor: requests per
second on a shared 2-core machine swing with whatever else runs, CPU per
request much less.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from typing import Any

from bench import _overhead, _proc
from bench._collector import CollectorProcess
from bench._overhead import FLOOR, PLAIN, TRACKED
from bench._report import Line, Result, Sizes
from bench._stats import Summary, ratio
from bench.p6_app import _free_port, _get_json, measure_one

#: The target (issue #22): CPU per request with the middleware and one event
#: at most 1.05x the floor app's, paired by repeat, median.
TARGET = 1.05


class _Uvicorn:
    def __init__(self, track: str, collector: CollectorProcess) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = _proc.child_env(
            {
                "BENCH_TRACK": track,
                "BENCH_COLLECTOR": collector.url,
                "BENCH_KEY": collector.key,
            }
        )
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
            "bench._asgi_app:app",
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
                raise _proc.ChildError(f"uvicorn exited {self.proc.returncode}")
            try:
                _get_json(self.base + "/_stats", 1.0)
                return
            except OSError:
                time.sleep(0.1)
        raise _proc.ChildError("uvicorn did not answer in time")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # graceful: the lifespan shutdown runs
        _proc.stop(self.proc, grace=8.0)
        if self.proc.stderr:
            self.proc.stderr.close()


def _one(track: str, collector: CollectorProcess, seconds: float) -> dict[str, Any]:
    server = _Uvicorn(track, collector)
    try:
        server.wait_ready()
        result = measure_one(server.base, server.proc.pid, seconds)
    finally:
        server.close()
    return result


def measure(sizes: Sizes) -> dict[str, Any]:
    """Alternate fresh untracked, floor and tracked servers under the same load (P6's sizes)."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in _overhead.VARIANTS}
    with CollectorProcess(rate_limit=2000) as collector:
        for repeat in range(sizes.p6_repeats):
            for variant in _overhead.order(repeat):
                track = {PLAIN: "0", FLOOR: "floor", TRACKED: "1"}[variant]
                runs[variant].append(_one(track, collector, sizes.p6_seconds))
    return {"runs": runs, "client": "wrk" if shutil.which("wrk") else "bench/_load.py"}


def run(sizes: Sizes) -> Result:
    """P7 as table rows."""
    raw = measure(sizes)
    runs = raw["runs"]
    rps = {v: Summary.of([r["rps"] for r in rs]) for v, rs in runs.items()}
    cpu = {variant: _overhead.cpu_per_request(rs) for variant, rs in runs.items()}
    paired = _overhead.paired_cpu_ratio(runs, FLOOR)
    untracked = _overhead.paired_cpu_ratio(runs)
    dropped, errors = _overhead.clean(runs)
    lines = [
        Line(
            "P7",
            "FastAPI + uvicorn CPU per request, middleware + 1 event",
            cpu[TRACKED].show("µs", 3),
            f"floor app (no-op middleware, json+put) {cpu[FLOOR].show('µs', 3)}",
            "",
            f"{paired.median:.3f}x ({paired.low:.3f}..{paired.high:.3f}) floor",
            f"≤ {TARGET:.2f}x floor",
            paired.median <= TARGET and dropped == 0 and errors == 0,
        ),
        Line(
            "P7",
            "the same, against the untracked app",
            cpu[TRACKED].show("µs", 3),
            f"untracked {cpu[PLAIN].show('µs', 3)}",
            "",
            f"{untracked.median:.3f}x ({untracked.low:.3f}..{untracked.high:.3f}) untracked",
            "(reported)",
            None,
        ),
        Line(
            "P7",
            "FastAPI + uvicorn, requests/s",
            rps[TRACKED].show("req/s", 3),
            f"untracked {rps[PLAIN].show('req/s', 3)}",
            "",
            f"{ratio(rps[TRACKED].median, rps[PLAIN].median):.1%} of untracked",
            "(reported)",
            None,
        ),
    ]
    notes = [(__doc__ or "").split("\n\n", 1)[1].strip(), _overhead.note(raw, sizes)]
    return Result("P7", "overhead on a FastAPI app under uvicorn", lines, notes, raw)
