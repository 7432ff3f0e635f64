"""Huey: deliver what tasks tracked before a consumer's worker goes away.

With ``huey_consumer -k process`` each worker is a forked
``multiprocessing`` child that ends through ``os._exit()``, which skips
``atexit``; with threads, the consumer's main thread may end the process
while a worker thread still holds events. One call, next to where the
``huey.Huey`` instance and the client are made, fixes both::

    from huey import RedisHuey
    from produl_server import Produl
    from produl_server.integrations.huey import connect

    huey = RedisHuey("shop")
    produl = Produl()
    connect(produl, huey)

It registers with that ``Huey`` instance

* a signal handler that sets the job context (``queue`` and ``job``
  properties: the ``Huey`` instance's name and the task's name) when a
  task starts executing and clears it when the task ends, in the worker
  that runs it; with ``flush_after_job=True`` it also flushes there, after
  every task;
* an ``on_shutdown`` hook that flushes the client, within a bounded time,
  in each worker (thread or process) as it stops.

Why not automatic: registering from ``import produl_server`` would import
Huey into every program, and Huey has no global instance to register with.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from huey import signals  # type: ignore[import-untyped]

from .._client import Produl
from .._jobs import enter_job, leave_job
from . import JobOptions, flush_clients

__all__ = ["connect", "disconnect"]

log = logging.getLogger("produl_server")

_lock = threading.Lock()
_clients: list[Produl] = []
_hueys: list[Any] = []

#: The signals that end a task that started executing (one or two per task).
_TASK_END = (
    signals.SIGNAL_COMPLETE,
    signals.SIGNAL_ERROR,
    signals.SIGNAL_CANCELED,
    signals.SIGNAL_INTERRUPTED,
    signals.SIGNAL_TIMEOUT,
    signals.SIGNAL_RATE_LIMITED,
    signals.SIGNAL_LOCKED,
    signals.SIGNAL_RETRYING,  # after RetryTask, which sends none of the above
)
_HOOK_NAME = "produl_server_flush"


_options = JobOptions()


def connect(
    client: Produl,
    huey: Any,
    *,
    flush_after_job: bool = False,
    shutdown_timeout: float | None = None,
) -> None:
    """Flush *client* whenever a worker of *huey*'s consumer stops.

    Safe to call more than once, and for several clients and ``Huey``
    instances; each instance gets its handlers once. The options of the
    last call apply.

    Args:
        client: The client the tasks track with.
        huey: The ``huey.Huey`` instance the consumer runs.
        flush_after_job: Also flush after every task, so that events
            arrive at once; each task then waits for the flush, at most the
            budget below.
        shutdown_timeout: Seconds a flush may take, one budget for all
            connected clients. Default: the largest ``shutdown_timeout``
            among them. No worker is held longer than this by the SDK.
    """
    global _options
    with _lock:
        if not any(known is client for known in _clients):
            _clients.append(client)
        _options = JobOptions(flush_after_job, shutdown_timeout)
        if any(known is huey for known in _hueys):
            return
        _hueys.append(huey)
    queue = str(huey.name)

    def task_started(signal: str, task: Any, *args: Any, **kwargs: Any) -> None:
        enter_job(queue, task.name)

    huey.signal(signals.SIGNAL_EXECUTING)(task_started)
    huey.signal(*_TASK_END)(_task_ended)
    huey.on_shutdown(_HOOK_NAME)(_worker_stopping)


def disconnect(client: Produl | None = None) -> None:
    """Stop flushing *client* (default: every client) for Huey.

    The handlers stay registered and do nothing for a client that is no
    longer connected; the job context stays.

    Args:
        client: A client passed to :func:`connect`, or ``None`` for all.
    """
    with _lock:
        _clients[:] = [known for known in _clients if client is not None and known is not client]


def _task_ended(signal: str, task: Any, *args: Any, **kwargs: Any) -> None:
    leave_job()
    options = _options
    if options.flush_after_job:
        _flush_all(options.shutdown_timeout, f"Huey task {signal}")


def _worker_stopping() -> None:
    _flush_all(_options.shutdown_timeout, "Huey worker shutdown")


def _flush_all(budget: float | None, why: str) -> None:
    with _lock:
        clients = list(_clients)
    flush_clients(clients, budget, why)
