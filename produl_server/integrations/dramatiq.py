"""Dramatiq: deliver what actors tracked before a worker process goes away.

``dramatiq`` runs each worker process as a ``multiprocessing`` child
that ends through ``os._exit()``, which skips ``atexit``. One call, next to
where the broker and the client are made, flushes the client as each
worker process stops::

    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from produl_server import Produl
    from produl_server.integrations.dramatiq import connect

    dramatiq.set_broker(RedisBroker(url="redis://localhost:6379/0"))
    produl = Produl()
    connect(produl)

It adds a middleware to the broker, which

* sets the job context (``queue`` and ``job`` properties: the queue name
  and the actor name) around each message, in the thread that runs it;
* flushes the client, within a bounded time, in ``after_worker_shutdown``:
  once the worker's threads have finished their messages, before the
  process exits;
* flushes after every message with ``flush_after_job=True``;
* in ``after_process_boot``, drops the module lock a fork may have copied
  while another thread held it.

Why not automatic: connecting from ``import produl_server`` would import
Dramatiq into every program.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import dramatiq
from dramatiq.broker import Broker
from dramatiq.common import q_name
from dramatiq.middleware import Middleware

from .._client import Produl
from .._jobs import enter_job, leave_job
from . import JobOptions, flush_clients

__all__ = ["ProdulMiddleware", "connect", "disconnect"]

log = logging.getLogger("produl_server")

_lock = threading.Lock()
_clients: list[Produl] = []


_options = JobOptions()


def connect(
    client: Produl,
    broker: Broker | None = None,
    *,
    flush_after_job: bool = False,
    shutdown_timeout: float | None = None,
) -> None:
    """Flush *client* whenever a Dramatiq worker process stops.

    Safe to call more than once, and for several clients; the middleware is
    added to a broker once. The options of the last call apply.

    Args:
        client: The client the actors track with.
        broker: The broker the workers run; default ``dramatiq.get_broker()``
            (call :func:`connect` after ``dramatiq.set_broker``).
        flush_after_job: Also flush after every message, so that events
            arrive at once; each message then waits for the flush, at most
            the budget below.
        shutdown_timeout: Seconds a flush may take, one budget for all
            connected clients. Default: the largest ``shutdown_timeout``
            among them. No worker is held longer than this by the SDK.
    """
    global _options
    if broker is None:
        broker = dramatiq.get_broker()
    with _lock:
        if not any(known is client for known in _clients):
            _clients.append(client)
        _options = JobOptions(flush_after_job, shutdown_timeout)
    if not any(isinstance(known, ProdulMiddleware) for known in broker.middleware):
        broker.add_middleware(ProdulMiddleware())


def disconnect(client: Produl | None = None) -> None:
    """Stop flushing *client* (default: every client) for Dramatiq.

    The middleware stays on the broker and does nothing for a client that
    is no longer connected; the job context stays.

    Args:
        client: A client passed to :func:`connect`, or ``None`` for all.
    """
    with _lock:
        _clients[:] = [known for known in _clients if client is not None and known is not client]


class ProdulMiddleware(Middleware):
    """The middleware :func:`connect` adds to the broker."""

    def after_process_boot(self, broker: Broker) -> None:
        """A new worker process: start from a lock no other thread can hold."""
        global _lock
        _lock = threading.Lock()

    def before_process_message(self, broker: Broker, message: Any) -> None:
        """Give what the actor tracks its queue and actor name."""
        enter_job(q_name(message.queue_name), message.actor_name)

    def after_process_message(
        self,
        broker: Broker,
        message: Any,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        """End the job context, and flush if asked to."""
        leave_job()
        options = _options
        if options.flush_after_job:
            _flush_all(options.shutdown_timeout, "Dramatiq message end")

    def after_skip_message(self, broker: Broker, message: Any) -> None:
        """A skipped message ends its job context too."""
        leave_job()

    def after_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        """Deliver what is left before the worker process exits."""
        _flush_all(_options.shutdown_timeout, "Dramatiq worker shutdown")


def _flush_all(budget: float | None, why: str) -> None:
    with _lock:
        clients = list(_clients)
    flush_clients(clients, budget, why)
