"""The inbox: a queue of bodies, numbered by runs, each visitor read back from its body.

Unit tests of :mod:`produl_server._inbox` (issue #22, P4). The numbers the
queue hands out must be exactly those the ledger gave its events, whatever
other numbers were given out meanwhile; the real-HTTP and spool tests at the
end show the visitor ids travel with the bodies.
"""

from __future__ import annotations

import json
import random
import tracemalloc
import uuid

import pytest

from produl_server import InvalidEventError, Produl, _inbox
from produl_server._config import key_fingerprint
from produl_server._event import encode_event, encode_pageview, encode_wire
from produl_server._inbox import Inbox
from produl_server._ledger import Ledger
from produl_server._spool import Spool


def body(i: int, visitor: object = "v") -> bytes:
    return encode_event("e", {"i": i}, visitor, None, None, None)


def numbered(numbers):
    """An ``accept`` that gives out *numbers* in turn."""
    given = iter(numbers)
    return lambda: next(given)


def taken(items):
    return [(json.loads(item.body)["pr"]["i"], item.seq) for item in items]


# -- the numbers ---------------------------------------------------------------


def test_a_steady_stream_is_numbered_in_order_through_takes_of_any_size():
    inbox = Inbox(100)
    ledger = Ledger()
    for i in range(10):
        assert inbox.put(body(i), ledger.accept, 0.0) == i + 1
    assert taken(inbox.take(3)) == [(0, 1), (1, 2), (2, 3)]
    assert taken(inbox.take(1)) == [(3, 4)]
    assert taken(inbox.take_all()) == [(i, i + 1) for i in range(4, 10)]
    assert inbox.take(5) == []
    assert inbox.take_all() == []


def test_numbers_given_out_elsewhere_leave_gaps_that_the_queue_keeps():
    inbox = Inbox(100)
    accept = numbered([1, 2, 5, 6, 7, 10, 11, 40])
    for i in range(8):
        inbox.put(body(i), accept, 0.0)
    # Part of a run, then the rest of it and part of the next, then the end.
    assert taken(inbox.take(3)) == [(0, 1), (1, 2), (2, 5)]
    assert taken(inbox.take(3)) == [(3, 6), (4, 7), (5, 10)]
    inbox.put(body(8), numbered([41]), 0.0)
    inbox.put(body(9), numbered([43]), 0.0)
    assert taken(inbox.take_all()) == [(6, 11), (7, 40), (8, 41), (9, 43)]


def test_a_take_that_ends_where_a_run_ends():
    inbox = Inbox(100)
    accept = numbered([1, 2, 3, 9, 10])
    for i in range(5):
        inbox.put(body(i), accept, 0.0)
    assert [item.seq for item in inbox.take(3)] == [1, 2, 3]
    assert [item.seq for item in inbox.take(1)] == [9]
    assert [item.seq for item in inbox.take(9)] == [10]


def test_once_empty_the_next_number_starts_afresh_even_when_it_follows_on():
    inbox = Inbox(100)
    accept = numbered([1, 2, 3, 4])
    inbox.put(body(0), accept, 0.0)
    inbox.put(body(1), accept, 0.0)
    assert [item.seq for item in inbox.take(2)] == [1, 2]
    inbox.put(body(2), accept, 0.0)  # 3 follows 2, which is gone
    assert [item.seq for item in inbox.take_all()] == [3]
    inbox.put(body(3), accept, 0.0)
    assert [item.seq for item in inbox.take(1)] == [4]


def test_a_full_queue_numbers_nothing_and_the_ledger_agrees():
    # What Worker.put and the sender do: the queue's events, numbers taken
    # by the door (before_send, invalid), by events a full queue refused and
    # by events taken from the spool. Every number handed out with a body is
    # one the ledger still waits for, and nothing else is.
    inbox = Inbox(3)
    ledger = Ledger()
    outside = []
    for i in range(3):
        inbox.put(body(i), ledger.accept, 0.0)
    assert inbox.put(body(99), ledger.accept, 0.0) == 0  # full: no number
    outside.append(ledger.accept())  # the overflow's event
    ledger.refuse("before_send")  # handled at once
    assert taken(inbox.take(2)) == [(0, 1), (1, 2)]
    inbox.put(body(3), ledger.accept, 0.0)
    outside.extend(ledger.accept() for _ in range(4))  # taken from the spool
    inbox.put(body(4), ledger.accept, 0.0)
    rest = inbox.take_all()
    assert taken(rest) == [(2, 3), (3, 6), (4, 11)]
    assert ledger.pending == 3 + 2 + len(outside)
    for seq in [1, 2, *(item.seq for item in rest), *outside]:
        assert ledger.finish(seq)
    assert ledger.pending == 0
    assert ledger.done_through(ledger.accepted)


