"""The client's configuration: immutable, validated once, at construction."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

import attrs
from urllib3.util import parse_url

from ._protocol import DEFAULT_API_URL, MAX_BODY
from .exceptions import ConfigurationError, DeliveryError, InvalidEventError

log = logging.getLogger("produl_server")

KEY_ENV = "PRODUL_SERVER_KEY"
URL_ENV = "PRODUL_API_URL"
SPOOL_ENV = "PRODUL_SPOOL_DIR"
QUOTA_DIR_ENV = "PRODUL_QUOTA_DIR"
REDIS_ENV = "PRODUL_REDIS_URL"
QUOTA_KEY_ENV = "PRODUL_QUOTA_KEY"
DEFAULT_PROPERTIES_ENV = "PRODUL_DEFAULT_PROPERTIES"
ENABLED_ENV = "PRODUL_ENABLED"
VISITOR_SECRET_ENV = "PRODUL_VISITOR_SECRET"  # noqa: S105 -- a variable name
MIN_SECRET_BYTES = 16
_FALSE_WORDS = frozenset(("0", "false", "no", "off"))
_TRUE_WORDS = frozenset(("1", "true", "yes", "on"))

#: The type of ``on_error``: ``on_error(error, event)``, where *event* is the
#: wire dict of the dropped event (or the call's arguments, for an invalid one).
ErrorHook = Callable[[DeliveryError, Mapping[str, Any]], object]
BeforeSend = Callable[[dict[str, Any]], dict[str, Any] | None]


def mask_key(key: str) -> str:
    """Show a server key as its prefix and last four characters only.

    Args:
        key: A server key.

    Returns:
        For example ``"sk_…a1b2"``; keys of 8 characters or fewer are fully hidden.
    """
    if len(key) <= 8:
        return "…"
    prefix = key[:3] if key.startswith("sk_") else ""
    return f"{prefix}…{key[-4:]}"


#: The HMAC key of :func:`key_fingerprint`: fixed and public; it only keeps
#: the fingerprint apart from any other hash of the same key.
_FINGERPRINT_CONTEXT = b"produl-server spool owner v1"


def key_fingerprint(key: str) -> str:
    """Name the owner of a spooled event without storing its server key.

    Spool rows (SQLite) and stream entries (Redis) carry this fingerprint, so a
    client sends only the events its own key tracked: two sites that share an
    ``api_url`` and a spool never send each other's events (issue #18).

    Args:
        key: A server key.

    Returns:
        32 lowercase hex digits: the first 128 bits of HMAC-SHA256 of the key
        under a fixed context. Stable across processes, versions and hosts;
        a server key carries far too much entropy to be guessed back from it.
    """
    digest = hmac.new(_FINGERPRINT_CONTEXT, key.encode("utf-8"), hashlib.sha256)
    return digest.hexdigest()[:32]


def exit_lanes(max_in_flight: int) -> int:
    """How many requests may be in flight while the process exits.

    Nothing else needs the CPU then, and the backlog must go before the
    exit deadline: up to 8 times ``max_in_flight``, at most 32. With
    ``max_in_flight=1`` (strict queue order) it stays 1. On Python 3.12,
    where no thread starts at exit, the lanes for them start before it
    (:mod:`._lanes`).
    """
    return 1 if max_in_flight == 1 else min(max_in_flight * 8, 32)


#: The largest value of every duration option, in seconds: one day. Far
#: above any useful setting, and far below threading.TIMEOUT_MAX, past which
#: the sender's waits raise OverflowError (issue #9).
MAX_SECONDS = 86_400.0
#: The largest max_requests_per_minute (a bigger one overflows the pacer).
MAX_RATE = 1_000_000


def _show(value: object) -> str:
    """repr() for an error message, short even for a huge int (whose repr may raise)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return repr(value)


