"""What a measure hands back, and the table and page made from it."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import attrs


@attrs.define
class Line:
    """One row of the summary table."""

    id: str
    what: str
    produl: str
    floor: str
    peers: str
    ratio: str
    target: str
    met: bool | None
    """``None`` when the row has no target of its own."""


@attrs.define
class Result:
    """One measure's outcome: table rows, notes for the page, raw data."""

    id: str
    title: str
    lines: list[Line]
    notes: list[str] = attrs.Factory(list)
    data: dict[str, Any] = attrs.Factory(dict)


@attrs.frozen
class Sizes:
    """How big each measure runs; ``full`` is the one published."""

    mode: str
    p1_calls: int
    p1_rounds: int
    p2_events: int
    p2_repeats: int
    p3_runs: int
    p4_events: int
    p4_repeats: int
    p5_backlog: int
    p5_window: float
    p5_slice: float
    p6_seconds: float
    p6_repeats: int
    p8_runs: int
    p9_modes: int
    """How many of the collector's rate-limit shapes P9 runs (bucket, fixed, sliding)."""
    p10_queue: int = 10_000
    p10_calls: int = 200_000
    p10_repeats: int = 3


SIZES = {
    # P6 and P7 measure 61 s in a full run: one whole quota window, after
    # the first one is sent, so the sender's work in it is what a busy app
    # pays per window.
    "full": Sizes(
        "full",
        20_000,
        7,
        20_000,
        5,
        15,
        10_000,
        5,
        5_000,
        200.0,
        20.0,
        61.0,
        5,
        5,
        3,
        10_000,
        200_000,
        5,
    ),
    "quick": Sizes("quick", 5_000, 5, 5_000, 3, 7, 10_000, 3, 500, 40.0, 10.0, 20.0, 2, 3, 3),
    "smoke": Sizes("smoke", 300, 2, 200, 2, 2, 300, 2, 30, 8.0, 2.0, 1.0, 2, 1, 1, 300, 2_000, 1),
}


def met_text(met: bool | None) -> str:
    """The "met" cell."""
    return "" if met is None else ("yes" if met else "**no**")


def machine() -> dict[str, str]:
    """What the run ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for row in info:
                if row.startswith("model name"):
                    cpu = row.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "executable": sys.executable,
    }


HEADERS = ("id", "measure", "produl-server", "floor", "peers", "ratio", "target", "met")


def _cells(line: Line) -> list[str]:
    return [
        line.id,
        line.what,
        line.produl,
        line.floor,
        line.peers,
        line.ratio,
        line.target,
        met_text(line.met),
    ]


def rst_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A ``list-table`` directive, to be used as one of a result's notes."""
    out = [f".. list-table:: {title}", "   :header-rows: 1", ""]
    for row in [list(headers), *rows]:
        cells = [cell or "\\" for cell in row]
        out.append(f"   * - {cells[0]}")
        out += [f"     - {cell}" for cell in cells[1:]]
    return "\n".join(out)


def text_table(results: Sequence[Result]) -> str:
    """The summary as a plain-text table for the terminal."""
    rows = [list(HEADERS)] + [_cells(line) for r in results for line in r.lines]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    rule = "  ".join("-" * w for w in widths)
    out = [rule]
    for index, row in enumerate(rows):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            out.append(rule)
    out.append(rule)
    return "\n".join(out)


def rst_page(
    results: Sequence[Result],
    info: dict[str, str],
    command: str,
    versions: dict[str, str],
    sizes: Sizes,
) -> str:
    """``docs/performance.rst``: the table, the machine, and notes per measure."""
    title = "Performance"
    out = [title, "=" * len(title), ""]
    out += [
        "This page is written by the benchmark suite; do not edit it by hand.",
        "Regenerate it from the repository root with::",
        "",
        f"    {command}",
        "",
        "Every figure is measured several times and shown as the median with",
        "min..max in brackets. Each is also shown as a ratio to a floor measured",
        "in the same run, on the same machine, because absolute times on a shared",
        "machine mean little. Peers run in the same run with the same event.",
        "",
        ".. list-table:: Summary",
        "   :header-rows: 1",
        "",
    ]
    for row in [list(HEADERS)] + [_cells(line) for r in results for line in r.lines]:
        out.append("   * - " + (row[0] or "\\"))
        out += [f"     - {cell}" if cell else "     -" for cell in row[1:]]
    out += ["", "Machine", "-------", ""]
    for key in ("cpu", "cores", "os", "python", "date"):
        out.append(f"- {key}: {info[key]}")
    if "load_before" in info:
        out.append(
            f"- load average (1, 5, 15 min) before: {info['load_before']}; "
            f"after: {info.get('load_after', '-')}"
        )
    out.append("- packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    out.append(
        f"- sizes: ``{sizes.mode}`` ("
        + ", ".join(
            f"{field.name}={getattr(sizes, field.name)}"
            for field in attrs.fields(Sizes)
            if field.name != "mode"
        )
        + ")"
    )
    out.append("")
    for result in results:
        heading = f"{result.id}: {result.title}"
        out += [heading, "-" * len(heading), ""]
        for note in result.notes:
            out += [note, ""]
    return "\n".join(out).rstrip() + "\n"
