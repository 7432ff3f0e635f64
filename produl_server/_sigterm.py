"""SIGTERM in a ``multiprocessing`` child: deliver the queue, then end as the signal would.

``Pool.terminate()``, and so the end of a ``with Pool() as pool:`` block,
ends each worker with SIGTERM, which by default kills it at once: what it
had queued was lost without a word (issue #23). In a ``multiprocessing``
child whose SIGTERM does the default, :func:`arm` installs a handler that
delivers within ``shutdown_timeout`` and then lets the signal end the
process. A handler the application set is left alone, and no other
process gets one.

Python runs a signal handler in the main thread, between two bytecodes. A
pool worker's main thread waits between tasks in ``sem_wait()`` on a lock
that ``terminate()`` holds for good. When the signal arrives just before
that wait begins (or lands on another thread), the wait is never
interrupted, the handler never runs, and ``terminate()`` waits for the
worker forever: the test suite saw it about once in 50 runs. So the
handler's work is done by a thread of ours instead. The signal's C
handler writes the signal's number to a pipe (:func:`signal.set_wakeup_fd`),
whatever the main thread is doing; a ``produl-server.sigterm`` thread
reads it, delivers the queue, and then ends the process. It asks the main
thread to die by the signal (so the parent sees ``-SIGTERM``), and if the
main thread cannot run Python code within :data:`EXIT_GRACE` seconds, it
calls ``os._exit(128 + SIGTERM)``.

Where the application owns the wakeup pipe (asyncio sets one for its own
signal handlers), or no thread can start, the main thread's handler does
the work itself, as before.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator

from ._threads import start_thread

__all__ = ["EXIT_GRACE", "after_fork_in_child", "arm", "exit_flush"]

#: Seconds the listener waits for the main thread to die by the signal.
EXIT_GRACE = 1.0
_NAME = "produl-server.sigterm"

# A reentrant lock: the main thread's handler may run while the main thread
# itself holds it (an exit flush starting); it only guards counters.
_lock = threading.RLock()
#: running: exit flushes under way; signal: the SIGTERM to end with once
#: they are done; main_saw: SIGTERMs the main thread's handler ran for;
#: done: the listener delivered and wants the main thread to die.
_state: dict[str, int] = {"running": 0, "signal": 0, "main_saw": 0, "done": 0}
#: What delivers every live client's queue (set by :func:`arm`).
_flush: Callable[[], object] | None = None
#: The wakeup pipe (read end, write end) while a listener reads it.
_pipe: tuple[int, int] | None = None


@contextlib.contextmanager
def exit_flush() -> Iterator[None]:
    """Mark an exit flush; a SIGTERM that came meanwhile ends the process after it."""
    with _lock:
        _state["running"] += 1
    try:
        yield
    finally:
        _end_flush()


def _end_flush() -> None:
    with _lock:
        _state["running"] -= 1
        signum = 0 if _state["running"] else _state["signal"]
    if signum:
        _die(signum)


def _deliver_then_die(signum: int) -> None:
    """Deliver every live client's queue, then end the process (once)."""
    with _lock:
        if _state["signal"]:
            return  # a delivery for an earlier SIGTERM is under way
        _state["signal"] = signum
        if _state["running"]:
            return  # an exit flush is under way: it ends the process when done
        _state["running"] += 1
    try:
        if _flush is not None:
            _flush()
    finally:
        _end_flush()


def _die(signum: int) -> None:
    """End the process by *signum*, as if our handler had never been there."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    # Only the main thread may reset the handler: ask it to, by the signal.
    _state["done"] = signum
    main = threading.main_thread().ident
    if main is not None:
        with contextlib.suppress(OSError, ValueError):
            signal.pthread_kill(main, signum)
    threading.Event().wait(EXIT_GRACE)
    os._exit(128 + signum)


def _on_sigterm(signum: int, _frame: object) -> None:
    """The main thread's handler: no lock of the SDK is taken here."""
    _state["main_saw"] += 1
    if _state["done"] or _state["main_saw"] > 1:
        # The listener delivered; or a second SIGTERM: end now.
        _die(signum)
        return
    if _listening():
        return  # the listener heard it too, and delivers from its thread
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM kills at once
    _deliver_then_die(signum)


def _listening() -> bool:
    """Whether our listener still gets the signals (nobody took the pipe)."""
    if _pipe is None:
        return False
    try:
        current = signal.set_wakeup_fd(_pipe[1], warn_on_full_buffer=False)
    except ValueError:  # pragma: no cover - not the main thread
        return False
    if current != _pipe[1]:
        signal.set_wakeup_fd(current)  # the application's: give it back
        return False
    return True


def _listen(read_end: int) -> None:
    """The listener: act on the SIGTERMs that the signal's C handler reports."""
    while True:
        try:
            data = os.read(read_end, 64)
        except OSError:
            return  # closed after fork
        if not data:
            return
        if signal.SIGTERM in data:
            _deliver_then_die(signal.SIGTERM)


def arm(flush: Callable[[], object]) -> None:
    """In a ``multiprocessing`` child (main thread): make SIGTERM deliver first."""
    global _flush
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set a handler
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        _flush = flush
        _start_listener()
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # pragma: no cover - no signals here
        return


def _start_listener() -> None:
    global _pipe
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    if previous != -1 or not start_thread(functools.partial(_listen, read_end), _NAME):
        # The application's pipe (or no thread at exit): leave it be; the
        # main thread's handler does the work.
        signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)
        return
    _pipe = (read_end, write_end)


def after_fork_in_child() -> None:
    """Forget the parent's handler, pipe and state (the child's main thread)."""
    global _lock, _pipe
    _lock = threading.RLock()
    _state.update(running=0, signal=0, main_saw=0, done=0)
    pipe, _pipe = _pipe, None
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if pipe is not None:
            current = signal.set_wakeup_fd(-1)
            if current != pipe[1]:
                signal.set_wakeup_fd(current)  # the application's: keep it
    except ValueError:  # pragma: no cover - fork from a thread, then no signals
        pass
    if pipe is not None:
        for end in pipe:
            with contextlib.suppress(OSError):
                os.close(end)
