"""Validation and encoding of one pageview or event: pure, no I/O.

Runs on the caller's thread, so it is written for speed: exact type checks
first, slow conversions only when a value needs one, and key paths for error
messages built only when there is an error to report.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import hashlib
import hmac
import json
import logging
import math
import re
import sys
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ._protocol import (
    EVENT,
    MAX_BODY,
    MAX_ID,
    MAX_LANGUAGE,
    MAX_NAME,
    MAX_PATH,
    MAX_TITLE,
    MAX_URL,
    PAGEVIEW,
    WIRE_KEYS,
    default_url,
)
from .exceptions import InvalidEventError, InvalidEventTypeError

log = logging.getLogger("produl_server")

# One encoder, built once: json.dumps() with keyword arguments builds a new
# encoder per call, and even JSONEncoder.encode() builds a new C encoder per
# call. The snapshot below has no cycles, so skip that check.
_encoder = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
)
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
if _c_make_encoder is not None:  # CPython's C accelerator (PyPy has none)
    _c_encode = _c_make_encoder(
        None,  # markers: no cycle check
        _encoder.default,
        json.encoder.encode_basestring,  # ensure_ascii=False
        None,  # indent
        ":",
        ",",
        False,  # sort_keys
        False,  # skipkeys
        False,  # allow_nan
    )

    def _encode(value: Any) -> str:
        return "".join(_c_encode(value, 0))

else:  # pragma: no cover - only without the C accelerator
    _encode = _encoder.encode  # type: ignore[assignment]

_SCALARS = frozenset({str, int, bool, type(None)})

_MAX_DEPTH = 64

_SURROGATE = re.compile("[\ud800-\udfff]")


@attrs.frozen(kw_only=True)
class PageviewData:
    """A server-side pageview, the shape the Node SDK's ``PageviewData`` has.

    Pass it to :meth:`Produl.track_pageview` instead of keyword arguments.

    Args:
        path: Normalized path, e.g. ``/pricing`` (required).
        visitor_id: Stable identifier for the visitor (required).
        url: Full URL; defaults to ``https://server{path}``.
        title: Page title.
        referrer: Referrer URL.
        session_key: Groups pageviews into a session.
        language: The visitor's language, a tag such as ``fr-CH``.
    """

    path: str
    visitor_id: str | int | uuid.UUID
    url: str | None = None
    title: str | None = None
    referrer: str | None = None
    session_key: str | int | uuid.UUID | None = None
    language: str | None = None


class _PathError(Exception):
    """Raised deep inside properties; collects the key path while unwinding."""

    def __init__(self, message: str, *, type_error: bool) -> None:
        super().__init__(message)
        self.message = message
        self.type_error = type_error
        self.segments: list[str] = []

    def to_invalid(self) -> InvalidEventError:
        where = "properties" + "".join(reversed(self.segments))
        cls = InvalidEventTypeError if self.type_error else InvalidEventError
        return cls(where, self.message)


def _string(field: str, value: object, low: int, high: int) -> str:
    if type(value) is not str:
        if not isinstance(value, str):
            raise InvalidEventTypeError(field, f"must be a str, not {type(value).__name__}")
        value = str.__str__(value)
    if not low <= len(value) <= high:
        if not value and low:
            raise InvalidEventError(field, "must not be empty")
        raise InvalidEventError(field, f"must be at most {high} characters, not {len(value)}")
    return value


def _ident(field: str, value: object) -> str:
    """A visitor id or session key: a str, or an int / UUID made into one."""
    if type(value) is str:
        if 0 < len(value) <= MAX_ID:
            return value
        return _string(field, value, 1, MAX_ID)
    if isinstance(value, int | uuid.UUID) and not isinstance(value, bool):
        try:
            text = str(value)
        except ValueError:  # an int over sys.get_int_max_str_digits() digits
            raise InvalidEventError(field, _too_large()) from None
        except Exception as exc:  # a subclass whose __str__ raises
            raise InvalidEventError(field, _raised_reading(exc)) from exc
        return _string(field, text, 1, MAX_ID)
    return _string(field, value, 1, MAX_ID)


# A language tag as BCP 47 spells one: letters, then subtags of letters
# and digits joined by hyphens, each subtag at most 8 characters long.
_LANGUAGE = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")


def _language(value: object) -> str:
    language = _string("language", value, 1, MAX_LANGUAGE)
    if not _LANGUAGE.fullmatch(language):
        raise InvalidEventError(
            "language", f"must be a language tag such as 'en' or 'fr-CH', got {language[:40]!r}"
        )
    return language


def is_language_tag(value: str) -> bool:
    """Whether *value* would be accepted as a pageview's ``language``."""
    return len(value) <= MAX_LANGUAGE and _LANGUAGE.fullmatch(value) is not None


