"""Test helpers: a real local collector to point :class:`~produl_server.Produl` at.

Code that tracks events can be tested without mocking ``requests``: start a
:class:`LocalCollector`, give its URL and key to the client, and assert on
what arrived::

    with LocalCollector() as collector:
        produl = Produl(server_key=collector.server_key, api_url=collector.url)
        produl.track_event("signup", visitor_id="u1")
        produl.flush()
        collector.assert_event("signup", visitor_id="u1")

With pytest, the ``produl_server.pytest_plugin`` fixtures do the wiring.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from produl_server._protocol import EVENT, PAGEVIEW, WIRE_KEYS
from produl_server.collector import (
    CollectorServer,
    Fault,
    MemoryStore,
    RecordedRequest,
    SqliteStore,
    Store,
    describe,
)

__all__ = ["LocalCollector", "RecordedRequest", "find_events", "format_events"]

#: Python argument name -> wire key, e.g. ``visitor_id`` -> ``vi``.
_FIELD_KEYS = {python: wire for wire, python in WIRE_KEYS.items()}


class LocalCollector:
    """A real HTTP collector on 127.0.0.1 that speaks PROTOCOL.md, for tests.

    It answers ``POST /api/collect`` and ``/r`` like Produl does (401, 400,
    413, 429, 204), records every request, stores the accepted events, and
    can inject failures, latency and dropped connections. It also serves the
    live page and JSON API of ``produl-server collector``; reading that API
    needs :attr:`access_token` or the server key.

    Args:
        server_key: The only key accepted.
        host: Interface to bind.
        port: TCP port; 0 (the default) picks a free one.
        rate_limit: Keyed requests per minute per client IP; ``None`` (the
            default) for no limit.
        keyless_rate_limit: Requests without a key (browser requests with a
            site id ``k``) per minute per client IP; ``None`` (the default)
            for no limit.
        rate_limit_mode: The shape of the rate-limit window, which Produl
            does not document: ``"bucket"`` (the default; a token bucket of
            N that refills N per minute), ``"fixed"`` (N per window, counted
            from a client's first request) or ``"sliding"`` (N in any
            rolling window).
        rate_limit_window: Seconds per rate-limit window: 60 like Produl;
            a shorter one makes a test of the limit quick.
        send_retry_after: Send ``Retry-After`` with each rate-limit ``429``
            (the default). Produl does not promise it; ``False`` tests code
            that must cope without.
        db_path: An SQLite file to store events in (kept across restarts);
            ``None`` keeps them in memory.
        redis_url: A Redis whose fleet quota windows ``/api/pace`` and the
            live page show (the clients' ``redis_url``).
        strict: Refuse with ``400`` an event that lacks a field the API
            reference marks required (``u``, ``p``, ``vi``, ``sk``), as
            ``produl-server collector --strict`` does; the SDK then drops
            and reports it like any ``400``.

    Raises:
        ValueError: For an unknown ``rate_limit_mode`` or a window that is
            not positive.
    """

    def __init__(
        self,
        *,
        server_key: str = "sk_test_local",
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limit: int | None = None,
        keyless_rate_limit: int | None = None,
        rate_limit_mode: str = "bucket",
        rate_limit_window: float = 60.0,
        send_retry_after: bool = True,
        db_path: str | os.PathLike[str] | None = None,
        redis_url: str | None = None,
        strict: bool = False,
    ) -> None:
        self.db_path = os.fspath(db_path) if db_path is not None else None
        self._server = CollectorServer(
            store=MemoryStore(),
            server_key=server_key,
            host=host,
            port=port,
            rate_limit=rate_limit,
            keyless_rate_limit=keyless_rate_limit,
            rate_limit_mode=rate_limit_mode,
            rate_limit_window=rate_limit_window,
            send_retry_after=send_retry_after,
            record_requests=True,
            redis_url=redis_url,
            strict=strict,
        )
        self._store_open = self.db_path is None

    def __repr__(self) -> str:
        where = self._server.url if self._server.running else "stopped"
        return f"<LocalCollector {where}>"

    # -- lifecycle ------------------------------------------------------------

    @property
    def server_key(self) -> str:
        """The key clients must send in ``X-Produl-Server-Key``."""
        return self._server.server_key

    @property
    def access_token(self) -> str:
        """The token that unlocks ``GET``/``DELETE /api/events``.

        Send it as ``Authorization: Bearer <token>`` (the server key in
        ``X-Produl-Server-Key`` works too).
        """
        return self._server.access_token

    @property
    def page_url(self) -> str:
        """The live page's address, with :attr:`access_token` in its fragment.

        Raises:
            RuntimeError: If the collector is not running.
        """
        return self._server.page_url

    @property
    def url(self) -> str:
        """The base URL to give the client as ``api_url``, e.g. ``http://127.0.0.1:PORT``.

        Raises:
            RuntimeError: If the collector is not running.
        """
        return self._server.url

    @property
    def port(self) -> int:
        """The bound TCP port.

        Raises:
            RuntimeError: If the collector is not running.
        """
        return self._server.port

    def start(self) -> LocalCollector:
        """Bind and serve on background threads; a no-op when already running.

        Returns:
            The collector itself, so ``c = LocalCollector().start()`` works.

        Raises:
            OSError: If the address cannot be bound.
            produl_server.collector.StoreError: If ``db_path`` cannot be used.
        """
        if self._server.running:
            return self
        if self.db_path is not None:
            self._server.store = SqliteStore(self.db_path)
            self._store_open = True
        try:
            self._server.start()
        except BaseException:
            self._close_store()
            raise
        return self

    def stop(self) -> None:
        """Stop serving and close every connection promptly; idempotent.

        Recorded requests and (in-memory or on-disk) events stay readable.
        """
        self._server.stop()
        self._close_store()

    def _close_store(self) -> None:
        if self.db_path is not None and self._store_open:
            self._store_open = False
            self._server.store.close()

    def __enter__(self) -> LocalCollector:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @contextlib.contextmanager
    def _store(self) -> Iterator[Store]:
        if self._store_open:
            yield self._server.store
            return
        if self.db_path is None or not os.path.exists(self.db_path):
            yield MemoryStore()
            return
        store = SqliteStore(self.db_path, readonly=True)
        try:
            yield store
        finally:
            store.close()

    # -- what arrived ---------------------------------------------------------

    @property
    def events(self) -> list[dict[str, Any]]:
        """The accepted events as wire dicts, oldest first (copies)."""
        with self._store() as store:
            return [stored.event for stored in reversed(store.query())]

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received, refused and dropped ones too, in the order answered."""
        return self._server.requests

    def _count(self) -> int:
        with self._store() as store:
            return store.count()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until at least ``count`` events were accepted.

        Args:
            count: How many accepted events to wait for.
            timeout: Seconds to wait at most.

        Returns:
            All accepted events (like :attr:`events`).

        Raises:
            AssertionError: If fewer than ``count`` arrived in time; the
                message says how many did and what was answered.
        """
        self._wait(lambda: self._count() >= count, timeout)
        events = self.events
        if len(events) < count:
            raise AssertionError(
                f"expected at least {count} accepted event(s) within {timeout:g} s, "
                f"got {len(events)}{self._summary()}"
            )
        return events

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """Block until at least ``count`` requests were answered or dropped.

        Args:
            count: How many requests to wait for.
            timeout: Seconds to wait at most.

        Returns:
            All recorded requests (like :attr:`requests`).

        Raises:
            AssertionError: If fewer than ``count`` arrived in time.
        """
        self._wait(lambda: len(self._server.requests) >= count, timeout)
        requests = self.requests
        if len(requests) < count:
            raise AssertionError(
                f"expected at least {count} request(s) within {timeout:g} s, "
                f"got {len(requests)}{self._summary()}"
            )
        return requests

    @property
    def held(self) -> int:
        """How many POSTs are read and waiting out :attr:`latency` or :meth:`hang` now."""
        return self._server.held

    def wait_for_held(self, count: int, timeout: float = 10.0) -> None:
        """Block until at least ``count`` POSTs are held by :attr:`latency` or :meth:`hang`.

        Lets a test act (stop the collector, time out the client) exactly
        while requests are in flight.

        Args:
            count: How many held POSTs to wait for.
            timeout: Seconds to wait at most.

        Raises:
            AssertionError: If fewer were held in time.
        """
        self._wait(lambda: self._server.held >= count, timeout)
        if self._server.held < count:
            raise AssertionError(
                f"expected {count} held POST(s) within {timeout:g} s, got {self._server.held}"
            )

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> None:
        changed = self._server.changed
        with changed:
            changed.wait_for(predicate, timeout)

    def _summary(self) -> str:
        answers = [r.status for r in self.requests if r.method == "POST"]
        return f"; POST answers so far: {answers}; events: {format_events(self.events)}"

    # -- faults ---------------------------------------------------------------

    def fail_next(self, n: int, status: int = 500, retry_after: float | None = None) -> None:
        """Answer the next ``n`` event POSTs with ``status`` and store nothing.

        Args:
            n: How many POSTs (queued after faults already pending).
            status: The HTTP status to answer.
            retry_after: Seconds to send in ``Retry-After`` (formatted like
                ``2`` or ``0.5``); ``None`` sends no header.

        Raises:
            ValueError: When ``n`` is negative.
        """
        self._server.faults.add(Fault(status, retry_after), n)

    def drop_next(self, n: int) -> None:
        """Read the next ``n`` event POSTs, then close the connection unanswered.

        Args:
            n: How many POSTs (queued after faults already pending).

        Raises:
            ValueError: When ``n`` is negative.
        """
        self._server.faults.add(Fault(None), n)

    @property
    def latency(self) -> float:
        """Seconds every POST waits before it is answered (interrupted by :meth:`stop`).

        Setting a negative value raises :class:`ValueError`.
        """
        return self._server.faults.latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"latency must not be negative, not {seconds}")
        self._server.faults.latency = float(seconds)

    def hang(self) -> None:
        """Hold every POST unanswered until :meth:`release` or :meth:`stop`."""
        self._server.faults.released.clear()

    def release(self) -> None:
        """Let POSTs held by :meth:`hang` be answered."""
        self._server.faults.released.set()

    def reset(self) -> None:
        """Forget events, recorded requests, faults, latency and rate-limit state."""
        with self._store() as store:
            store.clear()
        self._server.clear_requests()
        self._server.faults.clear()
        self._server.reset_limits()

    # -- assertions -----------------------------------------------------------

    def find_events(self, type: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """Accepted events whose fields equal ``fields``, oldest first.

        Args:
            type: ``"pv"``, ``"ev"`` or ``None`` for both.
            **fields: Argument names of ``track_*`` (``name``, ``path``,
                ``visitor_id``, ``properties``, ...) or wire keys (``n``, ``vi``).

        Returns:
            The matching wire dicts.

        Raises:
            TypeError: For a field name that is neither.
        """
        return find_events(self.events, type, **fields)

    def assert_event(self, name: str, *, timeout: float = 0.0, **fields: Any) -> dict[str, Any]:
        """Assert an event ``name`` with these fields was accepted.

        Args:
            name: The event name.
            timeout: Seconds to wait for it to arrive; 0 checks once.
            **fields: Further fields it must have, as in :meth:`find_events`.

        Returns:
            The first matching wire dict.

        Raises:
            AssertionError: If none matches; lists what did arrive.
        """
        return self._assert_one(EVENT, timeout, name=name, **fields)

    def assert_pageview(self, path: str, *, timeout: float = 0.0, **fields: Any) -> dict[str, Any]:
        """Assert a pageview of ``path`` with these fields was accepted.

        Args:
            path: The page path.
            timeout: Seconds to wait for it to arrive; 0 checks once.
            **fields: Further fields it must have, as in :meth:`find_events`.

        Returns:
            The first matching wire dict.

        Raises:
            AssertionError: If none matches; lists what did arrive.
        """
        return self._assert_one(PAGEVIEW, timeout, path=path, **fields)

    def assert_no_events(self) -> None:
        """Assert nothing was accepted.

        Raises:
            AssertionError: If something was; lists it.
        """
        events = self.events
        if events:
            raise AssertionError(f"expected no events, got {format_events(events)}")

    def _assert_one(self, kind: str, timeout: float, **fields: Any) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def check() -> bool:
            found[:] = find_events(self.events, kind, **fields)
            return bool(found)

        if not check() and timeout > 0:
            deadline = time.monotonic() + timeout
            with self._server.changed:
                while not check() and (left := deadline - time.monotonic()) > 0:
                    self._server.changed.wait(left)
        if not found:
            want = ", ".join(f"{k}={v!r}" for k, v in fields.items())
            raise AssertionError(
                f"no {'pageview' if kind == PAGEVIEW else 'event'} with {want}; "
                f"received: {format_events(self.events)}"
            )
        return found[0]


def find_events(
    events: list[dict[str, Any]], type: str | None = None, **fields: Any
) -> list[dict[str, Any]]:
    """Filter wire dicts by type and fields.

    Args:
        events: Wire dicts, e.g. :attr:`LocalCollector.events`.
        type: ``"pv"``, ``"ev"`` or ``None`` for both.
        **fields: ``track_*`` argument names or wire keys, with the value each
            event must have (``properties`` / ``pr`` must be equal as a whole).

    Returns:
        The matching events, in the given order.

    Raises:
        TypeError: For a field name that is neither an argument name nor a wire key.
    """
    wanted: dict[str, Any] = {} if type is None else {"t": type}
    for field, value in fields.items():
        key = _FIELD_KEYS.get(field, field)
        if key not in WIRE_KEYS:
            raise TypeError(f"unknown event field {field!r}")
        wanted[key] = value
    return [e for e in events if all(k in e and e[k] == v for k, v in wanted.items())]


def format_events(events: list[dict[str, Any]]) -> str:
    """A short readable list of wire dicts for assertion messages.

    Args:
        events: Wire dicts.

    Returns:
        E.g. ``[event signup visitor=u1, pageview /pricing visitor=u2]``, or ``[]``.
    """
    return "[" + ", ".join(describe(event) for event in events) + "]"
