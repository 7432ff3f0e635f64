"""A hook that raises anything, and timeouts of any size (issue #18, items 10 and 11)."""

from __future__ import annotations

import threading

import pytest


class Custom(BaseException):
    pass


@pytest.mark.parametrize("raised", [KeyboardInterrupt, GeneratorExit, Custom])
def test_a_hook_that_raises_a_base_exception_still_settles_the_event(
    produl_collector, make_client, raised
):
    calls = []

    def hook(error, event):
        calls.append((threading.current_thread().name, error.reason))
        raise raised("from the hook")

    produl = make_client(on_error=hook)
    produl_collector.fail_next(2, status=400)  # both dropped: rejected
    produl.track_event("e", visitor_id="v1")
    produl.track_event("e", visitor_id="v2")
    assert produl.flush(timeout=10) is False  # done, but events were dropped
    assert produl.stats.pending == 0
    assert produl.stats.pending == 0
    assert produl.stats.dropped == {"rejected": 2}
    assert [reason for _, reason in calls] == ["rejected", "rejected"]
    # The sender survived: a later event is delivered.
    produl.track_event("after", visitor_id="v3")
    assert produl.flush(timeout=10)
    assert [e["n"] for e in produl_collector.events] == ["after"]


@pytest.mark.parametrize("huge", [10**400, float("inf"), 1e308])
def test_flush_and_shutdown_take_a_huge_timeout(produl_collector, make_client, huge):
    produl = make_client()
    produl.track_event("e", visitor_id="v")
    assert produl.flush(timeout=huge)
    produl.shutdown(timeout=huge)
    assert len(produl_collector.events) == 1


def test_sync_mode_flush_takes_a_huge_timeout(produl_collector, make_client):
    produl = make_client(sync_mode=True)
    produl.track_event("e", visitor_id="v")
    assert produl.flush(timeout=10**400)
    assert len(produl_collector.events) == 1
