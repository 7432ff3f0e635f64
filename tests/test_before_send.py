"""``before_send``: redact, change or drop each event on the caller's thread."""

from __future__ import annotations

import copy
import logging
import threading

import pytest

from produl_server import ConfigurationError, InvalidEventError, Produl


def test_before_send_redacts_and_the_change_is_what_arrives(produl_collector, make_client):
    seen = []

    def redact(event):
        seen.append((copy.deepcopy(event), threading.current_thread()))
        event.get("pr", {}).pop("email", None)
        event["sk"] = "redacted-session"
        return event

    produl = make_client(before_send=redact)
    produl.track_event("signup", {"plan": "pro", "email": "a@b.c"}, visitor_id="u1")
    produl.track_pageview(path="/pricing", visitor_id="u1")
    assert produl.flush(timeout=10)

    # The hook saw the wire words, on the caller's thread.
    assert seen[0][0] == {
        "t": "ev",
        "n": "signup",
        "vi": "u1",
        "pr": {"plan": "pro", "email": "a@b.c"},
    }
    assert seen[1][0]["t"] == "pv"
    assert {thread for _, thread in seen} == {threading.current_thread()}
    assert produl_collector.events == [
        {"t": "ev", "n": "signup", "vi": "u1", "sk": "redacted-session", "pr": {"plan": "pro"}},
        {
            "t": "pv",
            "p": "/pricing",
            "u": "https://server/pricing",
            "vi": "u1",
            "sk": "redacted-session",
        },
    ]


def test_returning_none_drops_and_counts_without_an_error(produl_collector, make_client):
    errors = []
    produl = make_client(
        before_send=lambda event: None if event["n"] == "noise" else event,
        on_error=lambda error, event: errors.append(error),
    )
    produl.track_event("noise", visitor_id="u1")
    produl.track_event("kept", visitor_id="u1")
    assert produl.flush(timeout=10)
    assert [event["n"] for event in produl_collector.events] == ["kept"]
    assert produl.stats.dropped == {"before_send": 1}
    assert errors == []


def test_an_invalid_change_is_refused_like_any_input(produl_collector, make_client):
    def bad(event):
        event["vi"] = "x" * 300
        return event

    produl = make_client(before_send=bad)
    with pytest.raises(InvalidEventError, match="visitor_id"):
        produl.track_event("e", visitor_id="u1")
    with pytest.raises(InvalidEventError, match=r"before_send.*dict or None"):
        make_client(before_send=lambda event: "nope").track_event("e", visitor_id="u1")
    with pytest.raises(InvalidEventError, match=r"before_send.*cannot carry: zz"):
        make_client(before_send=lambda event: {**event, "zz": 1}).track_event("e")
    assert produl.flush(timeout=10)
    assert produl_collector.events == []


def test_a_raising_hook_drops_the_event_logs_once_per_cause_and_reports(
    produl_collector, make_client, caplog
):
    errors = []

    def broken(event):
        if event["n"] == "key":
            return event["pr"]["missing"]
        raise RuntimeError("boom")

    produl = make_client(before_send=broken, on_error=lambda error, event: errors.append(error))
    with caplog.at_level(logging.ERROR, logger="produl_server"):
        for _ in range(3):
            produl.track_event("key", {"a": 1}, visitor_id="u1")  # never raises here
            produl.track_event("rt", visitor_id="u1")
    assert produl.flush(timeout=10) is False  # events were lost since the last flush
    assert produl_collector.events == []  # fails closed: nothing unfiltered is sent
    assert produl.stats.dropped == {"before_send_error": 6}
    assert [error.reason for error in errors] == ["before_send_error"] * 6
    failures = [r for r in caplog.records if "before_send raised" in r.getMessage()]
    assert sorted(r.getMessage().split()[3] for r in failures) == ["KeyError", "RuntimeError"]


def test_before_send_must_be_callable():
    with pytest.raises(ConfigurationError, match="before_send must be callable"):
        Produl("sk_test_1234", before_send="redact")  # type: ignore[arg-type]


def test_before_send_sees_the_language_and_its_change_is_validated(produl_collector, make_client):
    seen = []

    def coarse(event):
        seen.append(dict(event))
        if "l" in event:
            event["l"] = event["l"].split("-")[0]  # keep the language, not the region
        return event

    produl = make_client(before_send=coarse)
    produl.track_pageview(path="/a", visitor_id="u1", language="fr-CH")
    assert seen[0]["l"] == "fr-CH"
    with pytest.raises(InvalidEventError, match="language"):
        make_client(before_send=lambda event: {**event, "l": "fr_CH"}).track_pageview(
            path="/a", visitor_id="u1"
        )
    with pytest.raises(InvalidEventError, match=r"cannot carry: l"):
        make_client(before_send=lambda event: {**event, "l": "fr"}).track_event("e")
    assert produl.flush(timeout=10)
    (pageview,) = produl_collector.events
    assert pageview["l"] == "fr"
