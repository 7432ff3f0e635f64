"""The SDK's own threads: they leave signals to the application, and may not start.

A signal sent to a process is handled by any one of its threads that does
not block it. Python runs every signal handler in the main thread, but the
main thread learns of the signal only when it next runs Python code: if the
kernel hands the signal to one of our threads while the main thread waits
in a C call (a lock, a pipe read), the handler runs late, or never. A
``multiprocessing`` pool worker waits exactly so between tasks, and a
``SIGTERM`` that landed on our sender thread left it alive and its events
unsent (issue #23). So each thread of ours blocks the signals an
application may handle, and the kernel delivers them to a thread that can
act on them, the main thread included. A thread is born with them blocked
(:func:`signals_blocked` around its start): blocking them only once it runs
would leave a moment in which it could take one. Signals the kernel sends
to the thread that caused them (``SIGSEGV`` and alike) are left alone.

On Python 3.12 no thread starts while the interpreter exits:
:func:`start_thread` says so instead of raising, and :data:`STARTS_AT_EXIT`
says so in advance, for the threads the exit will need (:mod:`._lanes`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator

__all__ = ["STARTS_AT_EXIT", "leave_signals_to_others", "signals_blocked", "start_thread"]

#: Whether a thread can start while the interpreter exits (in an ``atexit``
#: handler, or a ``threading`` exit hook). Python 3.12 refuses ("can't create
#: new thread at interpreter shutdown"); 3.10, 3.11 and 3.13 allow it. Known
#: by the version, not found out: the refusal shows only once the exit has
#: begun, too late for the process that meets it, and a process exits once.
STARTS_AT_EXIT = sys.version_info[:2] != (3, 12)

_NAMES = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD")
_ASYNC = frozenset(getattr(signal, name) for name in _NAMES if hasattr(signal, name))


def leave_signals_to_others() -> None:
    """Block, in the calling thread, the signals an application may handle."""
    block = getattr(signal, "pthread_sigmask", None)
    if block is None:  # pragma: no cover - Windows: no per-thread masks
        return
    block(signal.SIG_BLOCK, _ASYNC)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block them in the calling thread meanwhile: a thread started here inherits it.

    A signal that arrives meanwhile waits, and is delivered when it ends.
    """
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:  # pragma: no cover - Windows: no per-thread masks
        yield
        return
    before = mask(signal.SIG_BLOCK, _ASYNC)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, before)


def start_thread(target: Callable[[], object], name: str) -> bool:
    """Start a daemon thread; False where none can start.

    On Python 3.12 no thread starts once the interpreter is shutting
    down (:data:`STARTS_AT_EXIT`), and a client's first request may come
    only then (at exit). A refusal of the system (too many threads) is a
    False too.
    """
    try:
        with signals_blocked():
            threading.Thread(target=target, name=name, daemon=True).start()
    except RuntimeError:
        return False
    return True
