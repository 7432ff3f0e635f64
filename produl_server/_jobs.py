"""The task-queue job being run, if any: its properties join every custom event it tracks.

The task-queue integrations (RQ, Dramatiq, Huey, arq) set it around each
job; :meth:`Produl.track_event <produl_server.Produl.track_event>` reads it.
It lives in a :class:`contextvars.ContextVar`, so each thread and each
asyncio task sees its own job. No framework import here.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping

#: The property that names the job's queue.
QUEUE_KEY = "queue"
#: The property that names the job (the task, actor or function).
JOB_KEY = "job"

_current: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "produl_server_job", default=None
)


def current_job() -> Mapping[str, str] | None:
    """The properties of the job being run here, or ``None`` outside of a job."""
    return _current.get()


def enter_job(queue: str | None, job: str | None) -> contextvars.Token[Mapping[str, str] | None]:
    """Make *queue* and *job* the properties of what is tracked from here on.

    Args:
        queue: The queue the job came from (left out when ``None``).
        job: The job's name (left out when ``None``).

    Returns:
        The token for :func:`leave_job`.
    """
    properties = {}
    if queue is not None:
        properties[QUEUE_KEY] = str(queue)
    if job is not None:
        properties[JOB_KEY] = str(job)
    return _current.set(properties or None)


def leave_job(token: contextvars.Token[Mapping[str, str] | None] | None = None) -> None:
    """End the job context: put back what *token* replaced, or clear it.

    Args:
        token: From :func:`enter_job` in the same context, or ``None`` to
            clear the context (hooks that cannot carry a token from the
            start of a job to its end).
    """
    if token is None:
        _current.set(None)
    else:
        _current.reset(token)
