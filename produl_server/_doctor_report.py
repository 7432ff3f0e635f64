"""What a doctor's check found: one line of ``produl-server doctor``'s report.

Shared by the modules that run the checks (:mod:`._doctor_net`,
:mod:`._doctor_state`) and the one that prints them (:mod:`._doctor`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import attrs

__all__ = ["FAIL", "OK", "SKIP", "WARN", "Check", "captured_warnings", "reason"]

OK, FAIL, WARN, SKIP = "ok", "fail", "warn", "skip"


@attrs.frozen
class Check:
    """One line of the report.

    Attributes:
        status: ``"ok"``, ``"fail"``, ``"warn"`` or ``"skip"``.
        text: What was found.
        remedy: What to do about it (for ``fail`` and ``warn``).
        details: Further lines shown under it.
    """

    status: str
    text: str
    remedy: str | None = None
    details: tuple[str, ...] = ()


@contextlib.contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """Collect what the library logs at WARNING and above while a check runs."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage().removeprefix("produl_server: "))

    handler = Keep(logging.WARNING)
    logger = logging.getLogger("produl_server")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def reason(exc: BaseException) -> str:
    """An error's reason on one short line (the OS's words when it gave some)."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:200]
