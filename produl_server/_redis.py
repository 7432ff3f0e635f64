"""A fleet's quota and spool in Redis (``redis_url``).

The API's limit is per IP address. Pods behind one NAT gateway share that
address but not a file system, so the host-wide quota file (``_hostquota``)
cannot pace them together, and a pod's spool directory dies with the pod.
With ``redis_url`` both live in Redis instead:

- **The quota**: a sorted set per ``api_url`` (or per ``quota_key``) holds
  the requests of the last :data:`~._quota.QUOTA_WINDOW` seconds, stamped
  with Redis's own clock (``TIME``), so the fleet's machines need no shared
  clock. One Lua script trims the window, counts it and takes a slot,
  atomically: at most N requests in any rolling window, fleet-wide.
- **The spool**: a Stream per ``api_url`` with one consumer group. A sender
  claims events (``XREADGROUP``); delivered ones are acknowledged and deleted
  (``XACK`` + ``XDEL``); unsent ones are given back by making them look idle
  for a whole lease (``XCLAIM ... IDLE``). Events claimed by a sender that
  died are taken over by another with ``XAUTOCLAIM`` once they have been
  idle for the lease (``PRODUL_SPOOL_LEASE``, 60 s by default). Delivery is
  at least once; duplicates are bounded by what a dead sender had claimed.

Only the sender thread (and the exit path) talks to Redis, never a
``track_*`` call: the events a full queue refuses wait in a second bounded
line (``_Core.overflow``) for the sender to spool them. Every Redis call has a short timeout
(:data:`TIMEOUT`) and no retry. When a call fails, the client logs one
warning, falls back to the host's quota and the local spool (or memory),
and tries Redis again every :data:`RETRY_EVERY` seconds; an exit never waits
for a Redis that is known to be down.

A Redis without persistence loses the spool when it restarts: give it an
append-only file (``appendonly yes``) if spooled events matter.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from ._config import Config, key_fingerprint, mask_url
from ._deadlines import Deadlines
from ._outbox import SPOOL_BATCH, SqliteOutbox, lease_from_env
from ._quota import QUOTA_WINDOW, Quota
from ._spool import Census, SpooledEvent
from .exceptions import ConfigurationError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import redis

log = logging.getLogger("produl_server")

T = TypeVar("T")

#: Seconds allowed to connect to Redis and for each answer.
TIMEOUT = 0.5
#: The longest one call to Redis may take as a whole (connect, send, every
#: read): past it the watchdog closes its connection, and Redis counts as down.
CALL_DEADLINE = 4 * TIMEOUT
#: While Redis does not answer, try it again this often (seconds).
RETRY_EVERY = 5.0
#: Events the Redis spool holds at most, per ``api_url``.
MAX_SPOOLED = 100_000
#: The consumer group every sender of one spool belongs to.
GROUP = "senders"

# KEYS: the window (a sorted set), the slot counter. ARGV: limit, window in ms.
# Returns {ms to wait (0: a slot was taken), requests in the window}.
_TAKE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
if used < limit then
  local slot = redis.call('INCR', KEYS[2])
  redis.call('ZADD', KEYS[1], now, slot)
  redis.call('PEXPIRE', KEYS[1], window)
  redis.call('PEXPIRE', KEYS[2], window)
  return {0, used + 1}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {math.max(1, tonumber(oldest[2]) + window - now), used}
"""


def _import_redis() -> Any:
    try:
        import redis  # noqa: PLC0415 -- optional, and only with redis_url
    except ImportError:
        raise ConfigurationError(
            "redis_url needs the redis package: pip install 'produl-server[redis]'"
        ) from None
    return redis


def _prefix(name: str) -> str:
    # The braces are a Redis Cluster hash tag: one client's keys share a slot.
    return "produl:{" + hashlib.sha256(name.encode()).hexdigest()[:16] + "}:"


def quota_key(api_url: str, key: str | None = None) -> str:
    """The Redis key of the rolling window shared by the clients of *api_url* (or *key*)."""
    return _prefix(key if key is not None else api_url) + "quota"