def _path(value: object) -> str:
    path = _string("path", value, 1, MAX_PATH)
    if path[0] != "/":
        raise InvalidEventError("path", f"must start with '/', got {path[:40]!r}")
    return path


def _clean(value: Any, depth: int, active: set[int]) -> Any:
    """Snapshot one property value into plain JSON types, or raise _PathError."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        if value - value == 0.0:  # false for NaN and the infinities
            return value
        raise _PathError(f"{value!r} is not a finite number", type_error=False)
    if kind is dict or kind is list or kind is tuple or isinstance(value, Mapping | list | tuple):
        if depth >= _MAX_DEPTH:
            raise _PathError(f"nested more than {_MAX_DEPTH} levels deep", type_error=False)
        marker = id(value)
        if marker in active:
            raise _PathError("refers back to itself (a cycle)", type_error=False)
        active.add(marker)
        try:
            if isinstance(value, Mapping):
                return _clean_mapping(value, depth + 1, active)
            return _clean_sequence(value, depth + 1, active)
        finally:
            active.discard(marker)
    return _convert(value)


def _clean_mapping(value: Mapping[Any, Any], depth: int, active: set[int]) -> dict[str, Any]:
    out = {}
    for key, item in value.items():
        if type(key) is not str:
            try:
                shown = _short_repr(key)
            except Exception:
                shown = f"<a {type(key).__name__}>"
            error = _PathError(
                f"keys must be str, not {type(key).__name__} ({shown})", type_error=True
            )
            error.segments.append(f"[{shown}]")
            raise error from None
        try:
            out[key] = _clean(item, depth, active)
        except _PathError as error:
            error.segments.append(_segment(key))
            raise
        except Exception as exc:  # the user's own object raised while read
            unreadable = _PathError(_raised_reading(exc), type_error=True)
            unreadable.segments.append(_segment(key))
            raise unreadable from exc
    return out


def _clean_sequence(value: list[Any] | tuple[Any, ...], depth: int, active: set[int]) -> list[Any]:
    out = []
    for index, item in enumerate(value):
        try:
            out.append(_clean(item, depth, active))
        except _PathError as error:
            error.segments.append(f"[{index}]")
            raise
        except Exception as exc:  # the user's own object raised while read
            unreadable = _PathError(_raised_reading(exc), type_error=True)
            unreadable.segments.append(f"[{index}]")
            raise unreadable from exc
    return out


def _convert(value: Any) -> Any:
    """The slow path: the conversions PROTOCOL.md allows, else an error."""
    if isinstance(value, enum.Enum):
        return _clean(value.value, 0, set())
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _clean(float(value), 0, set())
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return _decimal(value)
    raise _PathError(
        f"{type(value).__name__} cannot be sent as JSON; convert it to str, int, float, "
        "bool, None, a list or a dict",
        type_error=True,
    )


def _decimal(value: decimal.Decimal) -> int | float:
    """One rule for every Decimal: a JSON number, so a property keeps one type.

    A whole value becomes an int (``Decimal("49.00")`` is ``49``), any other
    the nearest float (``Decimal("4.90")`` is ``4.9``): the same column can
    then be summed on a dashboard. A value a float cannot hold (beyond about
    1e308) is refused; send it as a str if its digits matter.
    """
    if not value.is_finite():
        raise _PathError(f"Decimal {value} is not a finite number", type_error=False)
    # One rule for every finite Decimal: a JSON number, so a property keeps
    # its type from event to event and a dashboard can sum it (issue #23:
    # Decimal("4.90") used to arrive as a string, Decimal("49.00") as 49).
    # Whole values stay exact ints; others become the nearest float, which
    # keeps every digit up to 15 significant digits.
    if value == value.to_integral_value():
        return int(value)
    as_float = float(value)
    if as_float - as_float != 0.0:
        raise _PathError(f"Decimal {value} is too large for a JSON number", type_error=False)
    return as_float


def _properties(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidEventTypeError(
            "properties", f"must be a dict with str keys, not {type(value).__name__}"
        )
    if type(value) is dict:
        # The common case, a flat dict of plain scalars: a shallow copy is
        # the whole snapshot.
        scalars = _SCALARS
        for key, item in value.items():
            if type(key) is not str or type(item) not in scalars:
                break
        else:
            return dict(value)
    try:
        return _clean_mapping(value, 1, {id(value)})
    except _PathError as error:
        raise error.to_invalid() from error.__cause__
    except RecursionError:
        raise InvalidEventError("properties", "nested too deeply") from None
    except Exception as exc:  # the mapping itself raised while read (items(), ...)
        raise InvalidEventError("properties", _raised_reading(exc)) from exc


def _raised_reading(exc: BaseException) -> str:
    """The rule for a value whose own code raised while it was read."""
    try:
        text = str(exc)[:100]
    except Exception:
        text = ""
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"could not be read ({detail}); pass plain str, int, float, bool, list or dict values"


def clean_properties(value: object) -> dict[str, Any]:
    """Validate and snapshot a properties dict, as ``track_event`` does.

    Raises:
        InvalidEventError: Naming the key path and the rule broken.
    """
    return _properties(value)


def pseudonym(field: str, value: object, secret: bytes) -> str | None:
    """The keyed hash that replaces a visitor id or session key (``visitor_id_secret``).

    The id is validated first, as it would be unhashed; ``None`` stays ``None``.
    The result is the HMAC-SHA256 of the id's wire string, as 64 lowercase
    hex digits: the same id and secret always give the same text.

    Raises:
        InvalidEventError: The id is not one ``track_*`` would accept.
    """
    if value is None:
        return None
    text = _ident(field, value)
    return hmac.new(secret, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def _short_repr(value: object) -> str:
    """repr() for an error message; a huge int's repr would itself raise."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"
    return repr(value)


