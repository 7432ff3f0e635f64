"""What the collector remembers about each request, for tests to inspect."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import attrs

from produl_server._config import mask_key
from produl_server._protocol import KEY_HEADER


class Headers(Mapping[str, str]):
    """Request headers with case-insensitive lookup, in the order received.

    The server key is masked in ``repr()`` (only its last 4 characters show),
    so a failing assertion that prints a request never leaks it.

    Args:
        items: ``(name, value)`` pairs as the client sent them.
    """

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, tuple[str, str]] = {}
        for name, value in items:
            self._items[name.lower()] = (name, value)

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()][1]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        shown = {
            name: mask_key(value) if name.lower() == KEY_HEADER.lower() else value
            for name, value in self._items.values()
        }
        return f"Headers({shown!r})"


@attrs.frozen
class RecordedRequest:
    """One HTTP request the collector received, and how it answered.

    Attributes:
        method: ``"POST"``, ``"GET"``, ...
        path: The request target, including any query string.
        headers: The request headers; lookup ignores case.
        body: The raw request body (empty when over the 64 KiB limit).
        status: The status answered, or ``None`` when the connection was
            dropped without an answer (:meth:`~produl_server.testing.LocalCollector.drop_next`).
        client_port: The client's TCP port: equal ports mean one kept-alive
            connection carried both requests.
        time: When the request arrived, on ``time.monotonic()``'s clock,
            so that differences between requests are true intervals.
    """

    method: str
    path: str
    headers: Headers = attrs.field(eq=False)
    body: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")
    status: int | None
    client_port: int
    time: float
