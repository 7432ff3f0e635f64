"""arq: deliver what jobs tracked before the asyncio worker stops, without blocking its loop.

arq runs every job as a task on one event loop. A flush that blocks would
stop every other job, so this integration waits with
:meth:`~produl_server.Produl.aflush`. One call, in the module that holds
``WorkerSettings`` (imported before the worker is made), is enough::

    from produl_server import Produl
    from produl_server.integrations.arq import connect

    produl = Produl()
    connect(produl)

    class WorkerSettings:
        functions = [send_receipt]

It wraps ``arq.worker.Worker.__init__`` once, so that every worker made
afterwards

* runs each job function with the job context (``queue`` and ``job``
  properties: the worker's queue name and the function's name), in the
  job's own task;
* awaits a bounded flush in ``on_shutdown``, after the worker's own hook,
  once the running jobs have ended (a ``SIGTERM`` cancels them, and arq
  runs them again later);
* awaits a bounded flush in ``after_job_end`` after every job with
  ``flush_after_job=True`` (the job's result is already stored then).

Your own ``on_shutdown`` and ``after_job_end`` hooks run first, as before.

Why not automatic: patching arq from ``import produl_server`` would
import arq into every program.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from arq.worker import Worker

from .._client import Produl
from .._jobs import enter_job, leave_job
from . import JobOptions, flush_deadline, report_flush

__all__ = ["connect", "disconnect"]

log = logging.getLogger("produl_server")

_lock = threading.Lock()
_clients: list[Produl] = []
_original: Callable[..., None] | None = None

Hook = Callable[[dict[Any, Any]], Awaitable[Any]]


_options = JobOptions()


def connect(
    client: Produl,
    *,
    flush_after_job: bool = False,
    shutdown_timeout: float | None = None,
) -> None:
    """Flush *client* when an arq worker stops (and after each job, if asked).

    Safe to call more than once, and for several clients; arq is patched
    once. The options of the last call apply. Workers made before the first
    call are left alone.

    Args:
        client: The client the jobs track with.
        flush_after_job: Also flush after every job, so that events arrive
            at once; each job's task then waits for the flush (the event
            loop does not), at most the budget below.
        shutdown_timeout: Seconds a flush may take, one budget for all
            connected clients. Default: the largest ``shutdown_timeout``
            among them. No worker is held longer than this by the SDK.
    """
    global _options, _original
    with _lock:
        if not any(known is client for known in _clients):
            _clients.append(client)
        _options = JobOptions(flush_after_job, shutdown_timeout)
        if _original is None:
            _original = Worker.__init__
            Worker.__init__ = _wrap(_original)


def disconnect(client: Produl | None = None) -> None:
    """Stop flushing *client* (default: every client) for arq.

    With no client left, arq's own ``Worker.__init__`` is put back; workers
    made meanwhile keep the job context and flush nothing.

    Args:
        client: A client passed to :func:`connect`, or ``None`` for all.
    """
    global _original
    with _lock:
        _clients[:] = [known for known in _clients if client is not None and known is not client]
        if not _clients and _original is not None:
            Worker.__init__ = _original
            _original = None


def _wrap(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def init_then_connect(self: Worker, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        queue = self.queue_name
        for name, function in list(self.functions.items()):
            self.functions[name] = dataclasses.replace(
                function, coroutine=_in_job_context(function.coroutine, queue, function.name)
            )
        self.on_shutdown = _then(self.on_shutdown, _flush_at_shutdown)
        self.after_job_end = _then(self.after_job_end, _flush_after_job)

    return init_then_connect


def _in_job_context(coroutine: Any, queue: str, name: str) -> Any:
    @functools.wraps(coroutine)
    async def run_in_job_context(ctx: dict[Any, Any], *args: Any, **kwargs: Any) -> Any:
        token = enter_job(queue, name)
        try:
            return await coroutine(ctx, *args, **kwargs)
        finally:
            leave_job(token)

    return run_in_job_context


def _then(first: Any, second: Hook) -> Any:
    """Run the worker's own hook *first* (if any), then *second*, even if it failed."""
    if first is None:
        return second

    @functools.wraps(first)
    async def both(ctx: dict[Any, Any]) -> None:
        try:
            await first(ctx)
        finally:
            await second(ctx)

    return both


async def _flush_at_shutdown(ctx: dict[Any, Any]) -> None:
    await _aflush_all(_options.shutdown_timeout, "arq worker shutdown")


async def _flush_after_job(ctx: dict[Any, Any]) -> None:
    options = _options
    if not options.flush_after_job:
        return
    try:
        await _aflush_all(options.shutdown_timeout, "arq job end")
    except asyncio.CancelledError:
        # At SIGTERM arq cancels the task of every job it still holds, even
        # one whose result is stored, and its close() then fails on that
        # cancellation and skips on_shutdown. The job is over: end quietly.
        # The flush goes on in its own thread; on_shutdown flushes again.
        task = asyncio.current_task()
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+
        if uncancel is not None:
            uncancel()


async def _aflush_all(budget: float | None, why: str) -> None:
    """:func:`~produl_server.integrations.flush_clients`, awaited: the loop runs on meanwhile.

    Raises nothing but a cancellation: it runs in arq's own shutdown and
    after jobs that have already ended.
    """
    with _lock:
        clients = list(_clients)
    if not clients:
        return
    budget, deadline = flush_deadline(clients, budget)
    for client in clients:
        try:
            done = await client.aflush(max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            log.info("produl_server: stopped waiting for the %s flush (cancelled)", why)
            raise
        except Exception:
            log.exception("produl_server: flush at %s failed", why)
            continue
        report_flush(client, done, why, budget)