def _segment(key: str) -> str:
    """One ``["key"]`` of a key path; escaped if raw it could not be logged."""
    return f"[{json.dumps(key, ensure_ascii=_SURROGATE.search(key) is not None)}]"


def _too_large() -> str:
    # Python 3.11 (and 3.10.7) refuse to turn an int of more digits into text.
    limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
    return f"integer too large to send (over {limit} digits); send it as a str"


def _surrogate(text: str) -> str | None:
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return (
        f"contains a lone surrogate U+{ord(found.group()):04X} at position {found.start()}; "
        "strings must be valid Unicode (undecodable bytes in sys.argv or os.environ "
        "arrive as these)"
    )


def _unencodable(value: Any, where: str) -> InvalidEventError | None:
    """Find what made the encoder fail: a lone surrogate or a huge int.

    Only called once encoding has failed, so the fast path pays nothing.
    Values are already snapshotted: plain str, int, list and dict only.
    """
    if type(value) is str:
        problem = _surrogate(value)
        return None if problem is None else InvalidEventError(where, problem)
    if type(value) is int:
        try:
            repr(value)
        except ValueError:
            return InvalidEventError(where, _too_large())
        return None
    if type(value) is list:
        return _first_unencodable((f"{where}[{index}]", item) for index, item in enumerate(value))
    if type(value) is dict:
        for key in value:
            problem = _surrogate(key)
            if problem is not None:
                return InvalidEventError(where + _segment(key), "the key " + problem)
        return _first_unencodable((where + _segment(key), item) for key, item in value.items())
    return None


def _first_unencodable(items: Iterable[tuple[str, Any]]) -> InvalidEventError | None:
    for where, item in items:
        found = _unencodable(item, where)
        if found is not None:
            return found
    return None


def _unencodable_event(wire: dict[str, Any], exc: ValueError) -> InvalidEventError:
    found = _first_unencodable((WIRE_KEYS[key], value) for key, value in wire.items())
    # None is not expected: every other cause is refused before encoding.
    return found or InvalidEventError("event", f"cannot be encoded as JSON ({type(exc).__name__})")


def _finish(wire: dict[str, Any]) -> bytes:
    try:
        body = _encode(wire).encode()
    except ValueError as exc:  # UnicodeEncodeError, or an int too long for str()
        raise _unencodable_event(wire, exc) from None
    if len(body) > MAX_BODY:
        biggest = max(wire, key=lambda key: len(_encode(wire[key])))
        raise InvalidEventError(
            "event",
            f"encodes to {len(body)} bytes, over the {MAX_BODY}-byte limit of one request "
            f"(largest field: {biggest!r})",
        )
    return body


