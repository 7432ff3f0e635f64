"""Reports: what the application hears of events that do not arrive.

Each dropped event is logged on the ``produl_server`` logger and handed to
the ``on_error`` hook (:class:`Reports`); events refused before they are
queued are counted too (:class:`Door`). Nothing here ever raises into a
``track_*`` caller or ends the sender.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from ._config import Config, mask_key
from ._inbox import Item
from ._ledger import Ledger
from .exceptions import DeliveryError

log = logging.getLogger("produl_server")

__all__ = ["Door", "Reports", "Throttled"]


class Throttled:
    """Log one warning per interval, with the count of what it stood for."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self.clock = clock
        self.last = -interval
        self.suppressed = 0

    def __call__(self, message: str, *args: object) -> None:
        self.at(self.clock(), message, *args)

    def at(self, now: float, message: str, *args: object) -> None:
        """The same, at *now* (a caller that has read the clock already)."""
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        self.last = now
        extra, self.suppressed = self.suppressed, 0
        log.warning(message + " (%d more since the last warning)", *args, extra)


class Reports:
    """Logs a dropped event and hands it to the ``on_error`` hook.

    Args:
        config: The client's configuration (the hook, the key to mask).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._key_reported = False

    def report(self, item: Item, reason: str, message: str, status: int | None = None) -> None:
        """Log a dropped event and hand it to the on_error hook."""
        if reason == "unauthorized":
            text = (
                f"the collector refused the server key {mask_key(self.config.server_key)} "
                f"({message}); check PRODUL_SERVER_KEY. Events are dropped until it is fixed"
            )
            if self._key_reported:
                log.debug("produl_server: event dropped: %s", text)
            else:
                self._key_reported = True
                log.error("produl_server: %s", text)
        else:
            text = f"event dropped ({reason}): {message}"
            log.warning("produl_server: %s", text)
        self.call_hook(DeliveryError(reason, text, status), item)

    def spooled_at_exit(self, count: int, where: str, twice: int, cause: str) -> None:
        """The line for events the exit kept in the spool."""
        log.warning(
            "produl_server: %d event(s) not delivered before the shutdown deadline%s "
            "were spooled in %s%s; the next client that opens it delivers them",
            count,
            f" ({cause})" if cause else "",
            where,
            f" ({twice} of them had a request under way, and may arrive twice)" if twice else "",
        )

    def lost_at_exit(self, count: int, cause: str, unsure: int, remedy: str) -> None:
        """The line for events the exit could neither send nor keep."""
        log.warning(
            "produl_server: %d event(s) not delivered before the shutdown deadline%s; "
            "they are lost%s. %s",
            count,
            f" ({cause})" if cause else "",
            f" ({unsure} of them had a request under way, and may have arrived)" if unsure else "",
            remedy,
        )

    def call_hook(self, error: DeliveryError, event: Item | dict[str, Any]) -> None:
        """Hand one problem to the user's ``on_error`` hook; survive anything it raises.

        The wire dict is built only here, only when there is a hook. Nothing
        a hook raises ends the sender, not even ``SystemExit``,
        ``KeyboardInterrupt`` or ``GeneratorExit``: it is logged, and delivery
        goes on. Only on the main thread does a ``KeyboardInterrupt`` go on up
        to the caller (it may be a real Ctrl-C), once the event is settled.
        """
        hook = self.config.on_error
        if hook is None:
            return
        try:
            hook(error, json.loads(event.body) if isinstance(event, Item) else event)
        except BaseException as exc:
            log.exception("produl_server: the on_error hook raised; delivery goes on")
            if isinstance(exc, KeyboardInterrupt) and (
                threading.current_thread() is threading.main_thread()
            ):
                raise


# Built once: a full queue refuses every call, and the line is throttled.
_FULL_SPOOLED = "produl_server: the queue is full (%d events); new events are spooled"
_FULL_DROPPED = "produl_server: the queue is full (%d events); new events are dropped"


class Door:
    """Counts and reports the events refused before they were queued.

    Args:
        ledger: The client's ledger.
        reports: Where drops are reported.
        clock: A monotonic clock (for the throttled "queue is full" line).
    """

    def __init__(self, ledger: Ledger, reports: Reports, clock: Callable[[], float]) -> None:
        self._ledger = ledger
        self._reports = reports
        self._size = reports.config.max_queue_size
        self._warn_full = Throttled(60.0, clock)

    def full(self, *, spooled: bool) -> None:
        """Say (once a minute) that the queue is full, and what becomes of new events."""
        self._warn_full(_FULL_SPOOLED if spooled else _FULL_DROPPED, self._size)

    def refuse_full(self, body: bytes, now: float) -> None:
        """A full queue and no spool: count the event dropped, report it.

        The caller's path at its busiest (P10: no dearer than an accepted
        call): the clock read once, by the caller, and no call more than
        needed.
        """
        self._ledger.refuse("queue_full")
        self._warn_full.at(now, _FULL_DROPPED, self._size)
        if self._reports.config.on_error is not None:
            self._reports.call_hook(
                DeliveryError("queue_full", "the queue is full"), json.loads(body)
            )

    def drop_queued(self, item: Item) -> None:
        """An accepted event that neither the queue nor the spool could take."""
        self._ledger.finish(item.seq, "queue_full")
        self.full(spooled=False)
        self._reports.call_hook(DeliveryError("queue_full", "the queue is full"), item)

    def refuse(self, item: Item, reason: str, text: str) -> None:
        """An accepted event refused for *reason* (after shutdown): count, log, report."""
        self._ledger.finish(item.seq, reason)
        log.warning("produl_server: event dropped (%s): %s", reason, text)
        self._reports.call_hook(DeliveryError(reason, f"event dropped ({reason}): {text}"), item)

    def drop(self, reason: str, error: DeliveryError | None, event: dict[str, Any]) -> None:
        """Count an event dropped before it was queued; report *error* if there is one."""
        self._ledger.refuse(reason)
        if error is not None:
            self._reports.call_hook(error, event)

    def drop_invalid(self, error: Exception, call: dict[str, Any]) -> None:
        """Count, log and report a ``track_*`` call refused by validation."""
        self._ledger.refuse("invalid")
        log.warning("produl_server: invalid event dropped: %s", error)
        self._reports.call_hook(DeliveryError("invalid", str(error)), call)
