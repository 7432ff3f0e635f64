"""Serverless handlers (AWS Lambda and alike): flush before each invocation returns.

A function host freezes the process as soon as the handler returns, and may
never thaw it: a sender thread cannot be trusted to finish later. Flush at
the end of every invocation instead::

    from produl_server import Produl
    from produl_server.integrations.serverless import flush_after

    produl = Produl()          # once per process, outside the handler

    @flush_after(produl, timeout=2.0)
    def handler(event, context):
        produl.track_event("order_placed", visitor_id=event["customer"])
        return {"statusCode": 204}

or, around any block, ``with flush_after(produl): ...``.

The flush is bounded: it waits at most ``timeout`` seconds, and never past
what the invocation has left (read from a Lambda-style
``context.get_remaining_time_in_millis()`` when the handler receives one)
minus a safety margin. Events it could not deliver in time stay queued for
the next invocation of the same process, and are logged.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, overload

from .._client import Produl

__all__ = ["flush_after"]

log = logging.getLogger("produl_server")

P = ParamSpec("P")
R = TypeVar("R")

#: Seconds left unused at the end of an invocation, for the host's own work.
SAFETY_MARGIN = 0.2


def _remaining_seconds(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    for candidate in (*args, *kwargs.values()):
        remaining = getattr(candidate, "get_remaining_time_in_millis", None)
        if callable(remaining):
            try:
                return float(remaining()) / 1000.0
            except (TypeError, ValueError):
                return None
    return None


class flush_after:  # noqa: N801 -- used as a decorator, named like one
    """Flush a client when a handler (or a ``with`` block) ends, within a bound.

    It flushes whether the handler returned or raised, and never raises
    itself: delivery problems are logged and counted by the client.

    Args:
        client: The client the handler tracks with.
        timeout: Seconds the flush may take at most.
    """

    def __init__(self, client: Produl, timeout: float = 2.0) -> None:
        self.client = client
        self.timeout = timeout

    def _budget(self, remaining: float | None) -> float:
        if remaining is None:
            return self.timeout
        return max(0.0, min(self.timeout, remaining - SAFETY_MARGIN))

    def _report(self, done: bool, budget: float) -> bool:
        # False with nothing pending: events were dropped or spooled, and
        # each of those was already logged and reported on its own.
        if not done and self.client.stats.pending:
            log.warning(
                "produl_server: %d event(s) not delivered within %.2f s at the end of the "
                "invocation; they stay queued for the next one",
                self.client.stats.pending,
                budget,
            )
        return done

    def flush(self, remaining: float | None = None) -> bool:
        """Flush now, within ``timeout`` and the time the invocation has left.

        Args:
            remaining: Seconds the invocation has left, if known.

        Returns:
            What :meth:`Produl.flush` returned: whether everything tracked
            so far was delivered, with nothing dropped since the last flush.
        """
        budget = self._budget(remaining)
        try:
            done = self.client.flush(budget)
        except Exception:
            log.exception("produl_server: flush at the end of the invocation failed")
            return False
        return self._report(done, budget)

    async def aflush(self, remaining: float | None = None) -> bool:
        """:meth:`flush` for async handlers: the event loop keeps running meanwhile.

        Args:
            remaining: Seconds the invocation has left, if known.

        Returns:
            What :meth:`Produl.flush` returned: whether everything tracked
            so far was delivered, with nothing dropped since the last flush.
        """
        budget = self._budget(remaining)
        try:
            done = await self.client.aflush(budget)
        except Exception:
            log.exception("produl_server: flush at the end of the invocation failed")
            return False
        return self._report(done, budget)

    def __enter__(self) -> flush_after:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.flush()

    @overload
    def __call__(
        self, handler: Callable[P, Awaitable[R]]
    ) -> Callable[P, Awaitable[R]]: ...  # pragma: no cover

    @overload
    def __call__(self, handler: Callable[P, R]) -> Callable[P, R]: ...  # pragma: no cover

    def __call__(self, handler: Callable[P, Any]) -> Callable[P, Any]:
        """Wrap a sync or async handler.

        Args:
            handler: The function the host calls for each invocation.

        Returns:
            A function with the same signature that flushes before returning.
        """
        if inspect.iscoroutinefunction(handler):

            @functools.wraps(handler)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                try:
                    return await handler(*args, **kwargs)
                finally:
                    # Other tasks of the loop keep running while it waits.
                    await self.aflush(_remaining_seconds(args, kwargs))

            return run_async

        @functools.wraps(handler)
        def run(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                return handler(*args, **kwargs)
            finally:
                self.flush(_remaining_seconds(args, kwargs))

        return run