class _Once:
    """Log a warning the first time something happens in a process."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            log.warning(self.message)


warn_no_visitor = _Once(
    "track_event() was called without visitor_id: the event is kept but tied to "
    "no visitor; pass visitor_id=... (logged once per process)"
)


def encode_event(
    name: object,
    properties: object,
    visitor_id: object,
    path: object,
    url: object,
    session_key: object,
) -> bytes:
    """Validate a custom event and encode it as one request body.

    Raises:
        InvalidEventError: Naming the argument or key path and the rule broken.
    """
    if type(name) is not str or not 0 < len(name) <= MAX_NAME:
        name = _string("name", name, 1, MAX_NAME)
    page = full = None
    if path is not None:
        page = _path(path)
        full = default_url(page) if url is None else _string("url", url, 0, MAX_URL)
    elif url is not None:
        full = _string("url", url, 0, MAX_URL)
    # The visitor id first: the sender reads it back from there (visitor_of).
    if visitor_id is not None:
        wire: dict[str, Any] = {"vi": _ident("visitor_id", visitor_id), "t": EVENT, "n": name}
    else:
        warn_no_visitor()
        wire = {"t": EVENT, "n": name}
    if page is not None:
        wire["p"] = page
    if full is not None:
        wire["u"] = full
    if session_key is not None:
        wire["sk"] = _ident("session_key", session_key)
    if properties is not None:
        wire["pr"] = _properties(properties)
    return _finish(wire)


def encode_pageview(
    path: object,
    visitor_id: object,
    url: object,
    title: object,
    referrer: object,
    session_key: object,
    language: object = None,
) -> bytes:
    """Validate a pageview and encode it as one request body.

    Raises:
        InvalidEventError: Naming the argument and the rule broken.
    """
    if path is None:
        raise InvalidEventError("path", "is required for a pageview, e.g. path='/pricing'")
    if visitor_id is None:
        raise InvalidEventError("visitor_id", "is required for a pageview")
    clean_path = _path(path)
    full = default_url(clean_path) if url is None else _string("url", url, 0, MAX_URL)
    # The visitor id first: the sender reads it back from there (visitor_of).
    wire: dict[str, Any] = {
        "vi": _ident("visitor_id", visitor_id),
        "t": PAGEVIEW,
        "p": clean_path,
        "u": full,
    }
    if session_key is not None:
        wire["sk"] = _ident("session_key", session_key)
    if title is not None:
        wire["ti"] = _string("title", title, 0, MAX_TITLE)
    if referrer is not None:
        wire["r"] = _string("referrer", referrer, 0, MAX_URL)
    if language is not None:
        wire["l"] = _language(language)
    return _finish(wire)


_PAGEVIEW_KEYS = frozenset(("t", "p", "u", "vi", "sk", "ti", "r", "l"))
_EVENT_KEYS = frozenset(("t", "n", "p", "u", "vi", "sk", "pr"))


def encode_wire(wire: object) -> bytes:
    """Validate an event given in its wire words (``before_send``'s result) and encode it.

    The dict is checked as the keyword arguments of ``track_*`` are: the
    same rules, the same limits, an error naming the argument.

    Raises:
        InvalidEventError: Not a dict, an unknown or misplaced key, or a
            value that breaks a rule.
    """
    if type(wire) is not dict:
        raise InvalidEventError(
            "before_send", f"must return a dict or None, not {type(wire).__name__}"
        )
    kind = wire.get("t")
    allowed = _PAGEVIEW_KEYS if kind == PAGEVIEW else _EVENT_KEYS
    if kind not in (PAGEVIEW, EVENT):
        raise InvalidEventError("before_send", f"returned an event whose 't' is {kind!r}")
    unknown = sorted(str(key) for key in wire if key not in allowed)
    if unknown:
        raise InvalidEventError(
            "before_send", f"returned keys a {kind!r} event cannot carry: {', '.join(unknown)}"
        )
    get = wire.get
    if kind == PAGEVIEW:
        return encode_pageview(
            get("p"), get("vi"), get("u"), get("ti"), get("r"), get("sk"), get("l")
        )
    return encode_event(get("n"), get("pr"), get("vi"), get("p"), get("u"), get("sk"))


#: How a body with a visitor id begins: the encoders above write ``"vi"`` first.
_VISITOR_FIRST = b'{"vi":"'
#: Bytes enough for the longest visitor id and its closing quote: the encoder
#: writes a character in at most 6 bytes (``\u001f``; UTF-8 takes 4 at most;
#: a lone surrogate, which has no UTF-8, is refused before anything is queued).
_VISITOR_SPAN = len(_VISITOR_FIRST) + 6 * MAX_ID + 1
_decoder = json.JSONDecoder()


def visitor_of(body: bytes) -> str | None:
    """The visitor id of a body encoded here, read back from its first key; None without one.

    The sender needs it to keep one visitor's events in order (and the
    spool stores it); reading it from the body spares the queue holding it
    beside every body (issue #22, P4). JSON's own decoder reads the string,
    escapes and all. A body encoded elsewhere, or by an older release (a
    spooled one: the spool keeps its visitor id beside it), may hold its
    ``"vi"`` elsewhere: None then, and the event is merely not ordered with
    its visitor's others. Never raises: the sender calls it on events it has
    taken from the queue already.
    """
    if not body.startswith(_VISITOR_FIRST):
        return None
    # The cut may split a character after the visitor id: "ignore" drops it.
    head = body[:_VISITOR_SPAN].decode("utf-8", "ignore")
    try:  # the JSON value at the opening quote: the visitor id's string
        visitor = _decoder.raw_decode(head, len(_VISITOR_FIRST) - 1)[0]
    except ValueError:  # a body not encoded here
        return None
    return visitor if type(visitor) is str else None
