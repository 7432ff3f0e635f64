"""The client's configuration: immutable, validated once, at construction."""

from __future__ import annotations

import ipaddress
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from urllib3.util import parse_url

from ._protocol import DEFAULT_API_URL
from .exceptions import ConfigurationError, DeliveryError

log = logging.getLogger("produl_server")

KEY_ENV = "PRODUL_SERVER_KEY"
URL_ENV = "PRODUL_API_URL"

#: The type of ``on_error``: ``on_error(error, event)``, where *event* is the
#: wire dict of the dropped event (or the call's arguments, for an invalid one).
ErrorHook = Callable[[DeliveryError, Mapping[str, Any]], object]


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


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        rule = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{name} must be a finite number {rule}, not {value!r}")


def _check_number(allow_zero: bool = False) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        _positive(attribute.name, value, allow_zero=allow_zero)

    return check


def _check_int(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{attribute.name} must be an integer >= 1, not {value!r}")


def _check_bool(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{attribute.name} must be True or False, not {value!r}")


def _check_key(_inst: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(
            f"no server key: pass server_key=... or set the {KEY_ENV} environment variable "
            "(Settings → Server keys in the Produl dashboard)"
        )
    if value != value.strip() or any(ch.isspace() for ch in value):
        raise ConfigurationError("server_key contains whitespace; check how it was copied")


def _check_url(_inst: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigurationError(f"api_url must be a string, not {type(value).__name__}")
    try:
        url = parse_url(value)
    except ValueError as exc:
        raise ConfigurationError(f"api_url {value!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(
            f"api_url must be an http:// or https:// URL with a host, not {value!r}"
        )
    if url.query or url.fragment:
        raise ConfigurationError(f"api_url must not have a query or fragment: {value!r}")


def _check_hook(_inst: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not callable(value):
        raise ConfigurationError(f"on_error must be callable, not {type(value).__name__}")


def _check_verify(_inst: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool | str):
        raise ConfigurationError("verify must be True, False or the path of a CA bundle")


def _check_proxy(_inst: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str) or parse_url(value).scheme not in ("http", "https"):
        raise ConfigurationError(f"proxy must be an http:// or https:// URL, not {value!r}")


def _check_rpm(_inst: Any, _attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _check_int(_inst, _attribute, value)


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
        request_timeout: Seconds to connect, and to wait for an answer.
        max_requests_per_minute: The client-side pace, or None for none.
        max_retry_time: Seconds an event may keep failing before it is
            given up (429 answers do not count).
        max_in_flight: Requests sent at once when there is a backlog.
        retry_initial_delay: The first backoff ceiling, doubled per failure.
        retry_max_delay: The largest backoff between two attempts.
        raise_on_invalid: False turns invalid input into a counted drop.
        on_error: The error hook, or None.
        proxy: An HTTP(S) proxy URL, or None for the environment's.
        verify: TLS verification: True, False or a CA bundle path.
    """

    server_key: str = attrs.field(repr=lambda key: repr(mask_key(key)), validator=_check_key)
    api_url: str = attrs.field(default=DEFAULT_API_URL, validator=_check_url)
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
    proxy: str | None = attrs.field(default=None, validator=_check_proxy)
    verify: bool | str = attrs.field(default=True, validator=_check_verify)

    def __attrs_post_init__(self) -> None:
        if self.max_in_flight > 32:
            raise ConfigurationError(f"max_in_flight must be 1 to 32, not {self.max_in_flight}")
        if self.retry_max_delay < self.retry_initial_delay:
            raise ConfigurationError("retry_max_delay must be >= retry_initial_delay")
        url = parse_url(self.api_url)
        if url.scheme == "http" and not is_loopback(url.host or ""):
            log.warning(
                "api_url %s uses plain http to a host that is not this machine: "
                "the server key would cross the network unencrypted; use https",
                self.api_url,
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
        try:
            return cls(server_key=server_key, api_url=api_url, **options)
        except TypeError as exc:
            # attrs' "unexpected keyword argument" for a misspelt option.
            raise ConfigurationError(str(exc).replace("__init__()", "Produl()")) from None
