"""Celery: deliver what tasks tracked before a worker process goes away.

A prefork pool child leaves through ``os._exit()``, which skips ``atexit``:
without help, whatever its sender had not sent yet is lost at every warm
shutdown and every ``max_tasks_per_child`` recycle. One call, next to where
the client is made, fixes that::

    from produl_server import Produl
    from produl_server.integrations.celery import connect

    produl = Produl()
    connect(produl)

It flushes the client, within a bounded time, on

* ``worker_process_shutdown``: in each prefork child, just before it exits;
* ``worker_shutdown``: in the worker's main process (the ``solo`` and
  ``threads`` pools run tasks there);
* ``task_postrun`` after every task, if ``flush_after_task=True`` (each task
  then waits for its events to be sent; use it when tasks are rare and their
  events must arrive at once).

Why not automatic: a client cannot tell on its own whether the process it
lives in will end with ``os._exit()``, and connecting Celery's signals from
``import produl_server`` would import Celery into every program.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import attrs
from celery import signals  # type: ignore[import-untyped]

from .._client import Produl
from . import flush_clients

__all__ = ["connect", "disconnect"]

log = logging.getLogger("produl_server")

_lock = threading.Lock()
_clients: list[Produl] = []


@attrs.frozen
class _Options:
    flush_after_task: bool = False
    shutdown_timeout: float | None = None
    task_flush_timeout: float = 1.0


_options = _Options()


def connect(
    client: Produl,
    *,
    flush_after_task: bool = False,
    shutdown_timeout: float | None = None,
    task_flush_timeout: float = 1.0,
) -> None:
    """Flush *client* whenever a Celery worker process is about to stop.

    Safe to call more than once, and for several clients; the signal
    handlers are connected once. The options of the last call apply.

    Args:
        client: The client the tasks track with.
        flush_after_task: Also flush after each task.
        shutdown_timeout: Seconds the flush at process exit may take, one
            budget for all connected clients. Default: the largest
            ``shutdown_timeout`` among them. A warm shutdown is never held
            longer than this by the SDK.
        task_flush_timeout: Seconds the flush after a task may take.
    """
    global _options
    with _lock:
        if not any(known is client for known in _clients):
            _clients.append(client)
        _options = _Options(flush_after_task, shutdown_timeout, task_flush_timeout)
    signals.worker_process_shutdown.connect(
        _on_process_shutdown, weak=False, dispatch_uid="produl_server.process_shutdown"
    )
    signals.worker_shutdown.connect(
        _on_worker_shutdown, weak=False, dispatch_uid="produl_server.worker_shutdown"
    )
    signals.task_postrun.connect(_on_task_postrun, weak=False, dispatch_uid="produl_server.postrun")


def disconnect(client: Produl | None = None) -> None:
    """Stop flushing *client* (default: every client) on Celery's signals.

    Args:
        client: A client passed to :func:`connect`, or ``None`` for all.
    """
    with _lock:
        _clients[:] = [known for known in _clients if client is not None and known is not client]


def _flush_all(budget: float | None, why: str) -> None:
    with _lock:
        clients = list(_clients)
    flush_clients(clients, budget, why)


def _on_process_shutdown(**_: Any) -> None:
    _flush_all(_options.shutdown_timeout, "worker_process_shutdown")


def _on_worker_shutdown(**_: Any) -> None:
    _flush_all(_options.shutdown_timeout, "worker_shutdown")


def _on_task_postrun(**_: Any) -> None:
    options = _options
    if options.flush_after_task:
        _flush_all(options.task_flush_timeout, "task_postrun")
