"""Lone surrogates and huge ints are InvalidEventError, never raw (issue #9, item 3).

``track_event("sign\\ud800up", ...)`` used to raise UnicodeEncodeError and
``{"n": 10**5000}`` ValueError (int over 4300 digits), even with
``raise_on_invalid=False``: both escape the JSON encoder, after validation.
"""

from __future__ import annotations

import logging
import uuid

import pytest

from produl_server import InvalidEventError, Produl

KEY = "sk_test_0123456789abcdef"
HUGE = 10**5000


@pytest.fixture
def produl():
    return Produl(KEY, enabled=False)


EVENT_FIELDS = {
    "name": ({"name": "sign\ud800up"}, "name", "U+D800 at position 4"),
    "path": ({"path": "/caf\udce9"}, "path", "U+DCE9 at position 4"),
    "url": ({"url": "https://h/\udc80"}, "url", "U+DC80 at position 10"),
    "visitor_id": ({"visitor_id": "u\udfff"}, "visitor_id", "U+DFFF at position 1"),
    "session_key": ({"session_key": "\udc00s"}, "session_key", "U+DC00 at position 0"),
    "property value": ({"properties": {"k": "v\ud800"}}, 'properties["k"]', "U+D800 at"),
    "property key": ({"properties": {"k\ud800": 1}}, 'properties["k\\ud800"]', "the key"),
    "nested value": (
        {"properties": {"a": [0, {"b": ("x", "y\udce9")}]}},
        'properties["a"][1]["b"][1]',
        "U+DCE9 at position 1",
    ),
    "nested key": (
        {"properties": {"a": {"ok": 1, "caf\udce9": 2}}},
        'properties["a"]["caf\\udce9"]',
        "the key contains a lone surrogate U+DCE9 at position 3",
    ),
    "a surrogate pair as two code points": (
        {"name": "smile \ud83d\ude00"},
        "name",
        "U+D83D at position 6",
    ),
}


@pytest.mark.parametrize(("call", "field", "fragment"), EVENT_FIELDS.values(), ids=EVENT_FIELDS)
def test_a_lone_surrogate_in_an_event_names_the_field(produl, call, field, fragment):
    call = {"name": "e", "visitor_id": "v", **call}
    with pytest.raises(InvalidEventError) as info:
        produl.track_event(call.pop("name"), call.pop("properties", None), **call)
    assert not isinstance(info.value, TypeError)
    assert info.value.field == field
    assert fragment in str(info.value)
    assert "lone surrogate" in str(info.value)
    str(info.value).encode("utf-8")  # the message itself can be logged anywhere


PAGEVIEW_FIELDS = {
    "path": ({"path": "/\udce9"}, "path"),
    "visitor_id": ({"visitor_id": "\udce9"}, "visitor_id"),
    "url": ({"url": "https://h/\udce9"}, "url"),
    "title": ({"title": "Caf\udce9"}, "title"),
    "referrer": ({"referrer": "https://r/\udce9"}, "referrer"),
    "session_key": ({"session_key": "s\udce9"}, "session_key"),
}


@pytest.mark.parametrize(("call", "field"), PAGEVIEW_FIELDS.values(), ids=PAGEVIEW_FIELDS)
def test_a_lone_surrogate_in_a_pageview_names_the_field(produl, call, field):
    with pytest.raises(InvalidEventError, match="lone surrogate U\\+DCE9") as info:
        produl.track_pageview(**{"path": "/p", "visitor_id": "v", **call})
    assert info.value.field == field


HUGE_INTS = {
    "property": ({"properties": {"n": HUGE}}, 'properties["n"]'),
    "nested": ({"properties": {"a": [1, {"n": -HUGE}]}}, 'properties["a"][1]["n"]'),
    "visitor_id": ({"visitor_id": HUGE}, "visitor_id"),
    "session_key": ({"session_key": HUGE}, "session_key"),
}


@pytest.mark.parametrize(("call", "field"), HUGE_INTS.values(), ids=HUGE_INTS)
def test_an_integer_too_large_for_json_names_the_field(produl, call, field):
    call = {"visitor_id": "v", **call}
    with pytest.raises(InvalidEventError, match="integer too large to send") as info:
        produl.track_event("e", call.pop("properties", None), **call)
    assert info.value.field == field


def test_a_huge_int_as_a_property_key_is_a_short_message(produl):
    with pytest.raises(InvalidEventError, match="keys must be str, not int") as info:
        produl.track_event("e", {HUGE: 1}, visitor_id="v")
    assert "an integer of about 5001 digits" in str(info.value)
    assert len(str(info.value)) < 200


def test_a_key_path_with_a_surrogate_is_escaped_in_any_message(produl):
    with pytest.raises(InvalidEventError) as info:
        produl.track_event("e", {"caf\udce9": float("nan")}, visitor_id="v")
    assert info.value.field == 'properties["caf\\udce9"]'
    str(info.value).encode("utf-8")


def test_big_ints_below_the_limit_and_valid_unicode_are_sent(produl_collector, make_client):
    produl = make_client()
    big = 10**4000
    produl.track_event(
        "café ☕ 😀",
        {"n": big, "id": uuid.UUID(int=1), "s": "naïve \U0001f600"},
        visitor_id=10**200,
    )
    assert produl.flush(timeout=10)
    [event] = produl_collector.wait_for(1)
    assert event["n"] == "café ☕ 😀"
    assert event["pr"]["n"] == big
    assert event["pr"]["s"] == "naïve \U0001f600"
    assert event["vi"] == str(10**200)


def test_with_raise_on_invalid_false_they_are_counted_reported_and_the_rest_sent(
    produl_collector, make_client, caplog
):
    """End to end: the bad calls are dropped as ``invalid``; good ones still arrive."""
    reported: list[tuple[object, object]] = []
    produl = make_client(raise_on_invalid=False, on_error=lambda e, ev: reported.append((e, ev)))
    with caplog.at_level(logging.WARNING, logger="produl_server"):
        produl.track_event("sign\ud800up", visitor_id="v")
        produl.track_event("e", {"n": HUGE}, visitor_id="v")
        produl.track_pageview(path="/p", visitor_id="v", title="T\udce9")
        produl.track_event("good", visitor_id="v")
        assert produl.flush(timeout=10) is False  # done, but events were dropped
        assert produl.stats.pending == 0
    assert [event["n"] for event in produl_collector.wait_for(1)] == ["good"]
    stats = produl.stats
    assert stats.sent == 1
    assert stats.dropped["invalid"] == 3
    assert [error.reason for error, _event in reported] == ["invalid"] * 3
    messages = [str(error) for error, _event in reported]
    assert messages[0].startswith("name: contains a lone surrogate U+D800 at position 4")
    assert messages[1].startswith('properties["n"]: integer too large')
    assert messages[2].startswith("title: contains a lone surrogate U+DCE9")
    assert len([r for r in caplog.records if "invalid event dropped" in r.getMessage()]) == 3
    caplog.text.encode("utf-8")  # a UTF-8 log file could take every line
    assert len(produl_collector.requests) == 1
