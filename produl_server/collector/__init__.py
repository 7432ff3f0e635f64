"""A local stand-in for Produl's collection API: server, store and live page.

Used by :class:`produl_server.testing.LocalCollector` (in tests) and by the
``produl-server collector`` command (in development). Nothing here is needed
to send events; the client never imports this package.
"""

from __future__ import annotations

from produl_server._config import mask_key
from produl_server.collector._faults import Fault
from produl_server.collector._format import describe, describe_stored, terminal_json
from produl_server.collector._pace import PaceHistory, PaceSecond
from produl_server.collector._ratelimit import (
    DEFAULT_RATE_LIMIT_MODE,
    RATE_LIMIT_MODES,
    RateLimiter,
)
from produl_server.collector._record import Headers, RecordedRequest
from produl_server.collector._server import CollectorServer
from produl_server.collector._store import (
    MemoryStore,
    Query,
    SqliteStore,
    Store,
    StoredEvent,
    StoreError,
)

__all__ = [
    "DEFAULT_RATE_LIMIT_MODE",
    "RATE_LIMIT_MODES",
    "CollectorServer",
    "Fault",
    "Headers",
    "MemoryStore",
    "PaceHistory",
    "PaceSecond",
    "Query",
    "RateLimiter",
    "RecordedRequest",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoredEvent",
    "describe",
    "describe_stored",
    "mask_key",
    "terminal_json",
]
