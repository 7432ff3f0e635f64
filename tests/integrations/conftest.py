"""Fixtures of the integration tests: subprocess cleanup, a throwaway Redis."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import pytest
from integration_support import APPS, Proc
from support import RedisServer

# The small projects the tests serve import as top-level modules from here.
if str(APPS) not in sys.path:
    sys.path.insert(0, str(APPS))


@pytest.fixture
def spawn(tmp_path) -> Iterator[Callable[..., Proc]]:
    """Start subprocesses that are always killed at the end of the test."""
    started: list[Proc] = []

    def start(args: list[str], env: dict[str, str], name: str = "proc", **popen) -> Proc:
        proc = Proc(args, env, tmp_path / f"{name}-{len(started)}.log", **popen)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, for Celery's broker."""
    server = RedisServer(tmp_path_factory.mktemp("redis") / "redis.log")
    try:
        server.start()
        yield server.url
    finally:
        server.stop()
