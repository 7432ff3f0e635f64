"""Who may talk to the collector: the ``Host`` check and the inspection token.

Issue #9, item 9: ``/api/events`` could be read and wiped by anyone who
reached it, and by any web page through DNS rebinding (a name the attacker
controls that resolves to 127.0.0.1 makes the browser treat the collector
as the attacker's own site). Two defences:

- every request must name the collector in ``Host``: a loopback name or
  address, the bound address, or a name the user allowed, with the bound
  port. A rebinding page always sends its own name, so it is refused.
  When bound to every interface (``0.0.0.0`` / ``::``), any IP address is
  accepted too: a rebinding attack needs a name, never an address.
- reading or deleting events needs the server key or the collector's access
  token (printed at start), sent in a header a web page cannot make another
  site's browser send.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from produl_server.collector._validate import ascii_int

AUTH_HEADER = "Authorization"
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def _split_host(value: str) -> tuple[str, int] | None:
    """``(name, port)`` from a ``Host`` header; port 80 when absent."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, colon, port_text_raw = value.partition(":")
        port_text = port_text_raw if colon else None
    port = 80 if port_text is None else ascii_int(port_text)
    if not name or port is None:
        return None
    return name.rstrip("."), port


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    address = _ip(name)
    return address is not None and address.is_loopback


class HostCheck:
    """Decides whether a ``Host`` header names this collector.

    Args:
        bound_host: The address (or name) the server is bound to.
        allowed_hosts: Further names to accept (e.g. a container's service
            name), compared without case.
    """

    def __init__(self, bound_host: str, allowed_hosts: Iterable[str] = ()) -> None:
        self._bound = bound_host.strip("[]").lower()
        self._names = {name.lower().rstrip(".") for name in allowed_hosts}
        self._wildcard = self._bound in _WILDCARDS

    def allows(self, header: str | None, port: int) -> bool:
        """Whether a request with this ``Host`` header may be answered.

        Args:
            header: The ``Host`` header, or ``None`` when the request had none.
            port: The port the server is bound to.

        Returns:
            ``True`` for a loopback name or address, the bound address, an
            allowed name, or (when bound to every interface) any IP address,
            each with the bound port.
        """
        parsed = _split_host(header) if header is not None else None
        if parsed is None or parsed[1] != port:
            return False
        name = parsed[0]
        return (
            _is_loopback_name(name)
            or name == self._bound
            or name in self._names
            or (self._wildcard and _ip(name) is not None)
        )


def same_secret(given: str, expected: str) -> bool:
    """Compare two secrets in constant time (never with ``==``).

    Args:
        given: What the client sent.
        expected: The secret.

    Returns:
        Whether they are equal.
    """
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def bearer(header: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <credential>`` header.

    Args:
        header: The ``Authorization`` header, if any.

    Returns:
        The credential, or ``None`` for a missing or other kind of header.
    """
    if header is None:
        return None
    scheme, _, credential = header.strip().partition(" ")
    return credential.strip() or None if scheme.lower() == "bearer" else None
