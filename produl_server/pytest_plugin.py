"""Opt-in pytest fixtures for code that tracks events with produl-server.

Enable it in a ``conftest.py`` (it is never loaded automatically)::

    pytest_plugins = ["produl_server.pytest_plugin"]

or with ``pytest -p produl_server.pytest_plugin``. Then::

    def test_signup(produl, produl_collector):
        produl.track_event("signup", visitor_id="u1")
        produl_collector.assert_event("signup", visitor_id="u1", timeout=5)

Fixtures:
    produl_collector: A running :class:`~produl_server.testing.LocalCollector`,
        shared by the session and reset before each test.
    produl: A :class:`~produl_server.Produl` client wired to it, flushing on
        every event, shut down after the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from produl_server.testing import LocalCollector

if TYPE_CHECKING:
    from produl_server import Produl

__all__ = ["produl", "produl_collector"]


@pytest.fixture(scope="session")
def _produl_collector_session() -> Iterator[LocalCollector]:
    with LocalCollector() as collector:
        yield collector


@pytest.fixture
def produl_collector(_produl_collector_session: LocalCollector) -> LocalCollector:
    """A running local collector with no events, requests or faults yet.

    Returns:
        The session's :class:`~produl_server.testing.LocalCollector`, reset.
    """
    _produl_collector_session.reset()
    return _produl_collector_session


@pytest.fixture
def produl(produl_collector: LocalCollector) -> Iterator[Produl]:
    """A client that sends to ``produl_collector``; shut down after the test.

    It sends each event as soon as it is tracked (``flush_at=1``), so a test
    can assert with a short ``timeout`` or call ``produl.flush()`` first.

    Yields:
        A :class:`~produl_server.Produl`.
    """
    from produl_server import Produl  # noqa: PLC0415 -- keep the plugin importable alone

    # enabled=True: PRODUL_ENABLED=0, set to keep the application's own
    # clients quiet in tests, must not silence the one the test asked for.
    client = Produl(
        server_key=produl_collector.server_key,
        api_url=produl_collector.url,
        flush_at=1,
        enabled=True,
        # A test's leftovers belong to no later run: nothing in the user's home.
        spool_dir=False,
    )
    try:
        yield client
    finally:
        client.flush(timeout=5.0)
        client.shutdown(timeout=5.0)
