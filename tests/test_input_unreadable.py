"""User objects whose own code raises while read: invalid input, never a crash (#18, item 9)."""

from __future__ import annotations

import datetime
import decimal

import pytest

from produl_server import InvalidEventError


class TwoDays(datetime.tzinfo):
    def utcoffset(self, dt):
        return datetime.timedelta(days=2)

    def dst(self, dt):
        return None


class BadInt(int):
    def __int__(self):
        return "not an int"


class BadRepr:
    def __repr__(self):
        raise RuntimeError("repr fails")

    def __hash__(self):
        return 1


class Raises:
    def __init__(self, where):
        self.where = where

    def __str__(self):
        raise RuntimeError("str fails")

    def __float__(self):
        raise RuntimeError("float fails")


class BadMapping(dict):
    def items(self):
        raise RuntimeError("items fails")


class BadList(list):
    def __iter__(self):
        raise RuntimeError("iter fails")


class BadVisitor(int):
    def __str__(self):
        raise RuntimeError("str fails")


CASES = [
    ({"when": datetime.datetime(2026, 1, 1, tzinfo=TwoDays())}, 'properties["when"]'),
    ({"n": BadInt(3)}, 'properties["n"]'),
    ({BadRepr(): 1}, "properties["),
    ({"o": Raises("str")}, 'properties["o"]'),
    ({"m": BadMapping(a=1)}, 'properties["m"]'),
    ({"l": BadList([1])}, 'properties["l"]'),
    (BadMapping(a=1), "properties"),
]


@pytest.mark.parametrize(("properties", "field"), CASES)
def test_unreadable_values_raise_invalid_event_error_naming_the_field(
    produl_collector, make_client, properties, field
):
    produl = make_client()
    with pytest.raises(InvalidEventError) as caught:
        produl.track_event("e", properties, visitor_id="v")
    assert str(caught.value).startswith(field)
    assert produl.stats.queued == 0


@pytest.mark.parametrize(("properties", "field"), CASES)
def test_with_raise_on_invalid_false_they_are_dropped_and_reported(
    produl_collector, make_client, properties, field
):
    reported = []
    produl = make_client(raise_on_invalid=False, on_error=lambda e, ev: reported.append(e))
    produl.track_event("e", properties, visitor_id="v")  # must not raise
    assert produl.stats.dropped == {"invalid": 1}
    assert [e.reason for e in reported] == ["invalid"]


def test_a_visitor_id_whose_str_raises_is_invalid(produl_collector, make_client):
    produl = make_client(raise_on_invalid=False)
    produl.track_event("e", visitor_id=BadVisitor(5))
    assert produl.stats.dropped == {"invalid": 1}


def test_every_decimal_is_a_json_number(produl_collector, make_client):
    produl = make_client()
    amounts = ["4.90", "49.00", "0.1", "12345.678"]
    for text in amounts:
        produl.track_event("paid", {"amount": decimal.Decimal(text)}, visitor_id="v")
    assert produl.flush(timeout=10)
    sent = [e["pr"]["amount"] for e in produl_collector.events]
    assert sent == [4.9, 49, 0.1, 12345.678]
    assert all(isinstance(value, int | float) for value in sent)
