"""``default_properties``: the properties every custom event carries."""

from __future__ import annotations

import datetime

import pytest

from produl_server import ConfigurationError, InvalidEventError, Produl
from produl_server._config import Config


def test_defaults_are_merged_under_the_call_s_own(produl_collector, make_client):
    defaults = {"environment": "prod", "release": "1.2.3", "service": "api"}
    produl = make_client(default_properties=defaults)
    defaults["release"] = "changed later"  # copied at construction
    produl.track_event("a", visitor_id="u1")
    produl.track_event("b", {"service": "billing", "plan": "pro"}, visitor_id="u1")
    produl.track_pageview(path="/", visitor_id="u1")  # pageviews carry no properties
    assert produl.flush(timeout=10)
    events = produl_collector.events
    assert events[0]["pr"] == {"environment": "prod", "release": "1.2.3", "service": "api"}
    assert events[1]["pr"] == {
        "environment": "prod",
        "release": "1.2.3",
        "service": "billing",
        "plan": "pro",
    }
    assert "pr" not in events[2]


def test_defaults_are_converted_and_validated_once_naming_the_property():
    when = datetime.date(2026, 1, 2)
    config = Config(server_key="sk_test_1234", default_properties={"since": when})
    assert config.default_properties == {"since": "2026-01-02"}
    with pytest.raises(ConfigurationError, match=r'default_properties\["region"\]'):
        Produl("sk_test_1234", default_properties={"region": {1, 2}})
    with pytest.raises(ConfigurationError, match=r"default_properties.*dict"):
        Produl("sk_test_1234", default_properties=["env"])  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="over the 65536-byte limit"):
        Produl("sk_test_1234", default_properties={"big": "x" * 70_000})


def test_defaults_count_toward_the_size_limit(make_client):
    produl = make_client(default_properties={"big": "x" * 40_000})
    with pytest.raises(InvalidEventError, match="over the 65536-byte limit"):
        produl.track_event("e", {"more": "y" * 30_000}, visitor_id="u1")


def test_defaults_from_the_environment_as_a_json_object():
    environ = {"PRODUL_SERVER_KEY": "sk_test_1234"}
    environ["PRODUL_DEFAULT_PROPERTIES"] = '{"environment": "staging", "region": "eu"}'
    config = Config.from_env(None, None, environ)
    assert config.default_properties == {"environment": "staging", "region": "eu"}
    # The argument wins over the variable.
    given = Config.from_env(None, None, environ, default_properties={"environment": "dev"})
    assert given.default_properties == {"environment": "dev"}
    environ["PRODUL_DEFAULT_PROPERTIES"] = "[1]"
    with pytest.raises(ConfigurationError, match="PRODUL_DEFAULT_PROPERTIES must be a JSON object"):
        Config.from_env(None, None, environ)
    environ["PRODUL_DEFAULT_PROPERTIES"] = "{environment: prod}"
    with pytest.raises(ConfigurationError, match="PRODUL_DEFAULT_PROPERTIES must be a JSON object"):
        Config.from_env(None, None, environ)
