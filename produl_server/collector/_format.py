"""One readable line per event, for the terminal and assertion messages.

Events come from whoever can reach the collector, so every line is made safe
for a terminal before it is printed: control characters (ESC, BEL, CR, the
C1 range, ...) and the invisible characters that reorder or break lines are
shown as escapes like ``\\x1b`` instead of being sent raw (issue #9, item 11:
a referrer of ``\\x1b]0;pwned\\x07`` would retitle the window, ``\\x1b[2J``
clear the screen).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from produl_server.collector._store import StoredEvent

#: Wire keys shown after the head, in this order, with their labels.
_SHOWN = (
    ("p", "path"),
    ("vi", "visitor"),
    ("sk", "session"),
    ("ti", "title"),
    ("r", "ref"),
    ("l", "lang"),
)

#: C0 controls, DEL, C1 controls, line/paragraph separators, bidirectional
#: overrides and isolates ("Trojan Source"), and lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every character unsafe for a terminal written as an escape.

    Args:
        text: Anything a client sent.

    Returns:
        The text, printable as is: e.g. ``"a\\x1b[2J"`` for ``"a" + ESC + "[2J"``.

    Examples:
        >>> escape_controls("https://x/\\x1b]0;pwned\\x07")
        'https://x/\\\\x1b]0;pwned\\\\x07'
        >>> escape_controls("café")
        'café'
    """
    return _UNSAFE.sub(_escape_char, text)


#: What ``json.dumps(..., ensure_ascii=False)`` leaves raw that a terminal
#: would act on. It escapes C0 controls itself; these occur only inside
#: strings, so a \uXXXX escape keeps the JSON valid and equal.
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def terminal_json(value: Any, *, indent: int | None = None) -> str:
    """``value`` as JSON text that is safe to print to a terminal.

    Like ``json.dumps(value, ensure_ascii=False)`` (readable non-ASCII text),
    but DEL, the C1 controls, line separators, bidirectional controls and
    lone surrogates are written as ``\\uXXXX`` escapes.

    Args:
        value: Anything ``json.dumps`` takes.
        indent: As for ``json.dumps``.

    Returns:
        The JSON text.

    Examples:
        >>> print(terminal_json({"r": "café \\x9b31m \\x1b"}))
        {"r": "café \\u009b31m \\u001b"}
    """
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def describe(event: dict[str, Any]) -> str:
    """Summarise a wire dict on one line, safe to print to a terminal.

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
    # The whole line: JSON leaves DEL and the C1 range unescaped.
    return escape_controls(" ".join(parts))


def describe_stored(stored: StoredEvent) -> str:
    """Summarise a stored event with its local arrival time, safe to print.

    Args:
        stored: A stored event.

    Returns:
        E.g. ``14:03:22  event signup visitor=u1``.
    """
    when = time.strftime("%H:%M:%S", time.localtime(stored.received_at))
    return f"{when}  {describe(stored.event)}"
