"""A bare ``pytest`` runs the fast tier; the slow tier skips what it lacks (issue 23).

Each test runs pytest's collection in a subprocess where the frameworks of
the slow tier cannot be imported, as on a machine that installed only the
package and its test extra.
"""

from __future__ import annotations

import configparser
import os
import pathlib
import subprocess
import sys

import pytest

import produl_server

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: Makes the slow tier's frameworks unimportable in the child.
BLOCKER = """
import sys
BLOCKED = {"httpx", "fastapi", "uvicorn", "django", "flask", "celery", "gunicorn", "playwright",
           "rq", "dramatiq", "huey", "arq"}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocker())
"""


def collect(tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    package_parent = pathlib.Path(produl_server.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(package_parent)]))
    env.pop("COVERAGE_PROCESS_START", None)
    # Run outside the checkout: the tests directory as the only argument
    # finds the checkout's pyproject.toml, as ``pytest`` in a clone does.
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "tests"), "--collect-only", "-q", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_bare_pytest_collects_the_fast_tier_only(tmp_path: pathlib.Path) -> None:
    done = collect(tmp_path, "-p", "no:cacheprovider")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert collected
    assert not [line for line in collected if "integrations/" in line]
    assert not [line for line in collected if "test_web_browser" in line]


def test_the_slow_tier_skips_missing_frameworks_with_a_reason(tmp_path: pathlib.Path) -> None:
    done = collect(tmp_path, "-p", "no:cacheprovider", "-m", "integration", "-rs")
    assert done.returncode in (0, 5), done.stdout[-3000:] + done.stderr[-2000:]
    assert "error" not in done.stdout.lower()
    assert "could not import 'httpx'" in done.stdout
    assert "test_asgi_uvicorn.py" in done.stdout
    for queue in ("dramatiq", "huey", "arq"):
        assert f"{queue} is not installed (produl-server[{queue}])" in done.stdout


def test_the_default_tox_run_needs_only_the_running_python() -> None:
    # Issue 23: the README's one command failed on a machine with one Python
    # ("could not find python interpreter" for py310, py312, py313, tests-min).
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini", encoding="utf-8")
    default = [name.strip() for name in tox["tox"]["env_list"].split(",")]
    assert default == ["lint", "typing", "pkg", "docs", "py", "integration"]
    pinned = [name for name in default if tox.has_option(f"testenv:{name}", "basepython")]
    assert pinned == []
    # Every supported Python, and the floors, in the second command.
    labels = {
        key.strip(): value
        for key, value in (line.split("=", 1) for line in tox["tox"]["labels"].strip().splitlines())
    }
    pythons = [name.strip() for name in labels["pythons"].split(",")]
    assert pythons == ["py310", "py311", "py312", "py313", "tests-min"]
