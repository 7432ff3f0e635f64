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

From Python 3.12 no thread starts while the interpreter exits:
:func:`start_thread` says so instead of raising.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

__all__ = ["leave_signals_to_others", "signals_blocked", "start_thread"]

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

    From Python 3.12 no thread starts once the interpreter is shutting
    down, and a client's first request may come only then (at exit).
    """
    try:
        with signals_blocked():
            threading.Thread(target=target, name=name, daemon=True).start()
    except RuntimeError:
        return False
    return True
