"""P6's caller share against P1's floor, both measured inside the same real request.

Not part of the suite: ``python -m bench.p6_floor [--seconds 20] [--repeats 2]``.

P1 times ``track_event`` in a tight loop, where its code and data stay in
the CPU's caches. In a Flask request under gunicorn, every call finds them
cold again, and costs several times as much. This runs P6's app twice in
turn, once calling ``track_event`` and once doing only what P1 calls its
floor (``json.dumps`` of the same event and ``Queue.put``), and prints the
thread CPU time of that one call per request (from :mod:`bench._own`), with
the app's whole CPU per request. The floor's share is what any SDK that
encodes on the caller's thread pays at least, in this app.
"""

from __future__ import annotations

import argparse
import json

from bench._collector import CollectorProcess
from bench.p6_app import _Gunicorn, measure_one


def main(argv: list[str] | None = None) -> None:
    """Alternate the floor and produl; print one JSON line per run."""
    parser = argparse.ArgumentParser(prog="python -m bench.p6_floor")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    with CollectorProcess(rate_limit=2000) as collector:
        for _ in range(args.repeats):
            for mode in ("floor", "1"):
                server = _Gunicorn(mode, collector)
                try:
                    server.wait_ready()
                    result = measure_one(server.base, server.proc.pid, args.seconds)
                finally:
                    server.close()
                requests = max(result["rps"] * result["seconds"], 1)
                print(
                    json.dumps(
                        {
                            "call": "json.dumps + Queue.put" if mode == "floor" else "track_event",
                            "call_us": round(result["caller_s"] * 1e6 / requests, 2),
                            "request_us": round(result["cpu_s"] * 1e6 / requests, 1),
                            "rps": round(result["rps"]),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
