"""``produl-server demo``: the SDK against an embedded collector, narrated.

No account, no network: the local collector's server
(:class:`~produl_server.collector.CollectorServer`, in memory) on a free
loopback port stands in for Produl, and the real client sends to it. The
demo uses the collector itself, not the test helpers of
:mod:`produl_server.testing`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from produl_server.collector import CollectorServer, Fault, MemoryStore, describe

#: A tiny pause the demo's 429 episode asks the client to wait, in seconds.
_RETRY_AFTER = 1.0
_BURST = 25
_FLUSH_TIMEOUT = 30.0


def _events(collector: CollectorServer) -> list[dict[str, Any]]:
    """The accepted events, oldest first."""
    return [stored.event for stored in reversed(collector.store.query())]


def _wait_for(collector: CollectorServer, count: int, timeout: float) -> None:
    """Wait (at most *timeout*) until *count* events were accepted."""
    with collector.changed:
        collector.changed.wait_for(lambda: collector.store.count() >= count, timeout)


class _Narrator:
    """Prints what reached the collector since the last call, with the answer."""

    def __init__(self, collector: CollectorServer, out: Callable[[str], None]) -> None:
        self.collector = collector
        self.out = out
        self.shown = 0

    def arrivals(self, *, summary_only: bool = False) -> None:
        posts = [r for r in self.collector.requests if r.method == "POST"]
        new, self.shown = posts[self.shown :], len(posts)
        if summary_only:
            ports = len({r.client_port for r in new})
            self.out(f"    {len(new)} request(s) over {ports} kept-alive connection(s)")
            return
        for request in new:
            status = "dropped" if request.status is None else str(request.status)
            extra = ""
            if request.status == 429:
                extra = " Too Many Requests: the client keeps the event and retries"
            self.out(f"    <- {status}{extra}  {_summary(request.body)}")


def _summary(body: bytes) -> str:
    try:
        return describe(json.loads(body))
    except ValueError:
        return f"<{len(body)} bytes>"


def run_demo(out: Callable[[str], None]) -> int:
    """Run the demo, printing through ``out``.

    Args:
        out: Writes one line for the user.

    Returns:
        0 when every tracked event arrived exactly once, 1 otherwise.
    """
    from produl_server import Produl  # noqa: PLC0415 -- cli imports this lazily

    collector = CollectorServer(
        store=MemoryStore(), server_key="sk_demo_" + "0" * 24, record_requests=True
    )
    collector.start()
    try:
        say = _Narrator(collector, out)
        out(f"Started a local collector at {collector.url} (in memory).")
        out("The SDK sends to it exactly as it would to https://app.produl.tech.\n")
        produl = Produl(
            server_key=collector.server_key,
            api_url=collector.url,
            retry_initial_delay=0.2,
        )
        try:
            out("1. Two server-side pageviews for one visitor and session:")
            out("   (the middleware fills in the language from Accept-Language, as here)")
            produl.track_pageview(
                path="/pricing", visitor_id="cus_demo", session_key="s1", language="en-GB"
            )
            produl.track_pageview(
                path="/checkout", visitor_id="cus_demo", session_key="s1", title="Checkout"
            )
            produl.flush(_FLUSH_TIMEOUT)
            say.arrivals()

            out("\n2. The Stripe webhook from Produl's docs, as an event:")
            produl.track_event(
                "invoice_paid",
                {"amount_cents": 4900, "currency": "usd", "plan": "Pro"},
                visitor_id="cus_demo",
            )
            produl.flush(_FLUSH_TIMEOUT)
            say.arrivals()

            out(f"\n3. A burst of {_BURST} events from a nightly job, without calling flush():")
            for row in range(_BURST):
                produl.track_event("row_synced", {"row": row}, visitor_id="job_nightly")
            before = 3
            _wait_for(collector, before + 20, _FLUSH_TIMEOUT)
            out("    the queue reached 10 twice, so 20 went out on their own;")
            produl.flush(_FLUSH_TIMEOUT)
            arrived = len(_events(collector)) - before
            out(f"    flush() sent the rest: {arrived} of {_BURST} arrived")
            say.arrivals(summary_only=True)

            out("\n4. The collector says 429 (rate limited) three times:")
            collector.faults.add(Fault(429, _RETRY_AFTER), 3)
            produl.track_event("payment_failed", {"attempt": 1}, visitor_id="cus_demo")
            produl.flush(_FLUSH_TIMEOUT)
            say.arrivals()
            stats = produl.stats
        finally:
            produl.shutdown(timeout=5.0)
        events = _events(collector)
    finally:
        collector.stop()

    expected = 2 + 1 + _BURST + 1
    counts: dict[str, int] = {}
    for event in events:
        name = str(event.get("n", "pageview"))
        counts[name] = counts.get(name, 0) + 1
    out("\nWhat arrived, by name:")
    for name, count in counts.items():
        out(f"    {name:<16} {count}")
    dropped = sum(stats.dropped.values())
    out(
        f"Client stats: queued={stats.queued} sent={stats.sent} "
        f"retried={stats.retried} dropped={dropped}"
    )
    if len(events) == expected and dropped == 0:
        out(f"\nAll {expected} events arrived, none lost.")
        out("Next: run `produl-server collector` and watch events live in your browser;")
        out("where your app runs, `produl-server doctor` checks it can deliver.")
        return 0
    out(f"\nExpected {expected} events, the collector has {len(events)}.")
    return 1
