"""The opt-in pytest plugin, run the way users run it: pytest in a subprocess."""

from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys
import textwrap

import pytest

from produl_server import Produl
from produl_server.testing import LocalCollector

pytestmark = pytest.mark.slow

USER_TESTS = """
def test_signup_is_tracked(produl, produl_collector):
    produl.track_event("signup", {"plan": "pro"}, visitor_id="u1")
    produl_collector.assert_event("signup", visitor_id="u1", properties={"plan": "pro"}, timeout=10)

def test_each_test_starts_empty(produl_collector):
    produl_collector.assert_no_events()

def test_pageview(produl, produl_collector):
    produl.track_pageview(path="/pricing", visitor_id="u2")
    assert produl.flush(timeout=10)
    assert produl_collector.assert_pageview("/pricing")["vi"] == "u2"

def test_wrong_expectation(produl, produl_collector):
    produl.track_event("signup", visitor_id="u1")
    assert produl.flush(timeout=10)
    produl_collector.assert_event("checkout", visitor_id="u1")
"""


def run_pytest(tmp_path: pathlib.Path, *options: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", *options],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_users_tests_work_with_the_fixtures(tmp_path: pathlib.Path) -> None:
    result = run_pytest(tmp_path, "-p", "produl_server.pytest_plugin")

    assert "1 failed, 3 passed" in result.stdout, result.stdout + result.stderr
    # The failure explains itself: what was expected and what arrived.
    assert "no event with name='checkout', visitor_id='u1'" in result.stdout
    assert "received: [event signup visitor=u1]" in result.stdout


def test_the_plugin_is_never_loaded_automatically(tmp_path: pathlib.Path) -> None:
    result = run_pytest(tmp_path)

    assert "fixture 'produl' not found" in result.stdout
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"] == "produl-server":
            groups = {ep.group for ep in dist.entry_points}
            assert "pytest11" not in groups


def test_our_fixtures_are_wired_together(produl: Produl, produl_collector: LocalCollector) -> None:
    assert produl.config.api_url == produl_collector.url
    produl.track_event("wired", visitor_id="me")
    assert produl.flush(timeout=10)
    assert produl_collector.assert_event("wired")["vi"] == "me"
    assert produl_collector.find_events(type="ev", n="wired", vi="me") != []
    with pytest.raises(TypeError, match="unknown event field"):
        produl_collector.find_events(colour="red")
