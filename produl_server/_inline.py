"""The inline loop: delivery on the caller's own thread (``sync_mode``).

Also the loop of an exit where no thread can start. It never runs at the
same time as the sender thread (:mod:`._sender`), and hands every outcome
to the same :class:`~._accounts.Accounts`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from ._accounts import FINISH_WAIT, Accounts
from ._inbox import Item

log = logging.getLogger("produl_server")

__all__ = ["InlineSender"]

_local = threading.local()


class InlineSender:
    """Sends on the caller's thread (``sync_mode``, or no thread at exit).

    One caller at a time holds the lock; another waits for it only as long
    as its own deadline allows. Called again from inside a delivery (an
    ``on_error`` hook that flushes), it returns False at once.
    """

    def __init__(self, accounts: Accounts) -> None:
        self._acc = accounts
        self._lock = threading.Lock()
        #: Taken from the inbox, not sent yet (under the lock).
        self._pending: collections.deque[Item] = collections.deque()

    def run(self, deadline: float | None, *, wait: bool) -> bool:
        """Deliver what is queued until *deadline*; True when nothing is left."""
        if getattr(_local, "delivering", False):
            if wait:
                log.warning("produl_server: flush() called from an on_error hook; ignored")
            return False
        budget = -1.0 if deadline is None else max(0.0, deadline - self._acc.clock())
        if not self._lock.acquire(timeout=budget):
            return False
        _local.delivering = True
        try:
            return self._deliver(deadline, wait=wait)
        finally:
            _local.delivering = False
            self._lock.release()

    def leftovers(self) -> list[Item]:
        """What is still in its hands (the end, once no caller delivers).

        A caller still delivering (its own deadline is later) keeps them
        for at most ``FINISH_WAIT``: then the end counts them lost
        without naming each to ``on_error``.
        """
        if not self._lock.acquire(timeout=FINISH_WAIT):
            return []
        try:
            return list(self._pending)
        finally:
            self._lock.release()

    def _deliver(self, deadline: float | None, *, wait: bool) -> bool:
        acc = self._acc
        pending = self._pending
        while True:
            pending.extend(acc.inbox.take_all())
            if not pending or acc.finished:
                return not pending
            now = acc.clock()
            if deadline is not None and now >= deadline:
                return False
            pause = acc.schedule.gate(now)
            if pause:
                if not wait or (deadline is not None and now + pause >= deadline):
                    return False
                time.sleep(pause)
                continue
            item = pending.popleft()
            timeout = None if deadline is None else deadline - now
            if acc.settle(item, acc.attempt(acc.get_transport(), item, timeout)):
                pending.appendleft(item)
