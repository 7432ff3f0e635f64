"""One readable line per event, for the terminal and assertion messages."""

from __future__ import annotations

import json
import time
from typing import Any

from produl_server.collector._store import StoredEvent

#: Wire keys shown after the head, in this order, with their labels.
_SHOWN = (("p", "path"), ("vi", "visitor"), ("sk", "session"), ("ti", "title"), ("r", "ref"))


def describe(event: dict[str, Any]) -> str:
    """Summarise a wire dict on one line.

    Args:
        event: A wire dict (PROTOCOL.md).

    Returns:
        E.g. ``event invoice_paid visitor=cus_1 {"amount_cents": 4900}`` or
        ``pageview /pricing visitor=u1``.
    """
    if event.get("t") == "ev":
        parts = [f"event {event.get('n')}"]
        if "p" in event:
            parts.append(f"path={event['p']}")
    else:
        parts = [f"pageview {event.get('p')}"]
    parts += [f"{label}={event[key]}" for key, label in _SHOWN[1:] if key in event]
    if "pr" in event:
        parts.append(json.dumps(event["pr"], ensure_ascii=False, sort_keys=True))
    return " ".join(parts)


def describe_stored(stored: StoredEvent) -> str:
    """Summarise a stored event with its local arrival time.

    Args:
        stored: A stored event.

    Returns:
        E.g. ``14:03:22  event signup visitor=u1``.
    """
    when = time.strftime("%H:%M:%S", time.localtime(stored.received_at))
    return f"{when}  {describe(stored.event)}"
