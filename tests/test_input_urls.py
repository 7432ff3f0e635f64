"""Credentials in URLs are masked wherever a URL is shown (issue #9, item 2).

``repr(config)`` used to show the proxy password, errors about a bad proxy or
api_url repeated it, and ``api_url="http://user:pass@host"`` was accepted
(its credentials never sent) and printed by ``repr(Produl)``.
"""

from __future__ import annotations

import base64
import logging
import socket
import traceback
from urllib.parse import quote

import pytest

from produl_server import ConfigurationError, Produl
from produl_server._config import Config, mask_url

KEY = "sk_live_0123456789abcdef"
PASSWORD = "Pr0xyPassw0rd"


def traceback_of(error: BaseException) -> str:
    """What an uncaught error prints, chained exceptions included."""
    return "".join(traceback.format_exception(error))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://u:pw@h:3128", "http://u:***@h:3128"),
        ("socks5://u:pw@h:1080", "socks5://u:***@h:1080"),
        ("http://token@h", "http://***@h"),
        ("http://u:@h", "http://u:***@h"),
        ("u:pw@h:1080", "u:***@h:1080"),  # no scheme
        ("http://u:p/w#x@h/path", "http://u:***@h/path"),  # unescaped / and #
        ("http://u:p@w@h", "http://u:***@h"),  # unescaped @
        ("u:pw@h//x", "u:***@h//x"),
        ("https://app.produl.tech/base", "https://app.produl.tech/base"),
        ("", ""),
    ],
)
def test_mask_url(url, shown):
    assert mask_url(url) == shown


def test_config_repr_masks_the_proxy_password():
    config = Config.from_env(KEY, None, environ={}, proxy=f"http://analytics:{PASSWORD}@p:3128")
    assert config.proxy == f"http://analytics:{PASSWORD}@p:3128"  # kept for use
    for text in (repr(config), str(config)):
        assert PASSWORD not in text
        assert "proxy='http://analytics:***@p:3128'" in text
    assert "proxy=None" in repr(Config.from_env(KEY, None, environ={}))


@pytest.mark.parametrize(
    ("proxy", "fragment"),
    [
        (f"socks5://u:{PASSWORD}@h:1080", "'socks5://u:***@h:1080'"),
        (f"http://u:{PASSWORD}/x@h:3128", "'http://u:***@h:3128'"),  # unparseable
        (f"u:{PASSWORD}@h:3128", "'u:***@h:3128'"),
        (f"http://u:{PASSWORD}@:3128", "'http://u:***@:3128'"),  # no host
    ],
)
def test_a_bad_proxy_error_masks_the_password(proxy, fragment, caplog):
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigurationError) as info:
        Produl(KEY, proxy=proxy, enabled=False)
    assert "proxy must be an http:// or https:// URL" in str(info.value)
    assert fragment in str(info.value)
    for text in (str(info.value), traceback_of(info.value), caplog.text):
        assert PASSWORD not in text


@pytest.mark.parametrize(
    "api_url",
    [
        f"http://user:{PASSWORD}@collector.example.com",
        f"https://user:{PASSWORD}@127.0.0.1:8787/base",
        f"http://{PASSWORD}@collector.example.com",
        f"http://user:{PASSWORD}/x@collector.example.com",  # unparseable
        f"ftp://user:{PASSWORD}@collector.example.com",
    ],
)
def test_credentials_in_api_url_are_refused_without_repeating_them(api_url, caplog):
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigurationError) as info:
        Produl(KEY, api_url=api_url, enabled=False)
    assert "api_url must not contain user:password@" in str(info.value)
    for text in (str(info.value), traceback_of(info.value), caplog.text):
        assert PASSWORD not in text
    assert not caplog.records  # refused before the plain-http warning


def test_an_unparseable_api_url_is_refused_without_urllib3s_message():
    with pytest.raises(ConfigurationError, match=r"api_url 'http://h:99999' is not a valid URL"):
        Produl(KEY, api_url="http://h:99999", enabled=False)


def test_the_plain_http_warning_and_reprs_show_the_url(caplog):
    with caplog.at_level(logging.WARNING, logger="produl_server"):
        produl = Produl(KEY, api_url="http://collector.example.com/base", enabled=False)
    assert "api_url http://collector.example.com/base uses plain http" in caplog.text
    assert repr(produl).startswith("<Produl http://collector.example.com/base key=sk_…cdef")


def test_proxy_credentials_reach_no_log_hook_or_repr_when_the_proxy_is_down(
    produl_collector, make_client, caplog
):
    """End to end: a client whose proxy refuses connections reports without the password."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    seen: list[str] = []

    def hook(error, event):
        seen.extend([str(error), repr(error), repr(event)])

    with caplog.at_level(logging.DEBUG):
        produl = make_client(
            proxy=f"http://analytics:{PASSWORD}@127.0.0.1:{dead_port}",
            max_retry_time=0.1,
            on_error=hook,
        )
        produl.track_event("signup", visitor_id="u1")
        assert produl.flush(timeout=10) is False  # done, but events were dropped
        assert produl.stats.pending == 0
        seen += [repr(produl), repr(produl.config), str(produl.stats)]
        produl.shutdown(timeout=2)
    assert produl.stats.dropped["retries_exhausted"] == 1  # it really went through the proxy
    assert not produl_collector.requests
    text = caplog.text + "\n".join(seen)
    assert "analytics:***@" in text
    assert PASSWORD not in text
    for record in caplog.records:
        assert PASSWORD not in str(record.args)


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("analytics", "p@ss w/rd%"),  # the example in docs/howto/network.rst
        ("ops", "a:b#c?d%41"),  # %41 is sent as the three characters, not "A"
        ("café", "naïve"),  # Latin-1, sent as Latin-1
    ],
)
def test_proxy_credentials_are_sent_percent_decoded_as_documented(
    produl_collector, make_client, user, password
):
    """Issue #9, item 14: the docs said escapes were not decoded; they are."""
    # The collector plays the proxy: it records the absolute-form request a
    # forward proxy would receive, credentials included. Nothing leaves this machine.
    host = produl_collector.url.removeprefix("http://")
    proxy = f"http://{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    produl = make_client(api_url="http://analytics.internal.example", proxy=proxy)
    produl.track_event("via_proxy", visitor_id="v")
    assert produl.flush(timeout=10)
    (request,) = produl_collector.requests
    sent = base64.b64decode(request.headers["Proxy-Authorization"].removeprefix("Basic "))
    assert sent.decode("latin-1") == f"{user}:{password}"
    assert password not in repr(produl.config)


@pytest.mark.parametrize(
    ("proxy", "message"),
    [
        (f"http://u:{PASSWORD}\u2013x@h:3128", "password has U+2013 at position 13"),
        (f"http://u:{PASSWORD}%E2%80%93x@h:3128", "password has U+2013 at position 13"),
        (f"http://u:{PASSWORD}%FF@h:3128", "password has U+FFFD at position 13"),
        (f"http://\u4e2d:{PASSWORD}@h:3128", "user name has U+4E2D at position 0"),
        (f"http://a%3Ab:{PASSWORD}@h:3128", "user name cannot contain ':'"),
    ],
)
def test_proxy_credentials_that_basic_auth_cannot_carry_are_refused(proxy, message, caplog):
    """They used to fail every send with a UnicodeEncodeError holding the password."""
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigurationError) as info:
        Produl(KEY, proxy=proxy, enabled=False)
    assert message in str(info.value)
    for text in (str(info.value), traceback_of(info.value), caplog.text):
        assert PASSWORD not in text
