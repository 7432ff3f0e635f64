"""The SDKs under test, configured as equivalently as each allows.

Every client is pointed at the bench collector on 127.0.0.1 and runs with
its own defaults except where a measure needs otherwise (queue size, pacing),
and with every side channel (feature-flag polling, exception autocapture,
geo-IP) off. :mod:`bench._guard` backs this up by refusing any non-loopback
address in the process.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import attrs

PRODUL = "produl"
SEGMENT = "segment"
POSTHOG = "posthog"
PEERS = (SEGMENT, POSTHOG)
ALL = (PRODUL, *PEERS)

EVENT_NAME = "invoice_paid"
PROPERTIES: dict[str, Any] = {"amount_cents": 4200, "currency": "EUR", "plan": "pro"}


def available(subject: str) -> bool:
    """Whether *subject*'s package is importable here."""
    module = {PRODUL: "produl_server", SEGMENT: "segment.analytics", POSTHOG: "posthog"}[subject]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def version(subject: str) -> str:
    """The installed version of *subject*'s package, or ``"-"``."""
    from importlib import metadata

    dist = {PRODUL: "produl-server", SEGMENT: "segment-analytics-python", POSTHOG: "posthog"}[
        subject
    ]
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        if subject == PRODUL:
            from produl_server import __version__

            return f"{__version__} (source tree)"
        return "-"


@attrs.define
class Client:
    """One SDK behind a uniform face."""

    subject: str
    track: Callable[[str], None]
    """``track(visitor_id)``: the P1 event, ``invoice_paid`` with three properties."""
    flush: Callable[[], None]
    pending: Callable[[], int]
    """Events accepted but not yet sent (queued or in flight), as far as visible."""
    raw: Any


def make(
    subject: str,
    url: str,
    key: str,
    *,
    max_queue_size: int = 10_000,
    request_timeout: float = 10.0,
    **produl_options: Any,
) -> Client:
    """Build *subject*'s client pointed at the bench collector.

    Args:
        subject: ``produl``, ``segment`` or ``posthog``.
        url: The collector's base URL (loopback).
        key: The collector's server key (peers send it as their write key).
        max_queue_size: The same bound for every SDK.
        request_timeout: Seconds per request, for every SDK.
        **produl_options: Further :class:`~produl_server.Produl` options.
    """
    # The peers log every failed batch at ERROR; the bench reads counters, not logs.
    logging.getLogger("segment").setLevel(logging.CRITICAL)
    logging.getLogger("posthog").setLevel(logging.CRITICAL)
    if subject == PRODUL:
        from produl_server import Produl

        produl = Produl(
            server_key=key,
            api_url=url,
            max_queue_size=max_queue_size,
            request_timeout=request_timeout,
            **produl_options,
        )

        def produl_track(visitor_id: str) -> None:
            produl.track_event(EVENT_NAME, PROPERTIES, visitor_id=visitor_id)

        return Client(
            PRODUL,
            produl_track,
            lambda: _flushed(produl.flush(60.0)),
            lambda: produl.stats.pending,
            produl,
        )
    if subject == SEGMENT:
        from segment.analytics import Client as SegmentClient  # type: ignore[import-untyped]

        segment = SegmentClient(
            write_key=key,
            host=url,
            max_queue_size=max_queue_size,
            timeout=request_timeout,
            sync_mode=False,
            gzip=False,
        )

        def segment_track(visitor_id: str) -> None:
            segment.track(user_id=visitor_id, event=EVENT_NAME, properties=PROPERTIES)

        return Client(SEGMENT, segment_track, segment.flush, segment.queue.qsize, segment)
    if subject == POSTHOG:
        from posthog import Posthog

        posthog = Posthog(
            key,
            host=url,
            max_queue_size=max_queue_size,
            timeout=request_timeout,
            sync_mode=False,
            gzip=False,
            personal_api_key=None,
            enable_exception_autocapture=False,
            disable_geoip=True,
            enable_local_evaluation=False,
        )

        def posthog_track(visitor_id: str) -> None:
            posthog.capture(EVENT_NAME, distinct_id=visitor_id, properties=PROPERTIES)

        def posthog_pending() -> int:
            return sum(lane.queue.qsize() for lane in _posthog_lanes(posthog))

        return Client(POSTHOG, posthog_track, posthog.flush, posthog_pending, posthog)
    raise ValueError(f"unknown subject {subject!r}")


def _flushed(done: bool) -> None:
    if not done:
        raise RuntimeError("produl flush() timed out")


def _posthog_lanes(client: Any) -> list[Any]:
    # posthog 7 keeps one queue per "lane" (analytics, AI); older ones one queue.
    lanes = getattr(client, "_lanes", None)
    return list(lanes) if lanes else [client]
