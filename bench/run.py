"""Run the suite: ``python -m bench [--quick | --smoke] [--only P1,P2] [--sdk DIR]``.

Prints the summary table and, after a full run of all ten measures, writes
``docs/performance.rst``. ``--quick`` and ``--smoke`` are for development
and tests; they write the page only with an explicit ``--out``.
Exit status: 0 when the suite ran (whether or not targets were met), 1 when
a measure failed, 2 for bad arguments or peers missing in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import attrs

from bench import _guard, _proc, _report, _sdks
from bench._report import Result, Sizes

MEASURES = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P10")
# --smoke leaves P7 (FastAPI under uvicorn), P8 (the exit curve) and P9 (a
# fleet behind one IP) out on purpose: P7 is P6's method on another server,
# P8 is P3's script with 1,000 events (it takes a minute even when tiny), P9
# runs nine processes for 15 s twice per window shape and needs a
# redis-server, and tests/test_bench_smoke.py checks P1..P6 only. Run them
# with --only P7,P8,P9 (or a full or --quick run, which include them).
SMOKE_MEASURES = MEASURES[:6]
DEFAULT_PAGE = _proc.ROOT / "docs" / "performance.rst"


def _runners(sizes: Sizes, peers: list[str]) -> dict[str, Callable[[], Result]]:
    from bench import (
        p1_caller,
        p2_sender,
        p3_exit,
        p4_memory,
        p5_quota,
        p6_app,
        p7_asgi,
        p8_exit_curve,
        p9_fleet,
        p10_full_queue,
    )

    return {
        "P1": lambda: p1_caller.run(sizes, peers),
        "P2": lambda: p2_sender.run(sizes),
        "P3": lambda: p3_exit.run(sizes, peers),
        "P4": lambda: p4_memory.run(sizes, peers),
        "P5": lambda: p5_quota.run(sizes),
        "P6": lambda: p6_app.run(sizes),
        "P7": lambda: p7_asgi.run(sizes),
        "P8": lambda: p8_exit_curve.run(sizes),
        "P9": lambda: p9_fleet.run(sizes),
        "P10": lambda: p10_full_queue.run(sizes),
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="mode",
        help="smaller sizes, a few minutes in all (P5 backlog 500)",
    )
    size.add_argument(
        "--smoke",
        action="store_const",
        const="smoke",
        dest="mode",
        help="tiny sizes: checks that everything runs, figures mean nothing",
    )
    parser.add_argument(
        "--only",
        help="comma-separated measures to run, e.g. P1,P2 (default: all; P1..P6 with --smoke)",
    )
    parser.add_argument(
        "--sdk",
        help="measure the produl_server package found in this "
        "directory (another checkout) instead of this tree's",
    )
    parser.add_argument(
        "--out", type=Path, help=f"write the page here (default after a full run: {DEFAULT_PAGE})"
    )
    parser.add_argument("--json", type=Path, help="also write every raw figure as JSON")
    parser.add_argument(
        "--no-peers", action="store_true", help="skip segment and posthog (refused when CI is set)"
    )
    args = parser.parse_args(argv)
    args.mode = args.mode or "full"
    if args.only is None:
        args.only = ",".join(SMOKE_MEASURES if args.mode == "smoke" else MEASURES)
    args.only = [m.strip().upper() for m in args.only.split(",") if m.strip()]
    unknown = [m for m in args.only if m not in MEASURES]
    if unknown:
        parser.error(f"unknown measure(s) {', '.join(unknown)}; choose from {', '.join(MEASURES)}")
    return args


def _peers(args: argparse.Namespace) -> list[str] | str:
    """The peers to run, or an error message."""
    in_ci = bool(os.environ.get("CI"))
    if args.no_peers:
        return "--no-peers is refused in CI: the comparison is the point" if in_ci else []
    missing = [p for p in _sdks.PEERS if not _sdks.available(p)]
    if missing and in_ci:
        return (
            f"peer SDK(s) not installed: {', '.join(missing)}; "
            "pip install -r bench/requirements.txt"
        )
    if missing:
        print(
            f"bench: warning: {', '.join(missing)} not installed; running without "
            "(pip install -r bench/requirements.txt)",
            file=sys.stderr,
        )
    return [p for p in _sdks.PEERS if p not in missing]


def main(argv: list[str] | None = None) -> int:
    """Run the suite; see the module docstring."""
    args = _parse(argv)
    peers = _peers(args)
    if isinstance(peers, str):
        print(f"bench: error: {peers}", file=sys.stderr)
        return 2
    source = _source(args.sdk)
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as snapshot:
        # Children import produl_server from snapshots taken now, not from a
        # tree someone may be editing while the run goes on.
        _copy_package(_proc.ROOT, Path(snapshot, "tree"))
        os.environ[_proc.TREE_PATH_VARIABLE] = str(Path(snapshot, "tree"))
        if args.sdk:
            _copy_package(Path(args.sdk).resolve(), Path(snapshot, "sdk"))
            os.environ[_proc.SDK_PATH_VARIABLE] = str(Path(snapshot, "sdk"))
        return _run(args, peers, source)


def _copy_package(home: Path, into: Path) -> None:
    package = home / "produl_server"
    if not package.is_dir():
        raise SystemExit(f"bench: error: no produl_server package in {home}")
    shutil.copytree(
        package, into / "produl_server", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )


def _run(args: argparse.Namespace, peers: list[str], source: str) -> int:
    _guard.install()  # the runner only ever talks to its own children
    sizes = _report.SIZES[args.mode]
    runners = _runners(sizes, peers)
    info = _report.machine()
    info["load_before"] = _loadavg()
    results: list[Result] = []
    failed: list[str] = []
    for measure in args.only:
        started = time.monotonic()
        print(f"bench: {measure} ...", file=sys.stderr, flush=True)
        try:
            results.append(runners[measure]())
        except Exception:
            failed.append(measure)
            traceback.print_exc()
        print(
            f"bench: {measure} took {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True
        )
    info["load_after"] = _loadavg()
    refused = sorted({addr for r in results for addr in _refused(r.data)})
    print(_report.text_table(results))
    if refused:
        print(f"bench: error: a process tried to leave loopback: {refused}", file=sys.stderr)
        failed.append("loopback guard")
    versions = {
        "produl-server": _sdks.version(_sdks.PRODUL) + source,
        **{p: _sdks.version(p) for p in peers},
    }
    command = "python -m bench" + ("" if args.mode == "full" else f" --{args.mode}")
    page = _report.rst_page(results, info, command, versions, sizes)
    out = args.out
    if out is None and args.mode == "full" and list(args.only) == list(MEASURES) and not failed:
        out = DEFAULT_PAGE
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
        print(f"bench: wrote {out}", file=sys.stderr)
    if args.json:
        data = {
            "machine": info,
            "versions": versions,
            "sizes": attrs.asdict(sizes),
            "results": {r.id: r.data for r in results},
        }
        args.json.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _source(sdk: str | None) -> str:
    """Which produl_server source is measured: a checkout or this tree's git state."""
    if sdk:
        return f" from {Path(sdk).resolve()}"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=_proc.ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "produl_server"],
            cwd=_proc.ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" (git {head.strip()}{', with uncommitted changes' if dirty.strip() else ''})"


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "-"


def _refused(data: object) -> list[str]:
    """Every ``refused`` address a child reported, anywhere in its raw data."""
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "refused" and isinstance(value, list):
                found += [str(v) for v in value]
            else:
                found += _refused(value)
    elif isinstance(data, list):
        for item in data:
            found += _refused(item)
    return found
