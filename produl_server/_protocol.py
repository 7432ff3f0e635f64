"""The wire contract of Produl's collection API, in one place.

Pure data and pure functions, no I/O. The client (``_event``) and the local
collector (``collector``) both import from here, so the limits they enforce
cannot drift apart. ``PROTOCOL.md`` is the prose version.
"""

from __future__ import annotations

import math
from typing import Any, Final

COLLECT_PATH: Final = "/api/collect"
#: Newer browser trackers post here; the collector accepts both paths.
ALIAS_PATH: Final = "/r"
KEY_HEADER: Final = "X-Produl-Server-Key"
DEFAULT_API_URL: Final = "https://app.produl.tech"

#: Requests per minute per client IP, with and without a server key.
KEYED_RATE_LIMIT: Final = 2000
KEYLESS_RATE_LIMIT: Final = 200

MAX_NAME: Final = 200
MAX_PATH: Final = 2048
MAX_URL: Final = 8192
MAX_ID: Final = 256
MAX_TITLE: Final = 2048
#: The longest language tag (``l``) accepted: the longest BCP 47 tag in common use.
MAX_LANGUAGE: Final = 35
MAX_BODY: Final = 64 * 1024

PAGEVIEW: Final = "pv"
EVENT: Final = "ev"

#: Every key the server SDK may send, with its Python argument name.
WIRE_KEYS: Final = {
    "t": "type",
    "n": "name",
    "p": "path",
    "u": "url",
    "vi": "visitor_id",
    "sk": "session_key",
    "ti": "title",
    "r": "referrer",
    "l": "language",
    "pr": "properties",
}

#: Browser-only keys the collector tolerates (the browser tracker sends them).
#: ``l`` is also sent by the framework middleware, for pageviews.
BROWSER_KEYS: Final = frozenset({"d", "sd", "sw", "sh", "l", "k"})

#: (wire key, maximum length, minimum length) for every string field.
STRING_LIMITS: Final = {
    "n": (1, MAX_NAME),
    "p": (1, MAX_PATH),
    "u": (0, MAX_URL),
    "vi": (1, MAX_ID),
    "sk": (1, MAX_ID),
    "ti": (0, MAX_TITLE),
    "r": (0, MAX_URL),
}


class WireError(Exception):
    """A payload the collector refuses; carries the JSON error body's fields."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    def as_body(self) -> dict[str, str]:
        """The JSON error body PROTOCOL.md describes."""
        body = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


def default_url(path: str) -> str:
    """The URL sent when a path is given and a URL is not."""
    return "https://server" + path


def check_wire_event(obj: Any) -> dict[str, Any]:
    """Validate one decoded request body as the collector does.

    Args:
        obj: The decoded JSON body of one ``POST /api/collect``.

    Returns:
        The same object, known to be a valid pageview or event.

    Raises:
        WireError: With the error code, a sentence and the offending key.
    """
    if not isinstance(obj, dict):
        raise WireError("invalid_body", "The body must be one JSON object.")
    kind = obj.get("t")
    if kind not in (PAGEVIEW, EVENT):
        raise WireError("invalid_type", 't must be "pv" (pageview) or "ev" (event).', "t")
    for key, value in obj.items():
        _check_field(key, value)
    _check_shape(obj, kind)
    if "p" in obj and not obj["p"].startswith("/"):
        raise WireError("invalid_path", "p must start with '/'.", "p")
    if "pr" in obj:
        props = obj["pr"]
        if not isinstance(props, dict):
            raise WireError("invalid_properties", "pr must be a JSON object.", "pr")
        _check_json_value(props, "pr")
    return obj


def _check_field(key: str, value: Any) -> None:
    """One key of the body: known, not null, a string of the right length."""
    if key not in WIRE_KEYS and key not in BROWSER_KEYS:
        raise WireError("unknown_field", f"Unknown key {key!r}.", key)
    if value is None:
        raise WireError("null_field", f"{key} is null; omit absent keys instead.", key)
    if key in STRING_LIMITS:
        low, high = STRING_LIMITS[key]
        if not isinstance(value, str):
            raise WireError("invalid_field", f"{key} must be a string.", key)
        if not low <= len(value) <= high:
            raise WireError(
                "field_length",
                f"{key} must be {low} to {high} characters long, not {len(value)}.",
                key,
            )


def _check_shape(obj: dict[str, Any], kind: str) -> None:
    """The keys a pageview or an event must have, and must not."""
    if kind == EVENT:
        required: tuple[str, ...] = ("n",)
        forbidden: tuple[str, ...] = ("ti", "r")
        what = "An event"
    else:
        required, forbidden, what = ("p", "vi"), ("n", "pr"), "A pageview"
    for key in required:
        if key not in obj:
            needs = "a name (n)" if key == "n" else key
            raise WireError("missing_field", f"{what} needs {needs}.", key)
    for key in forbidden:
        if key in obj:
            raise WireError("invalid_field", f"{what} has no {key}.", key)


def _check_json_value(value: Any, where: str) -> None:
    # json.loads gives NaN/Infinity for those literals; the API refuses them.
    if isinstance(value, float) and not math.isfinite(value):
        raise WireError("invalid_properties", f"{where} is not a finite number.", "pr")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json_value(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_value(item, f"{where}[{index}]")