def _seconds(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a number, not {type(value).__name__}")
    # Chained comparisons are exact for ints of any size and false for NaN.
    if not (0 <= value <= MAX_SECONDS) or (value == 0 and not allow_zero):
        rule = "from 0 to" if allow_zero else "more than 0 and at most"
        raise ConfigurationError(
            f"{name} must be {rule} {MAX_SECONDS:g} seconds (one day), not {_show(value)}"
        )


def _check_number(allow_zero: bool = False) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        _seconds(attribute.name, value, allow_zero=allow_zero)

    return check


def _check_int(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{attribute.name} must be an integer >= 1, not {_show(value)}")


def _check_bool(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{attribute.name} must be True or False, not {_show(value)}")


def _check_key(inst: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if inst.enabled is False and (value is None or value == ""):
        return  # a disabled client sends nothing, so it needs no key
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(
            f"no server key: pass server_key=... or set the {KEY_ENV} environment variable "
            "(Settings → Server keys in the Produl dashboard)"
        )
    if not value.isascii() or not value.isprintable() or " " in value:
        _refuse_key_character(value)


def _refuse_key_character(key: str) -> None:
    """Name the first character a key cannot hold, by code point, never the key.

    A BOM from a secrets file, a zero-width space or an en dash from a web
    page would otherwise make every request fail to encode its header, with
    the key in the exception (issue #9).
    """
    position, char = next((i, ch) for i, ch in enumerate(key) if not "!" <= ch <= "~")
    name = "BYTE ORDER MARK" if char == "\ufeff" else unicodedata.name(char, "")
    described = f"U+{ord(char):04X}" + (f" ({name})" if name else "")
    raise ConfigurationError(
        f"server_key has {described} at position {position}; a key is printable ASCII "
        "(no spaces) — check how it was copied"
    )


#: Query parameters whose value is a secret: redis-py logs in with
#: ``?password=``, and other clients read tokens the same way.
_SECRET_PARAMETERS = frozenset(
    {"password", "passwd", "pass", "pwd", "secret", "token", "access_token", "auth", "key"}
)


def mask_url(url: str) -> str:
    """Show a URL with its secrets masked, for messages and reprs.

    Masks the password in its userinfo, and the value of every query
    parameter named like a secret (``password``, ``token``, ``auth``...).
    Everything between ``//`` and the last ``@`` counts as userinfo, so a
    password with an unescaped ``/``, ``#`` or ``@`` is masked whole too.

    Args:
        url: A URL, valid or not.

    Returns:
        For example ``http://u:***@h:3128`` or ``redis://h:6379/0?password=***``;
        a user name alone (it may be a token) becomes ``***``.
    """
    end = url.rfind("@")
    if end >= 0:
        start = url.find("//")
        start = start + 2 if 0 <= start < end else 0
        user, colon, _password = url[start:end].partition(":")
        url = url[:start] + (f"{user}:***" if colon else "***") + url[end:]
    base, question, query = url.partition("?")
    if not question:
        return url
    query, hash_, fragment = query.partition("#")
    parts = []
    for part in query.split("&"):
        name, equals, _value = part.partition("=")
        secret = unquote(name).strip().lower() in _SECRET_PARAMETERS
        parts.append(f"{name}=***" if secret and equals else part)
    return f"{base}?{'&'.join(parts)}{hash_}{fragment}"


def _check_url(_inst: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigurationError(f"api_url must be a string, not {type(value).__name__}")
    shown = mask_url(value)
    if "@" in value:
        # Credentials in api_url are never sent (the server key authenticates),
        # yet would show in every repr and warning; refuse them instead.
        raise ConfigurationError(
            f"api_url must not contain user:password@ (got {shown!r}): the server key "
            "authenticates; write a literal @ in the path as %40"
        )
    try:
        url = parse_url(value)
    except ValueError:
        raise ConfigurationError(f"api_url {shown!r} is not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(
            f"api_url must be an http:// or https:// URL with a host, not {shown!r}"
        )
    if url.query or url.fragment:
        raise ConfigurationError(f"api_url must not have a query or fragment: {shown!r}")


def _check_hook(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not callable(value):
        raise ConfigurationError(f"{attribute.name} must be callable, not {type(value).__name__}")


def _check_verify(_inst: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool | str):
        raise ConfigurationError("verify must be True, False or the path of a CA bundle")


def _check_proxy(_inst: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise ConfigurationError(f"proxy must be a string, not {type(value).__name__}")
    try:
        url = parse_url(value)
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(
            f"proxy must be an http:// or https:// URL with a host, not {mask_url(value)!r} "
            "(percent-escape @, /, # or : in its user name or password)"
        )
    _check_proxy_credentials(value)


def proxy_credentials(proxy: str) -> tuple[str, str] | None:
    """The user name and password of a proxy URL, percent-escapes decoded.

    Args:
        proxy: A proxy URL that ``urllib3.util.parse_url`` accepts.

    Returns:
        ``(user, password)``, or None when the URL has no credentials.
    """
    auth = parse_url(proxy).auth
    if not auth:
        return None
    # The URL carries them percent-encoded (p%40ss for p@ss).
    user, _colon, password = auth.partition(":")
    return unquote(user), unquote(password)


def _check_proxy_credentials(proxy: str) -> None:
    # Basic authentication sends Latin-1 (urllib3's make_headers); anything
    # else raised UnicodeEncodeError, holding the password, on every send.
    user, password = proxy_credentials(proxy) or ("", "")
    if ":" in user:  # from %3A: the proxy would split it as user:password
        raise ConfigurationError("the proxy's user name cannot contain ':'")
    for what, text in (("user name", user), ("password", password)):
        bad = next((i for i, ch in enumerate(text) if ord(ch) > 0xFF), None)
        if bad is not None:
            raise ConfigurationError(
                f"the proxy's {what} has U+{ord(text[bad]):04X} at position {bad} (after "
                "decoding percent-escapes as UTF-8); proxy credentials must be Latin-1 text"
            )


def _check_directory(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigurationError(
            f"{attribute.name} must be the path of a directory, or None, not {_show(value)}"
        )


def _check_redis_url(_inst: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise ConfigurationError(f"redis_url must be a string, not {type(value).__name__}")
    if value.partition("://")[0] not in ("redis", "rediss", "unix"):
        raise ConfigurationError(
            f"redis_url must be a redis://, rediss:// or unix:// URL, not {mask_url(value)!r}"
        )


def _check_quota_key(_inst: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not 1 <= len(value) <= 200:
        raise ConfigurationError("quota_key must be a string of 1 to 200 characters, or None")


def _directory(value: Any) -> Any:
    """Accept a ``pathlib.Path`` (any path-like) as well as a string."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _spool_directory(value: Any) -> Any:
    """``spool_dir``: a path-like as a string; ``False`` (no spool at all) as None."""
    return None if value is False else _directory(value)


def default_spool_path(environ: Mapping[str, str] = os.environ) -> str | None:
    """Where a client keeps what its exit could not send, when ``spool_dir`` is not set.

    ``$XDG_STATE_HOME/produl-server/spool``, else
    ``~/.local/state/produl-server/spool`` (on Windows,
    ``%LOCALAPPDATA%\\produl-server\\spool``): private to the user, and kept
    across reboots, unlike a runtime or temp directory.

    Args:
        environ: Where to read ``XDG_STATE_HOME`` and ``HOME`` from.

    Returns:
        The directory (it may not exist yet), or None when the user has no
        home directory to keep it in.
    """
    if os.name == "nt":  # pragma: no cover - the tests run on POSIX
        base = environ.get("LOCALAPPDATA", "")
        return os.path.join(base, "produl-server", "spool") if os.path.isabs(base) else None
    state = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):  # the XDG spec: a relative one is to be ignored
        home = environ.get("HOME") or os.path.expanduser("~")
        if not os.path.isabs(home):
            return None
        state = os.path.join(home, ".local", "state")
    return os.path.join(state, "produl-server", "spool")


def _spool_options(options: dict[str, Any], environ: Mapping[str, str]) -> None:
    """``spool_dir`` from ``PRODUL_SPOOL_DIR`` (``off``: no spool), else the default spool.

    With no spool asked for, nor turned off, the exit keeps its leftovers in
    the user's default spool (issue #22); a fleet (``redis_url``, already
    read) spools in Redis instead.
    """
    spool = options.get("spool_dir")
    if spool is None and environ.get(SPOOL_ENV):
        text = environ[SPOOL_ENV]
        spool = options["spool_dir"] = False if text.strip().lower() in _FALSE_WORDS else text
    if spool is None and options.get("redis_url") is None:
        options.setdefault("default_spool_dir", default_spool_path(environ))


def _default_properties(value: Any) -> dict[str, Any] | None:
    """Validate and snapshot ``default_properties`` once, as ``track_event`` would."""
    from ._event import clean_properties  # noqa: PLC0415 -- _event imports nothing of ours back

    if value is None:
        return None
    try:
        cleaned = clean_properties(value)
    except InvalidEventError as exc:
        text = str(exc)
        if text.startswith("properties"):
            text = text[len("properties") :]
        raise ConfigurationError(f"default_properties{text}") from None
    size = len(json.dumps(cleaned, ensure_ascii=False).encode())
    if size > MAX_BODY:
        raise ConfigurationError(
            f"default_properties encode to {size} bytes, over the {MAX_BODY}-byte "
            "limit of one request"
        )
    return cleaned


def _secret(value: Any) -> bytes | None:
    """``visitor_id_secret`` as bytes; never shown in an error."""
    if value is None:
        return None
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
    elif isinstance(value, bytes | bytearray):
        raw = bytes(value)
    else:
        raise ConfigurationError(
            f"visitor_id_secret must be a str or bytes, not {type(value).__name__}"
        )
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"visitor_id_secret must be at least {MIN_SECRET_BYTES} bytes long, "
            f"not {len(raw)}; use a long random value, e.g. secrets.token_hex(32)"
        )
    return raw


def _flag(name: str, text: str) -> bool:
    """Read an on/off environment variable; unset or empty means on."""
    word = text.strip().lower()
    if not word or word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ConfigurationError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), not {text!r}")


def _json_object(name: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be a JSON object: {exc}") from None
    if type(value) is not dict:
        raise ConfigurationError(f"{name} must be a JSON object, not {type(value).__name__}")
    return value


def _check_rpm(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    _check_int(_inst, attribute, value)
    if value > MAX_RATE:
        raise ConfigurationError(
            f"{attribute.name} must be at most {MAX_RATE:,}, or None to turn pacing off"
        )


def _repr_proxy(proxy: str | None) -> str:
    return repr(proxy if proxy is None else mask_url(proxy))


def is_loopback(host: str) -> bool:
    """Whether *host* names this machine (so plain http cannot leak the key).

    Args:
        host: A host name or an IP address, IPv6 with or without brackets.
    """
    host = host.strip("[]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen(kw_only=True)
class Config:
    """Every option of :class:`~produl_server.Produl`, validated and frozen.

    Internals receive this object, never loose keyword arguments. Build it
    with :meth:`from_env`; ``Produl.config`` shows the one a client uses.

    Attributes:
        server_key: The site's server key (its repr shows only the last 4).
        api_url: Base URL of the collection API.
        enabled: False validates every call but sends nothing.
        sync_mode: Send on the caller's thread; no sender thread.
        flush_at: Send when this many events are queued.
        flush_interval: Send this many seconds after the last enqueue.
        max_delay: Send at the latest this many seconds after the oldest
            queued event was queued.
        max_queue_size: Events held at most before new ones are dropped.
        shutdown_timeout: Seconds the exit hook or shutdown may spend.
        request_timeout: Seconds for one whole request (connection, TLS,
            answer); through a proxy, to connect and for each wait on the answer.
        max_requests_per_minute: The client-side pace, or None for none.
        max_retry_time: Seconds an event may keep failing before it is
            given up (429 answers do not count).
        max_in_flight: Requests sent at once when there is a backlog.
        retry_initial_delay: The first backoff ceiling, doubled per failure.
        retry_max_delay: The largest backoff between two attempts.
        raise_on_invalid: False turns invalid input into a counted drop.
        on_error: The error hook, or None.
        before_send: Called with each event's wire dict before it is
            queued; returns it (possibly changed) or None to drop it.
        default_properties: Properties merged under every custom event's
            own (the call's keys win), validated and copied once.
        visitor_id_secret: The HMAC key that pseudonymizes visitor ids and
            session keys (its repr is masked), or None.
        proxy: An HTTP(S) proxy URL, or None for the environment's.
        verify: TLS verification: True, False or a CA bundle path.
        shared_quota: Pace with every client of this user on this host that
            sends to the same ``api_url`` (True), or alone (False).
        quota_dir: Where the shared quota's file lives; None for the user's
            runtime or temp directory.
        spool_dir: Where to keep what cannot be sent in time, or None.
        default_spool_dir: Where the exit keeps what it could not send when
            there is no ``spool_dir`` (``$XDG_STATE_HOME/produl-server/spool``), or
            None: off (``spool_dir=False``, ``PRODUL_SPOOL_DIR=off``, a
            ``redis_url``, or a config not built by :meth:`from_env`).
        redis_url: The Redis that holds a fleet's quota and spool, or None.
        quota_key: Names the Redis quota window, for clients that share an
            address but not an ``api_url``; None: the ``api_url``.
    """

    server_key: str = attrs.field(repr=lambda key: repr(mask_key(key)), validator=_check_key)
    api_url: str = attrs.field(
        default=DEFAULT_API_URL, repr=lambda url: repr(mask_url(url)), validator=_check_url
    )
    enabled: bool = attrs.field(default=True, validator=_check_bool)
    sync_mode: bool = attrs.field(default=False, validator=_check_bool)
    flush_at: int = attrs.field(default=10, validator=_check_int)
    flush_interval: float = attrs.field(default=5.0, validator=_check_number())
    max_delay: float = attrs.field(default=30.0, validator=_check_number())
    max_queue_size: int = attrs.field(default=10_000, validator=_check_int)
    shutdown_timeout: float = attrs.field(default=5.0, validator=_check_number(allow_zero=True))
    request_timeout: float = attrs.field(default=10.0, validator=_check_number())
    max_requests_per_minute: int | None = attrs.field(default=2000, validator=_check_rpm)
    max_retry_time: float = attrs.field(default=600.0, validator=_check_number(allow_zero=True))
    max_in_flight: int = attrs.field(default=4, validator=_check_int)
    retry_initial_delay: float = attrs.field(default=0.5, validator=_check_number())
    retry_max_delay: float = attrs.field(default=30.0, validator=_check_number())
    raise_on_invalid: bool = attrs.field(default=True, validator=_check_bool)
    on_error: ErrorHook | None = attrs.field(default=None, validator=_check_hook)
    before_send: BeforeSend | None = attrs.field(default=None, validator=_check_hook)
    default_properties: dict[str, Any] | None = attrs.field(
        default=None, converter=_default_properties
    )
    visitor_id_secret: bytes | None = attrs.field(
        default=None, converter=_secret, repr=lambda value: "None" if value is None else "'***'"
    )
    proxy: str | None = attrs.field(default=None, repr=_repr_proxy, validator=_check_proxy)
    verify: bool | str = attrs.field(default=True, validator=_check_verify)
    shared_quota: bool = attrs.field(default=True, validator=_check_bool)
    quota_dir: str | None = attrs.field(
        default=None, converter=_directory, validator=_check_directory
    )
    spool_dir: str | None = attrs.field(
        default=None, converter=_spool_directory, validator=_check_directory
    )
    default_spool_dir: str | None = attrs.field(
        default=None, converter=_directory, validator=_check_directory
    )
    redis_url: str | None = attrs.field(
        default=None,
        repr=lambda url: repr(url if url is None else mask_url(url)),
        validator=_check_redis_url,
    )
    quota_key: str | None = attrs.field(default=None, validator=_check_quota_key)

    def __attrs_post_init__(self) -> None:
        if self.max_in_flight > 32:
            raise ConfigurationError(
                f"max_in_flight must be 1 to 32, not {_show(self.max_in_flight)}"
            )
        if self.retry_max_delay < self.retry_initial_delay:
            raise ConfigurationError("retry_max_delay must be >= retry_initial_delay")
        url = parse_url(self.api_url)
        if url.scheme == "http" and not is_loopback(url.host or ""):
            log.warning(
                "api_url %s uses plain http to a host that is not this machine: "
                "the server key would cross the network unencrypted; use https",
                mask_url(self.api_url),
            )

    @classmethod
    def from_env(
        cls,
        server_key: str | None,
        api_url: str | None,
        environ: Mapping[str, str] = os.environ,
        **options: Any,
    ) -> Config:
        """Build a config, taking the key and URL from the environment when not given.

        Args:
            server_key: The key, or ``None`` to read ``PRODUL_SERVER_KEY``.
            api_url: The API base URL, or ``None`` to read ``PRODUL_API_URL``
                (default ``https://app.produl.tech``).
            environ: Where to read the variables from.
            options: The other options, by name.

        Returns:
            The validated configuration.

        Raises:
            ConfigurationError: When a value is missing or invalid.
        """
        if server_key is None:
            server_key = environ.get(KEY_ENV, "")
        if api_url is None:
            api_url = environ.get(URL_ENV) or DEFAULT_API_URL
        for option, name in (
            ("quota_dir", QUOTA_DIR_ENV),
            ("redis_url", REDIS_ENV),
            ("quota_key", QUOTA_KEY_ENV),
        ):
            if options.get(option) is None and environ.get(name):
                options[option] = environ[name]
        _spool_options(options, environ)
        if options.get("visitor_id_secret") is None and environ.get(VISITOR_SECRET_ENV):
            options["visitor_id_secret"] = environ[VISITOR_SECRET_ENV]
        if options.get("enabled") is None:
            options["enabled"] = _flag(ENABLED_ENV, environ.get(ENABLED_ENV, ""))
        if options.get("default_properties") is None and environ.get(DEFAULT_PROPERTIES_ENV):
            options["default_properties"] = _json_object(
                DEFAULT_PROPERTIES_ENV, environ[DEFAULT_PROPERTIES_ENV]
            )
        try:
            return cls(server_key=server_key, api_url=api_url, **options)
        except TypeError as exc:
            # attrs' "unexpected keyword argument" for a misspelt option.
            raise ConfigurationError(str(exc).replace("__init__()", "Produl()")) from None
