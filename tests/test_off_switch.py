"""The off switch: ``enabled=False`` or ``PRODUL_ENABLED=0`` sends nothing and needs no key."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from produl_server import ConfigurationError, InvalidEventError, Produl
from produl_server._config import Config


@pytest.fixture(name="no_key")
def _no_key(monkeypatch):
    for name in ("PRODUL_SERVER_KEY", "PRODUL_ENABLED", "PRODUL_API_URL"):
        monkeypatch.delenv(name, raising=False)


def test_a_disabled_client_needs_no_key_and_still_validates(no_key, tmp_path):
    before = set(threading.enumerate())
    spool = tmp_path / "spool"
    quota = tmp_path / "quota"
    quota.mkdir()
    produl = Produl(enabled=False, spool_dir=spool, quota_dir=quota, flush_interval=0.01)
    assert "disabled" in repr(produl)
    produl.track_event("signup", {"plan": "pro"}, visitor_id="u1")
    produl.track_pageview(path="/pricing", visitor_id="u1")
    with pytest.raises(InvalidEventError, match="path"):
        produl.track_pageview(path="pricing", visitor_id="u1")
    with pytest.raises(InvalidEventError, match="name"):
        produl.track_event("")
    assert produl.flush(timeout=5)
    produl.shutdown(timeout=5)
    assert set(threading.enumerate()) <= before  # no sender was started
    assert not spool.exists()  # no spool was opened
    assert list(quota.iterdir()) == []  # nor the shared quota's file
    assert produl.stats.sent == 0


def test_produl_enabled_0_in_the_environment_turns_it_off(no_key, monkeypatch):
    monkeypatch.setenv("PRODUL_ENABLED", "0")
    produl = Produl()
    assert produl.config.enabled is False
    # An explicit argument wins over the variable.
    with pytest.raises(ConfigurationError, match="no server key"):
        Produl(enabled=True)
    for word, expected in [("off", False), ("FALSE", False), ("1", True), ("yes", True)]:
        config = Config.from_env("sk_test_1234", None, {"PRODUL_ENABLED": word})
        assert config.enabled is expected
    with pytest.raises(ConfigurationError, match="PRODUL_ENABLED must be 1 or 0"):
        Config.from_env("sk_test_1234", None, {"PRODUL_ENABLED": "maybe"})


def test_an_enabled_client_still_needs_a_key(no_key):
    with pytest.raises(ConfigurationError, match="no server key"):
        Produl()


def test_a_disabled_client_sends_nothing_to_the_collector(produl_collector, monkeypatch):
    monkeypatch.setenv("PRODUL_ENABLED", "off")
    produl = Produl(produl_collector.server_key, api_url=produl_collector.url)
    produl.track_event("e", visitor_id="u1")
    assert produl.flush(timeout=5)
    produl.shutdown(timeout=5)
    assert produl_collector.requests == []


def test_a_disabled_process_exits_at_once_with_no_thread(tmp_path):
    script = textwrap.dedent(
        """
        import threading
        from produl_server import Produl
        produl = Produl()
        for i in range(100):
            produl.track_event("e", {"i": i}, visitor_id="u1")
        print(sorted(t.name for t in threading.enumerate()))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRODUL_")}
    env["PRODUL_ENABLED"] = "0"
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['MainThread']"
    assert done.stderr == ""


@pytest.fixture(name="tracking_off")
def _tracking_off(monkeypatch):
    monkeypatch.setenv("PRODUL_ENABLED", "0")


def test_the_plugin_s_client_delivers_even_with_produl_enabled_0(
    tracking_off, produl, produl_collector
):
    assert os.environ["PRODUL_ENABLED"] == "0"  # set before the fixture built its client
    produl.track_event("e", visitor_id="u1")
    assert produl.flush(timeout=10)
    assert [event["n"] for event in produl_collector.events] == ["e"]
