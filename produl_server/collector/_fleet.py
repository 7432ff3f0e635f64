"""What the live page shows of a fleet's quota windows in Redis (``--redis``).

The collector reads the windows the SDK's clients keep in Redis (one sorted
set per ``api_url``, named ``produl:{…}:quota``, stamped with Redis's clock)
and counts the requests of the last quota window in each. It talks to
Redis with redis-py directly, not through the SDK's sender code: each call
has a short connect and read timeout and no retry, and a Redis that does
not answer is shown as such, never waited for.
"""

from __future__ import annotations

from typing import Any

from produl_server._config import mask_url
from produl_server._quota import QUOTA_WINDOW
from produl_server.exceptions import ConfigurationError

__all__ = ["MAX_WINDOWS", "FleetView"]

#: Quota windows the live page lists at most.
MAX_WINDOWS = 100
#: Seconds allowed to connect to Redis and for each answer.
TIMEOUT = 0.5


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class FleetView:
    """A fleet's windows in Redis, as the live page shows them.

    Args:
        url: The Redis the fleet's clients use as ``redis_url``.

    Raises:
        ConfigurationError: The ``redis`` package is missing, or the URL
            cannot be used. Nothing here connects: Redis may be down.
    """

    def __init__(self, url: str) -> None:
        try:
            import redis  # noqa: PLC0415 -- optional, and only with --redis
        except ImportError:
            raise ConfigurationError(
                "--redis needs the redis package: pip install 'produl-server[redis]'"
            ) from None
        self._errors: tuple[type[BaseException], ...] = (
            redis.RedisError,
            OSError,
            ValueError,
            TypeError,
        )
        self.where = f"Redis at {mask_url(url)}"
        try:
            self._client = redis.Redis.from_url(
                url,
                socket_timeout=TIMEOUT,
                socket_connect_timeout=TIMEOUT,
                retry_on_timeout=False,
                health_check_interval=0,
            )
        except ValueError as exc:
            raise ConfigurationError(f"--redis {mask_url(url)} is not usable: {exc}") from None

    def read(self) -> dict[str, Any]:
        """``{"redis": URL, "windows": [{"key", "used"}], "error": None or text}``.

        ``used`` counts the requests of the last quota window, fleet-wide.
        """
        found: dict[str, Any] = {"redis": self.where, "windows": [], "error": None}
        try:
            found["windows"] = self._windows()
        except self._errors:
            # A server that answers nonsense fails to parse: down all the same.
            self._client.connection_pool.disconnect()
            found["error"] = "Redis does not answer"
        return found

    def _windows(self) -> list[dict[str, Any]]:
        client = self._client
        keys = []
        for key in client.scan_iter(match="produl:*:quota", count=100):
            keys.append(_text(key))
            if len(keys) >= MAX_WINDOWS:
                break
        seconds, micros = client.time()
        horizon = int(seconds) * 1000 + int(micros) // 1000 - int(QUOTA_WINDOW * 1000)
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.zcount(key, f"({horizon}", "+inf")
        counts = pipe.execute() if keys else []
        return [
            {"key": key, "used": int(used)} for key, used in sorted(zip(keys, counts, strict=True))
        ]

    def close(self) -> None:
        self._client.close()
