"""A server key holds printable ASCII only; anything else is refused by code point.

Issue #9, item 1: one character outside Latin-1 (a BOM from a secrets file, a
zero-width space, an en dash from a web page) used to pass validation, then
make every send raise a UnicodeEncodeError whose repr held the whole header.
"""

from __future__ import annotations

import logging
import string
import traceback

import pytest

from produl_server import ConfigurationError, Produl
from produl_server.testing import LocalCollector

SECRET = "SECRET"

#: (key, code point named in the message, position named in the message)
BAD_KEYS = {
    "en dash": ("sk_live_SECRET\u2013PART_4321", "U+2013 (EN DASH)", 14),
    "byte order mark": ("\ufeffsk_live_SECRETPART_4321", "U+FEFF (BYTE ORDER MARK)", 0),
    "zero-width space": ("sk_live_SECRET\u200bPART_4321", "U+200B (ZERO WIDTH SPACE)", 14),
    "no-break space": ("sk_live_SECRET\u00a0PART_4321", "U+00A0 (NO-BREAK SPACE)", 14),
    "space": ("sk_live_SECRET PART_4321", "U+0020 (SPACE)", 14),
    "trailing newline": ("sk_live_SECRETPART_4321\n", "U+000A", 23),
    "tab": ("sk_live_SECRET\tPART_4321", "U+0009", 14),
    "delete": ("sk_live_SECRET\x7fPART_4321", "U+007F", 14),
    "undecodable byte": ("sk_live_SECRET\udce9PART_4321", "U+DCE9", 14),
}


@pytest.mark.parametrize(("key", "code", "position"), BAD_KEYS.values(), ids=BAD_KEYS)
def test_a_key_outside_printable_ascii_is_refused_by_code_point(
    produl_collector, key, code, position, caplog
):
    hooked: list[str] = []
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigurationError) as info:
        Produl(
            server_key=key,
            api_url=produl_collector.url,
            on_error=lambda error, event: hooked.extend([repr(error), repr(event)]),
        )
    message = str(info.value)
    assert f"server_key has {code} at position {position}" in message
    assert "printable ASCII" in message
    shown = "".join(traceback.format_exception(info.value))
    for text in (message, shown, caplog.text, *hooked):
        assert SECRET not in text
        assert "4321" not in text
    assert not produl_collector.requests  # refused before anything was sent


@pytest.mark.parametrize(("key", "code", "position"), BAD_KEYS.values(), ids=BAD_KEYS)
def test_a_bad_key_from_the_environment_is_refused_the_same_way(monkeypatch, key, code, position):
    monkeypatch.setenv("PRODUL_SERVER_KEY", key)
    with pytest.raises(ConfigurationError) as info:
        Produl(enabled=False)
    assert f"server_key has {code} at position {position}" in str(info.value)


def test_every_printable_ascii_character_is_accepted_and_sent():
    key = "sk_" + string.punctuation + string.ascii_letters + string.digits
    assert {ord(ch) for ch in key} == set(range(0x21, 0x7F))
    with LocalCollector(server_key=key) as collector:
        produl = Produl(server_key=key, api_url=collector.url, max_requests_per_minute=None)
        try:
            produl.track_event("signup", visitor_id="u1")
            assert produl.flush(timeout=10)
        finally:
            produl.shutdown(timeout=2)
        assert [event["n"] for event in collector.wait_for(1)] == ["signup"]
        assert collector.requests[0].headers["X-Produl-Server-Key"] == key
