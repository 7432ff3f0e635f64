"""A user's view of the API, type-checked by ``mypy --strict`` (never run)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from produl_server import DeliveryError, PageviewData, Produl, Stats


def on_error(error: DeliveryError, event: Mapping[str, Any]) -> None:
    print(error.reason, error.status, event.get("n"))


produl = Produl(server_key="sk_test", api_url="http://127.0.0.1:8787", on_error=on_error)
produl.track_event("invoice_paid", {"amount_cents": 4900}, visitor_id="cus_abc123")
produl.track_event("signup")
produl.track_pageview(path="/pricing", visitor_id="cus_abc123", title="Pricing")
produl.track_pageview(PageviewData(path="/pricing", visitor_id=42, language="fr-CH"))
produl.track_pageview(path="/", visitor_id="v", session_key="s-1", language="en")
delivered: bool = produl.flush(timeout=2.0)
stats: Stats = produl.stats
dropped: int = stats.dropped_total + stats.dropped.get("queue_full", 0)
with Produl(enabled=False) as other:
    other.track_event("x", visitor_id=1)
produl.shutdown(timeout=1.0)
