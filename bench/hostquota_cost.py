"""What sharing the quota costs: nanoseconds per ``take()``.

``python bench/hostquota_cost.py [--takes N] [--runs R] [--directory DIR]``

Times ``take()`` of the in-process :class:`RollingQuota` and of the
host-wide :class:`HostQuota` (one process, no contention) in steady state:
a quota of 2,000 per 61 s, with ``now`` advancing 31 ms per take, so each
take lets about one old request leave the window and records one. Prints
the median of R runs of N takes each, and the difference: the cost of
sharing, per request.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

LIMIT = 2000
STEP = 0.031


def per_take(quota, takes: int, start: float) -> float:
    """Nanoseconds per take over *takes* takes."""
    take = quota.take
    began = time.perf_counter_ns()
    for index in range(takes):
        take(start + index * STEP)
    return (time.perf_counter_ns() - began) / takes


def measure(make, takes: int, runs: int) -> float:
    """The median over *runs* fresh quotas, each warmed to a full window first."""
    results = []
    for run in range(runs):
        quota = make(run)
        try:
            start = time.time()
            per_take(quota, LIMIT * 2, start)  # fill the window: steady state
            results.append(per_take(quota, takes, start + LIMIT * 2 * STEP))
        finally:
            getattr(quota, "close", lambda: None)()
    return statistics.median(results)


def main() -> None:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from produl_server._hostquota import HostQuota
    from produl_server._quota import RollingQuota

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--takes", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--directory", help="where the quota file lives (default: a temp dir)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hostquota-bench-") as scratch:
        directory = options.directory or os.path.join(scratch, "quota")
        where: list[str] = []

        def make_shared(run: int) -> HostQuota:
            quota = HostQuota(LIMIT, f"bench-{os.getpid()}-{run}", directory=directory)
            if not quota.shared:
                sys.exit(f"the quota file could not be used in {directory}")
            where.append(quota.path or "")
            return quota

        local = measure(lambda run: RollingQuota(LIMIT), options.takes, options.runs)
        shared = measure(make_shared, options.takes, options.runs)
        for path in where:
            if options.directory:
                os.remove(path)
    print(f"python {sys.version.split()[0]}, {options.runs} runs x {options.takes} takes")
    print(f"file: {os.path.dirname(where[0])} ({_filesystem(directory)})")
    print(f"RollingQuota.take  {local:8.0f} ns")
    print(f"HostQuota.take     {shared:8.0f} ns")
    extra = shared - local
    print(f"sharing costs      {extra:8.0f} ns ({extra / 1000:.1f} us) per take")


def _filesystem(directory: str) -> str:
    """The file system type of *directory*, from /proc/mounts when there is one."""
    try:
        mounts = pathlib.Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "file system unknown"
    best, kind = "", "file system unknown"
    real = os.path.realpath(directory)
    for line in mounts:
        fields = line.split()
        if len(fields) > 2 and real.startswith(fields[1]) and len(fields[1]) >= len(best):
            best, kind = fields[1], fields[2]
    return kind


if __name__ == "__main__":
    main()