def test_many_runs_taken_a_few_at_a_time_match_a_plain_model():
    # Long enough for the array of runs to be compacted while never empty.
    rng = random.Random(22)
    inbox = Inbox(10_000)
    model: list[tuple[int, int]] = []
    number = 0
    for i in range(5_000):
        number += 1 if rng.random() < 0.5 else rng.randint(2, 5)
        inbox.put(body(i), numbered([number]), 0.0)
        model.append((i, number))
        if rng.random() < 0.3:
            most = rng.randint(0, 4)
            assert taken(inbox.take(most)) == model[:most]
            del model[:most]
    assert inbox.waiting() == len(model) > 100
    assert taken(inbox.take_all()) == model


def _held_per_event(numbers: list[int]) -> float:
    """Bytes the inbox's own code holds per queued event (pre-made bodies)."""
    bodies = [body(i) for i in range(len(numbers))]
    inbox = Inbox(len(numbers))
    accept = numbered(numbers)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for one in bodies:
            inbox.put(one, accept, 1.0)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    only = [tracemalloc.Filter(True, _inbox.__file__)]
    grown = sum(
        stat.size_diff
        for stat in after.filter_traces(only).compare_to(before.filter_traces(only), "filename")
    )
    assert inbox.waiting() == len(numbers)
    return grown / len(numbers)


def test_a_queued_event_costs_its_deque_slot_and_at_worst_a_run():
    # Issue #22, P4: a (body, visitor, seq) tuple and its int cost 96 bytes.
    steady = _held_per_event(list(range(1, 10_001)))
    assert steady < 10  # 8 for the deque's slot, and its blocks
    every_other = _held_per_event(list(range(1, 20_001, 2)))
    assert every_other < 32  # and 16 for a run (two int64s), with the array's slack


# -- the visitor ---------------------------------------------------------------

ODD_VISITORS = [
    "cust_0000001",
    'quote " and backslash \\ and slash /',
    "".join(chr(c) for c in range(32)) + "\x7f",  # every control character, escaped
    "\u2028\u2029 é ß 中文 😀 \U0010ffff",
    '{"vi":"not me"}',
    "\\u0041 is not A",
    "\x00" * 256,  # the longest escape, 6 bytes each, at the longest id
    "a" * 255 + "😀",
    " ",
]


@pytest.mark.parametrize("visitor", ODD_VISITORS)
def test_an_odd_visitor_id_comes_back_from_the_body(visitor):
    inbox = Inbox(10)
    inbox.put(body(0, visitor), Ledger().accept, 0.0)
    pageview = encode_pageview("/p", visitor, None, None, None, None)
    inbox.put(pageview, Ledger().accept, 0.0)
    assert [item.visitor for item in inbox.take_all()] == [visitor, visitor]


@pytest.mark.parametrize(
    ("visitor", "text"),
    [
        (42, "42"),
        (10**255, "1" + "0" * 255),
        (uuid.UUID(int=7), "00000000-0000-0000-0000-000000000007"),
        (None, None),
    ],
)
def test_int_uuid_and_no_visitor_id_come_back_as_sent(visitor, text):
    inbox = Inbox(10)
    inbox.put(body(0, visitor), Ledger().accept, 0.0)
    inbox.put(encode_wire({"t": "ev", "n": "hook", "vi": visitor}), Ledger().accept, 0.0)
    items = inbox.take_all()
    assert [item.visitor for item in items] == [text, text]
    assert [json.loads(item.body).get("vi") for item in items] == [text, text]


def test_a_str_subclass_is_read_as_what_was_sent():
    class Shown(str):
        def __str__(self):
            return "something else"

    inbox = Inbox(10)
    inbox.put(body(0, Shown("cust_1")), Ledger().accept, 0.0)
    assert inbox.take_all()[0].visitor == "cust_1"


def test_a_lone_surrogate_never_reaches_the_queue():
    with pytest.raises(InvalidEventError, match="lone surrogate"):
        body(0, "broken \udc80")


def test_the_hooks_and_the_spools_visitor_is_the_one_in_the_body(tmp_path, hung_collector):
    # A before_send that sets an int visitor id: the sender orders (and the
    # spool keeps) the events by the id that was sent, "42".
    def hook(event):
        return {**event, "vi": 42} if event.get("n") == "hooked" else event

    produl = Produl(
        server_key=hung_collector.server_key,
        api_url=hung_collector.url,
        spool_dir=tmp_path,
        before_send=hook,
        flush_interval=600,
        max_requests_per_minute=None,
    )
    for visitor in ODD_VISITORS:
        produl.track_event("odd", visitor_id=visitor)
    produl.track_event("hooked", visitor_id="u1")
    produl.track_pageview(path="/p", visitor_id=uuid.UUID(int=7))
    produl.track_event("anonymous")
    produl.shutdown(timeout=0.5)  # the collector answers nothing: all spooled
    assert produl.stats.spooled == len(ODD_VISITORS) + 3
    spool = Spool(tmp_path, hung_collector.url, key_fingerprint(hung_collector.server_key))
    try:
        events = spool.claim(100, lease=60.0)
    finally:
        spool.close()
    assert [e.visitor for e in events] == [
        *ODD_VISITORS,
        "42",
        "00000000-0000-0000-0000-000000000007",
        None,
    ]
    assert [json.loads(e.body).get("vi") for e in events] == [e.visitor for e in events]
