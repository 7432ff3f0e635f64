"""Every duration option has a documented maximum (issue #9, item 4).

``shutdown_timeout=1e10`` used to pass validation, then make ``thread.join``
raise OverflowError at shutdown; ``request_timeout``, ``flush_interval`` and
``max_delay`` of 1e10 failed on the sender thread the same way.
"""

from __future__ import annotations

import threading

import pytest

from produl_server import ConfigurationError, Produl
from produl_server._config import MAX_RATE, MAX_SECONDS

KEY = "sk_live_0123456789abcdef"

DURATIONS = [
    "flush_interval",
    "max_delay",
    "shutdown_timeout",
    "request_timeout",
    "max_retry_time",
    "retry_initial_delay",
    "retry_max_delay",
]


def test_the_cap_is_one_day_and_far_below_what_threading_accepts():
    assert MAX_SECONDS == 86_400
    assert MAX_SECONDS < threading.TIMEOUT_MAX / 1000


@pytest.mark.parametrize("option", DURATIONS)
@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (1e10, "10000000000.0"),
        (MAX_SECONDS + 0.001, "86400.001"),
        (86_401, "86401"),
        (float("inf"), "inf"),
        (10**400, "an integer of about 401 digits"),  # math.isfinite() would overflow
        (10**5000, "an integer of about 5001 digits"),  # its repr() would raise
    ],
    ids=["1e10", "cap+1ms", "86401", "inf", "10**400", "10**5000"],
)
def test_a_duration_over_one_day_is_refused_naming_the_option_and_limit(option, value, shown):
    with pytest.raises(ConfigurationError) as info:
        Produl(KEY, enabled=False, **{option: value})
    message = str(info.value)
    assert message.startswith(f"{option} must be ")
    assert "at most 86400 seconds (one day)" in message or "to 86400 seconds" in message
    assert message.endswith(f"not {shown}")


def test_the_rate_has_a_maximum_too():
    assert Produl(KEY, enabled=False, max_requests_per_minute=MAX_RATE)
    for value in (MAX_RATE + 1, 10**400):
        with pytest.raises(ConfigurationError, match="at most 1,000,000, or None"):
            Produl(KEY, enabled=False, max_requests_per_minute=value)


def test_huge_integers_in_other_options_give_a_clean_error():
    for option in ("flush_at", "max_queue_size", "max_in_flight"):
        with pytest.raises(ConfigurationError, match=f"^{option} must be"):
            Produl(KEY, enabled=False, **{option: -(10**5000)})
    with pytest.raises(ConfigurationError, match="max_in_flight must be 1 to 32, not an integer"):
        Produl(KEY, enabled=False, max_in_flight=10**5000)


@pytest.mark.parametrize("sync_mode", [False, True])
def test_every_duration_at_its_cap_delivers_flushes_and_shuts_down(produl_collector, sync_mode):
    """End to end: the largest allowed values work at run time, to a real collector."""
    errors: list[object] = []
    produl = Produl(
        produl_collector.server_key,
        api_url=produl_collector.url,
        sync_mode=sync_mode,
        max_requests_per_minute=MAX_RATE,
        on_error=lambda error, event: errors.append(error),
        **dict.fromkeys(DURATIONS, MAX_SECONDS),
    )
    try:
        produl.track_event("signup", visitor_id="u1")
        assert produl.flush(timeout=10)
    finally:
        produl.shutdown()  # shutdown_timeout=86400: returns as soon as it is done
    assert [event["n"] for event in produl_collector.wait_for(1)] == ["signup"]
    assert produl.stats.sent == 1
    assert not errors
    assert repr(produl).endswith("shut down>")
