"""The collector's checks on top of the shared wire contract (``_protocol``).

``check_wire_event`` holds the rules the SDK and the collector share. The
collector also meets what the SDK never sends: browser fields, JSON text
escapes that decode to lone surrogates, and numbers written in other scripts.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

from produl_server._protocol import MAX_ID, MAX_LANGUAGE, WireError, check_wire_event

#: (ours) Browser fields: PROTOCOL.md names them (d duration, sd scroll
#: depth, sw/sh screen size, l language, k site id) without types; these are
#: the browser tracker's, checked so a hand-written request learns its mistake.
MAX_SCREEN: Final = 100_000
MAX_SCROLL: Final = 100

_SURROGATE = re.compile("[\ud800-\udfff]")
_ASCII_DIGITS = re.compile(r"[0-9]{1,18}")


def ascii_int(text: str) -> int | None:
    """Parse a whole number written in ASCII digits only.

    ``str.isdigit()`` accepts ``"²"`` and ``int()`` accepts ``"٣"``, ``"1_0"``
    and ``" 7 "``; HTTP numbers are ASCII digits (issue #9, item 10).

    Args:
        text: E.g. a ``Content-Length`` header or a query parameter.

    Returns:
        The number, or ``None`` when ``text`` is anything but 1 to 18 ASCII digits.
    """
    return int(text) if _ASCII_DIGITS.fullmatch(text) else None


def check_event(obj: Any) -> dict[str, Any]:
    """Validate one decoded request body the way the collector answers it.

    Args:
        obj: The decoded JSON body of one ``POST /api/collect``.

    Returns:
        The same object, a valid pageview or event, storable as UTF-8.

    Raises:
        WireError: With the error code, a sentence and the offending key.
    """
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_depth(key, value)
            _check_unicode(key, value)
    event = check_wire_event(obj)
    _check_browser_fields(event)
    return event


def site_id(obj: Any) -> str | None:
    """The site id ``k`` a keyless (browser) request identifies itself with.

    Args:
        obj: The decoded JSON body.

    Returns:
        ``k`` when it is a usable string, else ``None``.
    """
    if not isinstance(obj, dict):
        return None
    k = obj.get("k")
    if isinstance(k, str) and 1 <= len(k) <= MAX_ID and not _SURROGATE.search(k):
        return k
    return None


#: The deepest nesting of lists and objects a value may have: the SDK's own
#: limit. Checked without recursion, before anything recurses into it.
MAX_DEPTH: Final = 64


def _check_depth(key: str, value: Any) -> None:
    """Refuse a value nested deeper than :data:`MAX_DEPTH` (a 400, never a crash)."""
    level = [value]
    for _depth in range(MAX_DEPTH + 1):
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return
    raise WireError(
        "invalid_properties",
        f"{key} is nested more than {MAX_DEPTH} levels deep; flatten it.",
        key,
    )


def _check_unicode(key: str, value: Any) -> None:
    # json.loads turns the text escape "\ud800" into a lone surrogate, which
    # no UTF-8 store can hold: SQLite refused it after a 204-worthy check and
    # the client retried forever (issue #9, item 10).
    field = key if not _SURROGATE.search(key) else key.encode("utf-8", "backslashreplace").decode()
    if _SURROGATE.search(key) or _has_surrogate(value):
        raise WireError(
            "invalid_unicode",
            f"{field} holds a lone surrogate (an unpaired \\ud800-\\udfff escape); "
            "send valid Unicode.",
            field,
        )


def _has_surrogate(value: Any) -> bool:
    # Iterative: it runs before the depth check, on any depth json.loads
    # could decode (issue #18, item 12).
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item) is not None:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_browser_fields(event: dict[str, Any]) -> None:
    if "d" in event and not (_is_number(event["d"]) and event["d"] >= 0):
        raise WireError("invalid_field", "d (duration) must be a number >= 0.", "d")
    if "sd" in event and not (_is_number(event["sd"]) and 0 <= event["sd"] <= MAX_SCROLL):
        message = f"sd (scroll depth) must be a number from 0 to {MAX_SCROLL}."
        raise WireError("invalid_field", message, "sd")
    for key in ("sw", "sh"):
        value = event.get(key, 0)
        if not (isinstance(value, int) and not isinstance(value, bool)):
            raise WireError("invalid_field", f"{key} (screen size) must be a whole number.", key)
        if not 0 <= value <= MAX_SCREEN:
            message = f"{key} (screen size) must be from 0 to {MAX_SCREEN}."
            raise WireError("invalid_field", message, key)
    for key, high in (("l", MAX_LANGUAGE), ("k", MAX_ID)):
        if key in event and not (isinstance(event[key], str) and 1 <= len(event[key]) <= high):
            message = f"{key} must be a string of 1 to {high} characters."
            raise WireError("invalid_field", message, key)
