"""A smoke run of the benchmark suite (``python -m bench --smoke``), so it cannot rot.

Tiny sizes, every measure, real subprocesses on loopback. It checks that the
summary table and the page are produced and well formed; it asserts nothing
about timings, which on a shared machine would only make the suite flaky.

The peers (segment, posthog), Flask and gunicorn come from
``bench/requirements.txt``. In CI (``CI`` set) they must be installed and the
test fails without them; elsewhere a missing peer is run without and missing
Flask or gunicorn skips the test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest

import produl_server

ROOT = pathlib.Path(__file__).resolve().parent.parent
MEASURES = ["P1", "P2", "P3", "P4", "P5", "P6"]
HEADERS = ["id", "measure", "produl-server", "floor", "peers", "ratio", "target", "met"]
IN_CI = bool(os.environ.get("CI"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module", name="smoke")
def _smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    missing = [m for m in ("flask", "gunicorn") if not _installed(m)]
    if missing and not IN_CI:
        pytest.skip(f"bench requirements not installed: {missing}; see bench/requirements.txt")
    out = tmp_path_factory.mktemp("bench")
    page, raw = out / "performance.rst", out / "raw.json"
    argv = [sys.executable, "-m", "bench", "--smoke", "--out", str(page), "--json", str(raw)]
    # Measure the produl_server this test session imported (the installed
    # wheel under tox), not necessarily the checkout.
    installed_in = pathlib.Path(produl_server.__file__).resolve().parent.parent
    if installed_in != ROOT:
        argv += ["--sdk", str(installed_in)]
    # Not measured by our coverage run: the bench's collector imports the
    # checkout's produl_server, which would count as a second, unrelated copy.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    proc = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=840, check=False
    )
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return {
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "page": page.read_text(encoding="utf-8"),
        "raw": json.loads(raw.read_text(encoding="utf-8")),
    }


def _table_rows(text: str) -> list[list[str]]:
    """Split the fixed-width text table into cells, using its dashed rule for widths."""
    lines = text.splitlines()
    rule = next(line for line in lines if re.fullmatch(r"-+(  -+)+", line))
    spans = [m.span() for m in re.finditer(r"-+", rule)]
    start = lines.index(rule)
    end = len(lines) - 1 - lines[::-1].index(rule)
    rows = []
    for line in lines[start + 1 : end]:
        if line == rule:
            continue
        rows.append(
            [
                line[a : (spans[i + 1][0] if i + 1 < len(spans) else None)].strip()
                for i, (a, _b) in enumerate(spans)
            ]
        )
    return rows


def test_prints_a_table_with_every_measure(smoke: dict[str, Any]) -> None:
    rows = _table_rows(smoke["stdout"])
    assert rows[0] == HEADERS
    body = rows[1:]
    assert sorted({row[0] for row in body}) == MEASURES
    for row in body:
        assert len(row) == len(HEADERS)
        assert row[1], row  # every row names a measure
        assert row[2], row  # and has our figure
        assert row[7] in {"", "yes", "**no**"}, row
    # Every measure has one row with a target and a verdict.
    judged = {row[0] for row in body if row[7]}
    assert judged == set(MEASURES)


def test_figures_are_medians_with_ranges(smoke: dict[str, Any]) -> None:
    body = _table_rows(smoke["stdout"])[1:]
    figure = re.compile(r"[\d.,]+ \([\d.,]+\.\.[\d.,]+\)")
    for row in body:
        if row[2].startswith("not measured") and not IN_CI:
            # P1's redis_url line without a redis-server here (required in CI).
            assert row[7] == "", row
            continue
        assert figure.search(row[2]), row


def test_peers_ran_or_were_allowed_to_be_missing(smoke: dict[str, Any]) -> None:
    p1 = smoke["raw"]["results"]["P1"]
    for peer, module in (("segment", "segment.analytics"), ("posthog", "posthog")):
        if IN_CI or _installed(module):
            assert peer in p1, f"{peer} should have been measured"
        else:
            assert "not installed" in smoke["stderr"]


def test_nothing_left_loopback(smoke: dict[str, Any]) -> None:
    assert "tried to leave loopback" not in smoke["stderr"]


def test_writes_a_page_with_table_machine_and_notes(smoke: dict[str, Any]) -> None:
    page = smoke["page"]
    assert page.startswith("Performance\n===========\n")
    assert ".. list-table:: Summary" in page
    assert "python -m bench --smoke" in page
    for section in ["Machine", *(f"{m}: " for m in MEASURES)]:
        assert section in page
    for key in ("cpu:", "cores:", "python:", "packages:"):
        assert key in page


def test_page_is_valid_restructuredtext(smoke: dict[str, Any]) -> None:
    import docutils.core as docutils_core  # from bench/requirements.txt

    problems: list[str] = []
    docutils_core.publish_doctree(
        smoke["page"],
        settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": _Sink(problems)},
    )
    assert not problems, "".join(problems)


class _Sink:
    def __init__(self, into: list[str]) -> None:
        self.into = into

    def write(self, text: str) -> None:
        self.into.append(text)

    def flush(self) -> None:
        pass


def test_children_ignore_modules_left_in_the_temp_directory(tmp_path: pathlib.Path) -> None:
    # Issue 23: the children ran with the shared temp directory as their
    # working directory, first on sys.path under ``python -m``, so a stray
    # attrs.py there replaced the real one.
    shared_tmp = tmp_path / "shared-tmp"
    shared_tmp.mkdir()
    (shared_tmp / "attrs.py").write_text("raise ImportError('stray attrs.py imported')\n")
    code = (
        "from bench import _proc\n"
        "print('ratio', _proc.run_child('_stats', 'ratio', {'value': 3.0, 'floor': 1.5}, 60))\n"
    )
    env = {**os.environ, "TMPDIR": str(shared_tmp), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ratio 2.0" in done.stdout
