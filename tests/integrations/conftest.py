"""Fixtures of the integration tests: subprocess cleanup, a throwaway Redis."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator

import pytest
from integration_support import APPS, Proc, free_port, redis_command, require_tool, wait_until

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
    binary = shutil.which("redis-server")
    require_tool(binary is not None, "redis-server (apt-get install redis-server)")
    log = tmp_path_factory.mktemp("redis") / "redis.log"
    port = free_port()
    proc = Proc(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        dict(os.environ),
        log,
    )
    try:

        def pong() -> bool:
            if not proc.alive():
                raise AssertionError(f"redis-server exited:\n{proc.output()}")
            return redis_command(port, "PING") == "+PONG"

        wait_until(pong, 20, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
