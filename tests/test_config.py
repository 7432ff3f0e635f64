"""Configuration: every bad option fails at construction, with a clear message."""

from __future__ import annotations

import logging

import pytest

from produl_server import ConfigurationError, Produl
from produl_server._config import Config, is_loopback, mask_key

KEY = "sk_live_0123456789abcdef"


def test_missing_key_names_the_environment_variable(monkeypatch):
    monkeypatch.delenv("PRODUL_SERVER_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="PRODUL_SERVER_KEY"):
        Produl()
    with pytest.raises(ValueError, match="PRODUL_SERVER_KEY"):
        Produl(server_key="   ")


def test_key_and_url_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("PRODUL_SERVER_KEY", KEY)
    monkeypatch.setenv("PRODUL_API_URL", "http://127.0.0.1:9")
    produl = Produl(enabled=False)
    assert produl.config.server_key == KEY
    assert produl.config.api_url == "http://127.0.0.1:9"


def test_default_url_is_production(monkeypatch):
    monkeypatch.delenv("PRODUL_API_URL", raising=False)
    assert Produl(KEY, enabled=False).config.api_url == "https://app.produl.tech"


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"api_url": "ftp://example.com"}, "http:// or https://"),
        ({"api_url": "app.produl.tech"}, "http:// or https://"),
        ({"api_url": "https://h/?x=1"}, "query or fragment"),
        ({"api_url": 5}, "api_url must be a string"),
        ({"flush_at": 0}, "flush_at must be an integer >= 1"),
        ({"flush_at": 2.5}, "flush_at"),
        ({"flush_interval": 0}, "flush_interval must be more than 0 and at most 86400"),
        ({"flush_interval": float("nan")}, "flush_interval"),
        ({"flush_interval": "5"}, "flush_interval must be a number"),
        ({"max_delay": -1}, "max_delay"),
        ({"max_queue_size": 0}, "max_queue_size"),
        ({"shutdown_timeout": -1}, "shutdown_timeout must be from 0 to 86400 seconds"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"max_requests_per_minute": 0}, "max_requests_per_minute"),
        ({"max_retry_time": -5}, "max_retry_time"),
        ({"retry_initial_delay": 2, "retry_max_delay": 1}, "retry_max_delay must be >="),
        ({"enabled": "yes"}, "enabled must be True or False"),
        ({"sync_mode": 1}, "sync_mode must be True or False"),
        ({"on_error": "log"}, "on_error must be callable"),
        ({"proxy": "socks5://p:1"}, "proxy must be an http"),
        ({"verify": 3}, "verify must be"),
        ({"colour": "red"}, "unexpected keyword argument 'colour'"),
    ],
)
def test_invalid_options_fail_at_construction(options, fragment):
    with pytest.raises(ConfigurationError, match=fragment.replace("?", r"\?")):
        Config.from_env(KEY, options.pop("api_url", None), environ={}, **options)


def test_unknown_keyword_on_the_client_is_a_type_error():
    with pytest.raises(TypeError, match="colour"):
        Produl(KEY, colour="red")  # type: ignore[call-arg]


def test_rate_pacer_can_be_turned_off():
    assert Config.from_env(KEY, None, environ={}, max_requests_per_minute=None)


def test_plain_http_to_a_remote_host_warns_but_loopback_does_not(caplog):
    with caplog.at_level(logging.WARNING, logger="produl_server"):
        Config.from_env(KEY, "http://127.0.0.1:8787", environ={})
        Config.from_env(KEY, "http://[::1]:8787", environ={})
        Config.from_env(KEY, "http://localhost:8787", environ={})
        assert not caplog.records
        Config.from_env(KEY, "http://analytics.example.com", environ={})
    assert len(caplog.records) == 1
    assert "unencrypted" in caplog.records[0].getMessage()
    assert KEY not in caplog.text


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("[::1]", True),
        ("localhost", True),
        ("a.localhost", True),
        ("10.0.0.1", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


def test_mask_key_shows_only_the_last_four():
    assert mask_key(KEY) == "sk_…cdef"
    assert mask_key("short") == "…"
    assert mask_key("xx_0123456789") == "…6789"


def test_reprs_never_show_the_key():
    produl = Produl(KEY, enabled=False)
    for text in (repr(produl), repr(produl.config), str(produl.config)):
        assert KEY not in text
        assert "cdef" in text


def test_whitespace_in_key_is_refused_without_echoing_it():
    with pytest.raises(ConfigurationError) as info:
        Produl(KEY + "\n")
    assert KEY not in str(info.value)
