"""Keep every benchmark process on loopback, whatever a peer SDK tries.

Peers are pointed at 127.0.0.1 explicitly, but SDKs grow side channels
(feature-flag polling, remote config, telemetry). :func:`install` makes any
connection or name lookup for a non-loopback address fail in this process
and records it, so a run can prove that nothing left the machine.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

#: Addresses refused so far in this process, in order.
refused: list[str] = []

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", ""})
_installed = False


def _is_loopback(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    text = str(host)
    if text in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _check(host: object) -> None:
    if not _is_loopback(host):
        refused.append(str(host))
        raise OSError(f"bench guard: refusing to reach {host!r} (loopback only)")


def install() -> None:
    """Refuse non-loopback lookups and connections in this process; idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        _check(host)
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address[0])
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address[0])
        return real_connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
