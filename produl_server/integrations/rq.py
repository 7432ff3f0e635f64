"""RQ: deliver what a job tracked before its work-horse goes away.

RQ's default ``Worker`` forks a work-horse for every job, and the horse
leaves through ``os._exit()``, which skips ``atexit``: without help, every
event a job tracked is lost, because a horse lives for one job only. One
call, next to where the client is made, fixes that::

    from produl_server import Produl
    from produl_server.integrations.rq import connect

    produl = Produl()
    connect(produl)

It wraps ``rq.worker.BaseWorker.perform_job`` (the one method every worker
class runs a job through), and flushes the client, within a bounded time,

* in a forked work-horse, after the job has finished and its result is
  stored, just before the horse exits;
* after every job, in any worker, if ``flush_after_job=True``.

Around each job it sets the job context: what the job tracks carries the
``queue`` and ``job`` properties (the queue's name and the job's function).

``SimpleWorker`` runs jobs in the worker process itself, which ends
normally: the client's own exit flush delivers what is left there.

Why not automatic: a client cannot tell on its own whether the process it
lives in will end with ``os._exit()``, and patching RQ from
``import produl_server`` would import RQ into every program.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from rq.worker import BaseWorker

from .._client import Produl
from .._jobs import enter_job, leave_job
from . import JobOptions, flush_clients

__all__ = ["connect", "disconnect"]

log = logging.getLogger("produl_server")

_lock = threading.Lock()
_clients: list[Produl] = []
_original: Callable[..., bool] | None = None


_options = JobOptions()


def connect(
    client: Produl,
    *,
    flush_after_job: bool = False,
    shutdown_timeout: float | None = None,
) -> None:
    """Flush *client* before each RQ work-horse exits.

    Safe to call more than once, and for several clients; RQ is patched
    once. The options of the last call apply.

    Args:
        client: The client the jobs track with.
        flush_after_job: Flush after every job, in every kind of worker
            (``SimpleWorker`` too), so that events arrive at once.
        shutdown_timeout: Seconds a flush may take, one budget for all
            connected clients. Default: the largest ``shutdown_timeout``
            among them. No job or horse is held longer than this by the SDK.
    """
    global _options, _original
    with _lock:
        if not any(known is client for known in _clients):
            _clients.append(client)
        _options = JobOptions(flush_after_job, shutdown_timeout)
        if _original is None:
            _original = BaseWorker.perform_job
            BaseWorker.perform_job = _wrap(_original)  # type: ignore[method-assign]


def disconnect(client: Produl | None = None) -> None:
    """Stop flushing *client* (default: every client) after RQ jobs.

    With no client left, RQ's own ``perform_job`` is put back.

    Args:
        client: A client passed to :func:`connect`, or ``None`` for all.
    """
    global _original
    with _lock:
        _clients[:] = [known for known in _clients if client is not None and known is not client]
        if not _clients and _original is not None:
            BaseWorker.perform_job = _original  # type: ignore[method-assign]
            _original = None


def _wrap(perform_job: Callable[..., bool]) -> Callable[..., bool]:
    @functools.wraps(perform_job)
    def perform_job_then_flush(self: BaseWorker, *args: Any, **kwargs: Any) -> bool:
        job = args[0] if args else kwargs.get("job")
        token = enter_job(getattr(job, "origin", None), getattr(job, "func_name", None))
        try:
            return perform_job(self, *args, **kwargs)
        finally:
            leave_job(token)
            options = _options
            # _is_horse: set by RQ in a forked horse, which ends in os._exit().
            if options.flush_after_job or getattr(self, "_is_horse", False):
                _flush_all(options.shutdown_timeout, "RQ job end")

    return perform_job_then_flush


def _flush_all(budget: float | None, why: str) -> None:
    with _lock:
        clients = list(_clients)
    flush_clients(clients, budget, why)
