"""Validation and encoding of events: pure units, no server needed."""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import uuid

import pytest

from produl_server import InvalidEventError, InvalidEventTypeError
from produl_server._event import encode_event, encode_pageview, visitor_of


def event(name="invoice_paid", properties=None, visitor_id="cus_1", path=None, url=None, sk=None):
    return json.loads(encode_event(name, properties, visitor_id, path, url, sk))


def pageview(
    path="/pricing", visitor_id="cus_1", url=None, title=None, referrer=None, sk=None, language=None
):
    return json.loads(encode_pageview(path, visitor_id, url, title, referrer, sk, language))


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


def test_event_wire_keys_visitor_first_then_protocol_order_and_absent_fields_omitted():
    # "vi" leads: the sender reads the visitor back from there (visitor_of).
    body = encode_event("invoice_paid", {"amount_cents": 4900}, "cus_1", "/hook", None, "s1")
    assert body == (
        b'{"vi":"cus_1","t":"ev","n":"invoice_paid","p":"/hook","u":"https://server/hook",'
        b'"sk":"s1","pr":{"amount_cents":4900}}'
    )
    assert event() == {"t": "ev", "n": "invoice_paid", "vi": "cus_1"}


def test_event_url_without_path_is_kept_and_path_without_url_defaults():
    assert event(url="https://api.example.com/x")["u"] == "https://api.example.com/x"
    assert "p" not in event(url="https://api.example.com/x")
    assert event(path="/a", url="https://h/b")["u"] == "https://h/b"


def test_pageview_wire_and_default_url():
    assert pageview(title="Pricing", referrer="https://ref/", sk="s") == {
        "t": "pv",
        "p": "/pricing",
        "u": "https://server/pricing",
        "vi": "cus_1",
        "sk": "s",
        "ti": "Pricing",
        "r": "https://ref/",
    }


def test_ids_accept_int_and_uuid_as_strings():
    uid = uuid.UUID(int=7)
    assert event(visitor_id=42, sk=uid)["vi"] == "42"
    assert event(visitor_id=42, sk=uid)["sk"] == str(uid)


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"name": ""}, "name", "must not be empty"),
        ({"name": "x" * 201}, "name", "at most 200"),
        ({"path": "pricing"}, "path", "must start with '/'"),
        ({"path": "/" + "x" * 2048}, "path", "at most 2048"),
        ({"url": "u" * 8193}, "url", "at most 8192"),
        ({"visitor_id": ""}, "visitor_id", "must not be empty"),
        ({"visitor_id": "v" * 257}, "visitor_id", "at most 256"),
        ({"sk": "s" * 257}, "session_key", "at most 256"),
    ],
)
def test_event_field_rules_name_the_field(kwargs, field, fragment):
    with pytest.raises(InvalidEventError) as info:
        event(**kwargs)
    assert info.value.field == field
    assert fragment in str(info.value)
    assert str(info.value).startswith(field + ":")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": None}, "name"),
        ({"name": 5}, "name"),
        ({"visitor_id": 1.5}, "visitor_id"),
        ({"visitor_id": True}, "visitor_id"),
        ({"path": b"/x"}, "path"),
        ({"properties": ["a"]}, "properties"),
    ],
)
def test_wrong_types_are_type_errors_too(kwargs, field):
    with pytest.raises(InvalidEventTypeError) as info:
        event(**kwargs)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, ValueError)
    assert info.value.field == field


def test_pageview_requires_path_and_visitor():
    with pytest.raises(InvalidEventError, match="path: is required"):
        pageview(path=None)
    with pytest.raises(InvalidEventError, match="visitor_id: is required"):
        pageview(visitor_id=None)
    with pytest.raises(InvalidEventError, match="title: must be at most 2048"):
        pageview(title="t" * 2049)
    with pytest.raises(InvalidEventError, match="referrer"):
        pageview(referrer="r" * 8193)


@pytest.mark.parametrize(
    ("properties", "where", "cls"),
    [
        ({"tags": {"a", "b"}}, 'properties["tags"]', InvalidEventTypeError),
        ({"raw": b"x"}, 'properties["raw"]', InvalidEventTypeError),
        ({"obj": object()}, 'properties["obj"]', InvalidEventTypeError),
        ({"items": [1, 2, float("nan")]}, 'properties["items"][2]', InvalidEventError),
        ({"a": {"b": float("inf")}}, 'properties["a"]["b"]', InvalidEventError),
        ({"a": [{1: "x"}]}, 'properties["a"][0][1]', InvalidEventTypeError),
        ({"d": decimal.Decimal("NaN")}, 'properties["d"]', InvalidEventError),
    ],
)
def test_unjsonable_values_name_the_key_path(properties, where, cls):
    with pytest.raises(cls) as info:
        event(properties=properties)
    assert info.value.field == where
    assert str(info.value).startswith(where + ":")