def spool_key(api_url: str, owner: str | None = None) -> str:
    """The Redis key of the Stream that spools the events of *api_url* tracked by *owner*.

    *owner* is the server key's fingerprint (:func:`~._config.key_fingerprint`);
    ``None`` names the stream of the versions before events carried one,
    which no client takes by itself.
    """
    return _prefix(api_url) + ("spool" if owner is None else f"spool:{owner}")


_DEADLINES = Deadlines("produl-server.redis-deadlines")


class RedisDownError(Exception):
    """Redis did not answer (or did not, a moment ago)."""


class RedisLink:
    """One connection pool to Redis, and whether Redis answers.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://``.
        meanwhile: What the warning says is done while Redis is down.
        clock: A monotonic clock.
    """

    def __init__(
        self,
        url: str,
        meanwhile: str = "pacing with this host's quota and spooling locally",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        module = _import_redis()
        from redis.backoff import NoBackoff  # noqa: PLC0415
        from redis.retry import Retry  # noqa: PLC0415

        self.where = f"Redis at {mask_url(url)}"
        try:
            self.client: redis.Redis = module.Redis.from_url(
                url,
                socket_timeout=TIMEOUT,
                socket_connect_timeout=TIMEOUT,
                retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False,
                health_check_interval=0,
            )
        except ValueError as exc:
            raise ConfigurationError(f"redis_url {mask_url(url)} is not usable: {exc}") from None
        self._clock = clock
        self._meanwhile = meanwhile
        self._lock = threading.Lock()
        #: When to try Redis again; None while it answers.
        self._retry_at: float | None = None

    @property
    def up(self) -> bool:
        """Whether Redis answered the last call (or may be tried again)."""
        retry_at = self._retry_at
        return retry_at is None or self._clock() >= retry_at

    @property
    def answered_last(self) -> bool:
        """Whether the last call to Redis, by anyone, was answered."""
        return self._retry_at is None

    def call(self, action: Callable[[redis.Redis], T], *, now: bool = False) -> T:
        """Run *action* with the client.

        Args:
            action: What to do with the client.
            now: Try Redis even if it failed a moment ago (a final count).

        Raises:
            RedisDownError: Redis failed now, or a moment ago (not tried again yet).
        """
        if not (now or self.up):
            raise RedisDownError
        watch = _DEADLINES.start(CALL_DEADLINE, self._cut)
        try:
            result = action(self.client)
        except Exception as exc:
            # Not only RedisError and OSError: a server that answers +OK (or
            # anything else) to every command makes the replies fail to parse
            # (ValueError, TypeError...). Such a Redis counts as down.
            cause: BaseException = exc
            if watch.expired:
                cause = TimeoutError(f"no whole answer within {CALL_DEADLINE:g} s")
            self._failed(cause)
            raise RedisDownError from None
        finally:
            _DEADLINES.stop(watch)
        if self._retry_at is not None:
            with self._lock:
                was_down, self._retry_at = self._retry_at is not None, None
            if was_down:
                log.info("produl_server: %s answers again; using it", self.where)
        return result

    def _cut(self) -> None:
        """End the calls under way: a reply trickling in is no answer."""
        self.client.connection_pool.disconnect(inuse_connections=True)

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            first = self._retry_at is None
            self._retry_at = self._clock() + RETRY_EVERY
        if first:
            log.warning(
                "produl_server: %s does not answer (%s); %s until it does (tried again every %g s)",
                self.where,
                _reason(exc),
                self._meanwhile,
                RETRY_EVERY,
            )

    def close(self) -> None:
        self.client.close()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


class FleetQuota:
    """The quota in Redis, or the local one while Redis does not answer.

    Args:
        link: The Redis connection.
        limit: Requests allowed in any rolling window, fleet-wide.
        key: The window's Redis key (:func:`quota_key`).
        fallback: The quota to pace with while Redis is down.
    """

    def __init__(self, link: RedisLink, limit: int, key: str, fallback: Quota) -> None:
        self.link = link
        self.limit = limit
        self.fallback = fallback
        self._keys = [key, key + ":slot"]
        self._window_ms = int(QUOTA_WINDOW * 1000)
        self._script = link.client.register_script(_TAKE)
        self._used = 0

    @property
    def kind(self) -> str:
        """``redis``, or the fallback's kind while Redis does not answer.

        As of the client's last call to Redis (a request's slot, a look in
        the spool), not of this very moment.
        """
        return "redis" if self.link.answered_last else self.fallback.kind

    def take(self, now: float) -> float:
        """0 and one slot of the fleet's window, or the seconds to wait.

        Args:
            now: The sender's clock. The fleet's machines share no clock, so
                Redis stamps the window with its own (``TIME``); *now* paces
                only the fallback, while Redis does not answer.
        """
        try:
            wait_ms, used = self.link.call(
                lambda client: self._script(
                    keys=self._keys, args=[self.limit, self._window_ms], client=client
                )
            )
        except RedisDownError:
            return self.fallback.take(now)
        self._used = int(used)
        return int(wait_ms) / 1000.0

    @property
    def used(self) -> int:
        """Requests in the fleet's window as last seen (the fallback's while Redis is down)."""
        return self._used if self.link.answered_last else self.fallback.used

    def after_fork_in_child(self) -> None:
        # redis-py's pool opens new connections in a child by itself.
        after_fork = getattr(self.fallback, "after_fork_in_child", None)
        if after_fork is not None:
            after_fork()


class RedisSpool:
    """The events of one ``api_url`` kept in a Redis Stream.

    Every method takes the client, so that :class:`FleetOutbox` runs it
    through :meth:`RedisLink.call`.
    """

    def __init__(
        self, api_url: str, lease: float, owner: str | None = None, max_events: int = MAX_SPOOLED
    ) -> None:
        self.key = spool_key(api_url, owner)
        self.unowned_key = spool_key(api_url)
        #: The dead-letter stream: entries that cannot be sent, with the reason.
        self.quarantine_key = self.key + ":quarantine"
        self._others = _prefix(api_url) + "spool:*"
        self.lease_ms = max(1, int(lease * 1000))
        self.max_events = max_events
        #: The reasons of the entries the last claim moved to the quarantine.
        self.quarantined_now: list[str] = []
        self._group_ready = False
        self._new_consumer()

    def _new_consumer(self) -> None:
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        #: Where XAUTOCLAIM goes on looking for events whose lease ran out.
        self._cursor = "0-0"

    def _ensure_group(self, client: redis.Redis) -> None:
        if self._group_ready:
            return
        try:
            client.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _grouped(self, client: redis.Redis, action: Callable[[], T]) -> T:
        """Run *action*, creating the group first (again if Redis lost it)."""
        self._ensure_group(client)
        try:
            return action()
        except Exception as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_ready = False
            self._ensure_group(client)
            return action()

    def add(self, client: redis.Redis, items: list[tuple[bytes, str | None]]) -> int:
        room = max(0, self.max_events - int(client.xlen(self.key)))
        items = items[:room]
        if items:
            pipe = client.pipeline(transaction=False)
            for body, visitor in items:
                fields: dict[str, bytes | str] = {"b": body}
                if visitor is not None:
                    fields["v"] = visitor
                pipe.xadd(self.key, fields)  # type: ignore[arg-type]
            pipe.execute()
        return len(items)

    def claim(self, client: redis.Redis, count: int) -> list[SpooledEvent]:
        def take() -> list[SpooledEvent]:
            found = self._expired(client, count)
            if len(found) < count:
                reply: Any = client.xreadgroup(
                    GROUP, self.consumer, {self.key: ">"}, count=count - len(found)
                )
                for _stream, entries in reply or ():
                    found.extend(entries)
            return self._sendable(client, found)

        self.quarantined_now = []
        return self._grouped(client, take)

    def _expired(self, client: redis.Redis, count: int) -> list[Any]:
        """Entries whose lease ran out (their sender died) or that were given back."""
        reply: Any = client.xautoclaim(
            self.key, GROUP, self.consumer, self.lease_ms, start_id=self._cursor, count=count
        )
        cursor, entries = reply[0], reply[1]
        self._cursor = _text(cursor)
        return list(entries)

    def _sendable(self, client: redis.Redis, entries: list[Any]) -> list[SpooledEvent]:
        """The entries as events; those that cannot be sent go to the quarantine stream."""
        events = []
        bad: list[tuple[str, dict[Any, Any], str]] = []
        for entry_id, fields in entries:
            if not fields:  # deleted meanwhile (Redis 6.2 reports it so)
                continue
            event, reason = _event(_text(entry_id), fields)
            if event is not None:
                events.append(event)
            else:
                bad.append((_text(entry_id), fields, reason))
        if bad:
            pipe = client.pipeline(transaction=True)
            for entry_id, fields, reason in bad:
                pipe.xadd(self.quarantine_key, {**fields, b"reason": reason, b"id": entry_id})
                pipe.xack(self.key, GROUP, entry_id)
                pipe.xdel(self.key, entry_id)
            pipe.execute()
            self.quarantined_now = [reason for _, _, reason in bad]
        return events

    def ack(self, client: redis.Redis, ids: list[str]) -> None:
        pipe = client.pipeline(transaction=True)
        pipe.xack(self.key, GROUP, *ids)
        pipe.xdel(self.key, *ids)
        self._grouped(client, pipe.execute)

    def release(self, client: redis.Redis, ids: list[str]) -> None:
        # Idle for a whole lease: the next XAUTOCLAIM, ours or another's, takes them.
        self._grouped(
            client,
            lambda: client.xclaim(
                self.key, GROUP, self.consumer, 0, list[Any](ids), idle=self.lease_ms, justid=True
            ),
        )
        self._cursor = "0-0"

    def count(self, client: redis.Redis) -> int:
        return int(client.xlen(self.key))

    def census(self, client: redis.Redis) -> Census:
        """This owner's entries, the unowned ones, other keys' and the quarantine's."""
        others = 0
        for index, key in enumerate(client.scan_iter(match=self._others, count=100)):
            name = _text(key)
            if name != self.key and not name.endswith(":quarantine"):
                others += int(client.xlen(name))
            if index >= 1000:
                break
        return Census(
            int(client.xlen(self.key)),
            int(client.xlen(self.unowned_key)),
            others,
            int(client.xlen(self.quarantine_key)),
        )

    def adopt_unowned(self, client: redis.Redis) -> int:
        """Move the unowned stream's entries into this owner's; return how many."""
        moved = 0
        while True:
            entries: Any = client.xrange(self.unowned_key, count=500)
            if not entries:
                return moved
            pipe = client.pipeline(transaction=True)
            for entry_id, fields in entries:
                pipe.xadd(self.key, fields)
                pipe.xdel(self.unowned_key, entry_id)
            pipe.execute()
            moved += len(entries)

    def retire(self, client: redis.Redis) -> None:
        """Leave the group if this sender holds nothing (consumers would pile up)."""
        if not self._group_ready:
            return
        pending = client.xpending_range(
            self.key, GROUP, min="-", max="+", count=1, consumername=self.consumer
        )
        if not pending:
            client.xgroup_delconsumer(self.key, GROUP, self.consumer)

    def after_fork_in_child(self) -> None:
        self._new_consumer()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _event(entry_id: str, fields: dict[Any, Any]) -> tuple[SpooledEvent | None, str]:
    """One stream entry as an event, or None and why it cannot be sent."""
    body = fields.get(b"b")
    if not isinstance(body, bytes):
        return None, "it has no body field"
    visitor = fields.get(b"v")
    if visitor is not None:
        try:
            visitor = visitor.decode()
        except (AttributeError, UnicodeDecodeError):
            return None, "its visitor id is not UTF-8 text"
    return SpooledEvent(entry_id, body, visitor), ""


class FleetOutbox:
    """The spool as the sender uses it: Redis first, ``spool_dir`` while it is down.

    Events from Redis carry a ``str`` id (the Stream's), those from the
    local spool an ``int`` (a row's), so acknowledgements go back to where
    each event came from. Failures are logged, never raised.
    """

    #: Spools in an outage and for a full queue too (see ``Outbox``).
    exit_only = False

    def __init__(self, link: RedisLink, spool: RedisSpool, local: SqliteOutbox | None) -> None:
        self.link = link
        self.spool = spool
        self.local = local
        self.directory = link.where
        self.lease = spool.lease_ms / 1000
        #: Entries this outbox moved to the quarantine stream.
        self.quarantined = 0
        self._reported: set[str] = set()

    def keep(self, items: Iterable[tuple[bytes, str | None]], *, caller: bool = False) -> int:
        """Spool events; return how many were kept.

        Args:
            items: (body, visitor id) pairs.
            caller: On a ``track_*`` caller's thread (a full queue): only the
                local spool, never Redis.
        """
        rows = list(items)
        if not caller:
            try:
                kept = self.link.call(lambda client: self.spool.add(client, rows))
            except RedisDownError:
                pass
            else:
                self.directory = self.link.where
                return kept
        if self.local is None:
            return 0
        self.directory = self.local.directory
        return self.local.keep(rows)

    def take(self) -> list[SpooledEvent]:
        try:
            events = self.link.call(lambda client: self.spool.claim(client, SPOOL_BATCH))
        except RedisDownError:
            events = []
        for reason in self.spool.quarantined_now:
            self.quarantined += 1
            if reason not in self._reported:
                self._reported.add(reason)
                log.error(
                    "produl_server: a spooled event in %s cannot be sent (%s); it was moved "
                    "to the stream %s, and the others go on",
                    self.link.where,
                    reason,
                    self.spool.quarantine_key,
                )
        self.spool.quarantined_now = []
        if not events and self.local is not None:
            events = self.local.take()
        return events

    def done(self, ids: list[Any]) -> None:
        self._route(ids, self.spool.ack, "done")

    def give_back(self, ids: list[Any]) -> None:
        self._route(ids, self.spool.release, "give_back")

    def _route(self, ids: list[Any], remote: Callable[[Any, list[str]], None], name: str) -> None:
        mine = [i for i in ids if isinstance(i, str)]
        if mine:
            # If Redis is down, the lease runs out and another sender takes
            # them: a duplicate at worst.
            with contextlib.suppress(RedisDownError):
                self.link.call(lambda client: remote(client, mine))
        theirs = [i for i in ids if not isinstance(i, str)]
        if theirs and self.local is not None:
            getattr(self.local, name)(theirs)

    def count(self) -> int:
        try:
            remote = self.link.call(self.spool.count)
        except RedisDownError:
            remote = 0
        return remote + (0 if self.local is None else self.local.count())

    def worth_a_look(self) -> bool:
        """Yes, without asking: only the sender talks to Redis."""
        return True

    def problem(self) -> str | None:
        """Why the spool's contents cannot be told now (Redis is down), or None."""
        return None if self.link.answered_last else f"{self.link.where} does not answer"

    def census(self) -> Census | None:
        """What Redis (and the local spool) hold for this key and for others."""
        try:
            remote: Census | None = self.link.call(self.spool.census, now=True)
        except RedisDownError:
            remote = None
        local = None if self.local is None else self.local.census()
        if remote is None or local is None:
            return remote or local
        return Census(*(a + b for a, b in zip(remote, local, strict=True)))

    def adopt_unowned(self) -> int:
        try:
            moved = int(self.link.call(self.spool.adopt_unowned))
        except RedisDownError:
            moved = 0
        return moved + (0 if self.local is None else self.local.adopt_unowned())

    def after_fork_in_child(self) -> None:
        self.spool.after_fork_in_child()
        if self.local is not None:
            self.local.after_fork_in_child()

    def close(self) -> None:
        """Leave the group if nothing is held, and close the connections."""
        if self.link.answered_last:  # never wait on a Redis known to be down
            with contextlib.suppress(RedisDownError):
                self.link.call(self.spool.retire)
        self.link.close()
        if self.local is not None:
            self.local.close()


def open_fleet(
    config: Config, quota: Quota, local: SqliteOutbox | None
) -> tuple[Quota, FleetOutbox]:
    """The quota and the spool of a client with ``redis_url``.

    Args:
        config: The client's configuration (``redis_url`` set).
        quota: The host's (or the process's) quota: the fallback.
        local: The ``spool_dir`` outbox, if any: the fallback.

    Raises:
        ConfigurationError: The ``redis`` package is missing, or the URL
            cannot be used. Nothing here connects: Redis may be down.
    """
    assert config.redis_url is not None
    link = RedisLink(config.redis_url)
    spool = RedisSpool(config.api_url, lease_from_env(), key_fingerprint(config.server_key))
    limit = config.max_requests_per_minute
    if limit is not None and config.shared_quota:
        quota = FleetQuota(link, limit, quota_key(config.api_url, config.quota_key), quota)
    return quota, FleetOutbox(link, spool, local)
