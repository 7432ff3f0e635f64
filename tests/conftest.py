"""Shared fixtures; also makes sure the tests exercise the installed package."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

import produl_server

CHECKOUT = pathlib.Path(__file__).resolve().parent.parent / "produl_server"
IMPORTED = pathlib.Path(produl_server.__file__).resolve().parent

# Tests must run against what users install (the wheel), not the working tree:
# a module missing from the wheel would otherwise pass here and fail for them.
# PRODUL_TEST_ALLOW_CHECKOUT=1 is for a quick local loop with PYTHONPATH=.
# pytest_configure below refuses it.

pytest_plugins = ["produl_server.pytest_plugin"]


from support import RedisServer, require_tool  # noqa: E402

from produl_server import Produl  # noqa: E402
from produl_server.testing import LocalCollector  # noqa: E402

#: The slow tier: real frameworks and servers, the browser, the benchmarks.
_INTEGRATION = ("integrations", "test_web_browser.py", "test_bench_smoke.py")


def pytest_configure(config: pytest.Config) -> None:
    """Say in one line what to do when the tests cannot run as they are.

    A bare ``pytest`` after ``pip install . pytest`` (issue 23) stopped on
    pyproject's unknown ``timeout`` option, or later on a missing ``redis``;
    the checkout's package must not stand in for the installed one.
    """
    missing = [
        name
        for module, name in (("pytest_timeout", "pytest-timeout"), ("redis", "redis"))
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise pytest.UsageError(
            f"the tests need {', '.join(missing)}: install the package with its test extra, "
            "python -m pip install '.[tests]', then run pytest again"
        )
    if IMPORTED == CHECKOUT and os.environ.get("PRODUL_TEST_ALLOW_CHECKOUT") != "1":
        raise pytest.UsageError(
            f"the tests imported produl_server from the checkout ({IMPORTED}), not the "
            "installed package: run a bare `pytest` (`python -m pytest` puts the current "
            "directory first on sys.path) after python -m pip install '.[tests]', or tox"
        )


def pytest_ignore_collect(collection_path: pathlib.Path, config: pytest.Config) -> bool | None:
    """In the fast tier, do not even import the slow tier's modules.

    They import their frameworks; collected without them they would be
    reported as skipped, which a fast run must not show as a pass of theirs.
    """
    if config.getoption("markexpr") == "not integration" and any(
        part in _INTEGRATION for part in collection_path.parts
    ):
        return True
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the slow tier ``integration``; ``-m "not integration"`` is the fast tier."""
    for item in items:
        if any(part in _INTEGRATION for part in item.path.parts):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _own_default_spool(monkeypatch, tmp_path_factory):
    """Give each test (and the processes it starts) a default spool of its own.

    Clients keep what their exit could not send in the user's default spool
    (``$XDG_STATE_HOME/produl-server/spool``), and the next client with the
    same key and URL sends it first: with one home for the whole run, a
    test's leftovers would arrive in the next test that uses the session's
    collector, and the real home would fill up.
    """
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    monkeypatch.delenv("PRODUL_SPOOL_DIR", raising=False)


@pytest.fixture(name="hung_collector")
def _hung_collector():
    """A collector of its own that never answers; stopped, never released.

    Not the shared one: requests it holds would be stored on release and
    show up in the next test.
    """
    with LocalCollector() as collector:
        collector.hang()
        yield collector


@pytest.fixture(name="make_client")
def _make_client(produl_collector):
    """Build clients wired to the collector; shut them all down afterwards."""
    made: list[Produl] = []

    def make(**options):
        options.setdefault("server_key", produl_collector.server_key)
        options.setdefault("api_url", produl_collector.url)
        options.setdefault("max_requests_per_minute", None)
        options.setdefault("retry_initial_delay", 0.02)
        options.setdefault("retry_max_delay", 0.1)
        client = Produl(**options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.shutdown(timeout=2.0)


@pytest.fixture(name="redis_server")
def _redis_server(tmp_path_factory):
    """A redis-server of this test's own on a free loopback port, up; killed at the end.

    Skipped without ``redis-server`` or the ``redis`` package (the
    ``produl-server[redis]`` extra), except in CI, where both must exist.
    """
    try:
        import redis  # noqa: F401
    except ImportError:
        require_tool(False, "the redis package (pip install 'produl-server[redis]')")
    server = RedisServer(tmp_path_factory.mktemp("redis") / "redis.log")
    try:
        yield server.start()
    finally:
        server.stop()