def test_cycles_and_deep_nesting_are_refused():
    loop: dict = {}
    loop["again"] = [loop]
    with pytest.raises(InvalidEventError, match=r'properties\["again"\]\[0\]: refers back'):
        event(properties=loop)
    deep: dict = {}
    cur = deep
    for _ in range(100):
        cur["x"] = {}
        cur = cur["x"]
    with pytest.raises(InvalidEventError, match="nested more than 64"):
        event(properties=deep)


def test_shared_but_acyclic_values_are_fine():
    shared = [1, 2]
    assert event(properties={"a": shared, "b": shared})["pr"] == {"a": [1, 2], "b": [1, 2]}


def test_conversions():
    aware = datetime.datetime(
        2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    )
    props = {
        "at": aware,
        "naive": datetime.datetime(2026, 1, 2, 3, 4, 5),
        "day": datetime.date(2026, 1, 2),
        "clock": datetime.time(3, 4),
        "exact": decimal.Decimal("49.5"),
        "whole": decimal.Decimal("4900"),
        "money": decimal.Decimal("0.1"),
        "price": decimal.Decimal("4.90"),
        "round": decimal.Decimal("49.00"),
        "long": decimal.Decimal("1.2345678901234567890"),
        "id": uuid.UUID(int=1),
        "color": Color.RED,
        "level": Level.HIGH,
        "pair": (1, (2, 3)),
        "nested": {"ok": [True, None, 1.5, "s"]},
    }
    assert event(properties=props)["pr"] == {
        "at": "2026-01-02T03:04:05+02:00",
        "naive": "2026-01-02T03:04:05",
        "day": "2026-01-02",
        "clock": "03:04:00",
        "exact": 49.5,
        "whole": 4900,
        "money": 0.1,
        "price": 4.9,
        "round": 49,
        "long": 1.2345678901234568,
        "id": "00000000-0000-0000-0000-000000000001",
        "color": "red",
        "level": 3,
        "pair": [1, [2, 3]],
        "nested": {"ok": [True, None, 1.5, "s"]},
    }


def test_properties_are_snapshotted():
    props = {"list": [1]}
    body = encode_event("n", props, "v", None, None, None)
    props["list"].append(2)
    props["new"] = 1
    assert json.loads(body)["pr"] == {"list": [1]}


def test_non_ascii_is_sent_as_utf8():
    body = encode_event("achat_réussi", {"ville": "Zürich"}, "v", None, None, None)
    assert "Zürich".encode() in body


def test_oversize_body_is_refused_naming_the_biggest_field():
    with pytest.raises(InvalidEventError, match=r"65536-byte limit.*'pr'") as info:
        event(properties={"blob": "x" * 70_000})
    assert info.value.field == "event"


def test_missing_visitor_warns_once(caplog):
    from produl_server import _event

    _event.warn_no_visitor.done = False
    with caplog.at_level("WARNING", logger="produl_server"):
        event(visitor_id=None)
        event(visitor_id=None)
    warnings = [r for r in caplog.records if "without visitor_id" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("language", ["en", "fr-CH", "zh-Hant-TW", "de-DE-1996", "x" * 8])
def test_pageview_language_is_sent_as_l(language):
    assert pageview(language=language)["l"] == language


@pytest.mark.parametrize(
    ("language", "fragment"),
    [
        ("", "must not be empty"),
        ("en_US", "language tag"),
        ("*", "language tag"),
        ("fr-", "language tag"),
        ("toolonglanguage", "language tag"),
        ("en-" + "-".join(["abcd"] * 7), "at most 35"),
    ],
)
def test_an_invalid_language_names_the_field(language, fragment):
    with pytest.raises(InvalidEventError, match=fragment) as caught:
        pageview(language=language)
    assert caught.value.field == "language"


def test_a_language_of_the_wrong_type_is_a_type_error():
    with pytest.raises(InvalidEventTypeError):
        pageview(language=7)


def test_visitor_of_reads_the_visitor_id_back_from_the_first_key():
    assert visitor_of(encode_event("e", None, "v1", "/p", None, "s")) == "v1"
    assert visitor_of(encode_pageview("/p", 42, None, "t", None, "s")) == "42"
    assert visitor_of(encode_event("e", {"vi": "no"}, None, "/p", None, "s")) is None


@pytest.mark.parametrize(
    "foreign",
    [
        b'{"t":"ev","vi":"v1"}',  # an older release's order: not read
        b'{"vi": "v1"}',
        b'{"vi":"unterminated',
        b'{"vi":"' + b"a" * 2000 + b'"}',  # longer than any id
        b'{"vi":"bad \\x escape"}',
        b'{"vi":"\xff\xfe"}',
        b'{"vi":"',
        b"",
    ],
)
def test_visitor_of_a_body_not_encoded_here_is_none_or_a_str_never_an_error(foreign):
    found = visitor_of(foreign)
    assert found is None or type(found) is str
