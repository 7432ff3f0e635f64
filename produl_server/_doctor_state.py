"""``produl-server doctor``: the host's quota, the spool and Redis, read without sending.

Each is opened through the module a client uses: the quota file through
:class:`~._hostquota.HostQuota` (``wait``, which counts without taking,
``shared``, ``path``, ``used``, ``close``; it creates the file as any client
would); an existing spool file through :class:`~._spool.Spool` (``census``,
``pending_count``, ``close``; a missing one is not created); Redis through
:class:`~._redis.RedisLink` (``call``, within its 2 s deadline) with
:func:`~._redis.quota_key` and :func:`~._redis.spool_key`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import attrs
from urllib3.util import parse_url

from ._config import (
    QUOTA_DIR_ENV,
    REDIS_ENV,
    SPOOL_ENV,
    Config,
    is_loopback,
    key_fingerprint,
    mask_url,
)
from ._doctor_report import FAIL, OK, SKIP, WARN, Check, captured_warnings
from .exceptions import ConfigurationError

__all__ = ["quota", "redis", "spool"]


def quota(config: Config) -> Check:
    from ._hostquota import HostQuota  # noqa: PLC0415

    limit = config.max_requests_per_minute
    if limit is None or not config.shared_quota:
        return Check(SKIP, "the quota is per process (no shared quota configured)")
    host = parse_url(config.api_url).host or ""
    if config.quota_dir is None and is_loopback(host):
        return Check(
            SKIP,
            "api_url is on this machine: each process paces alone "
            f"({QUOTA_DIR_ENV} shares a quota anyway)",
        )
    with captured_warnings() as seen:
        quota = HostQuota(limit, config.api_url, config.quota_dir)
        try:
            quota.wait(time.time())
            shared, path, used = quota.shared, quota.path, quota.used
        finally:
            quota.close()
    if shared and path is not None:
        return Check(
            OK,
            f"the quota directory {os.path.dirname(path)} is usable and shared by this "
            f"user's processes: {used} of {limit} requests used in the last minute",
        )
    why = seen[0] if seen else "the quota file could not be used"
    return Check(
        FAIL,
        f"the host's quota cannot be shared: {why}",
        f"set {QUOTA_DIR_ENV} to a directory of your own (mode 0700); containers behind "
        "one address need one on a volume they share",
    )


# -- the spool ---------------------------------------------------------------------------


def spool(config: Config) -> Check:
    from ._spool import FILENAME, Spool, SpoolError  # noqa: PLC0415

    directory = config.spool_dir
    if directory is None:
        return Check(
            SKIP,
            "no spool: what cannot be sent in time is dropped "
            f"(set {SPOOL_ENV} to keep it for the next run)",
        )
    if not os.path.exists(os.path.join(directory, FILENAME)):
        parent = directory
        while not os.path.exists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
        if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
            made = "exists" if parent == directory else "will be created"
            return Check(OK, f"the spool directory {directory} {made}; no event is spooled yet")
        return Check(
            FAIL,
            f"the spool directory {directory} cannot be created or written",
            f"point {SPOOL_ENV} at a directory this user can write",
        )
    try:
        with captured_warnings():
            spool = Spool(directory, config.api_url, key_fingerprint(config.server_key))
        try:
            census = spool.census()
            ready = spool.pending_count()
        finally:
            spool.close()
    except SpoolError as exc:
        return Check(FAIL, f"the spool cannot be used: {exc}", "see the message; fix or move it")
    text = (
        f"the spool {directory} is usable: {census.mine} event(s) of this key waiting "
        f"({ready} ready to send now), {census.others} of other URLs or keys, "
        f"{census.unowned} unowned, {census.quarantined} in quarantine"
    )
    if census.quarantined:
        return Check(
            WARN,
            text,
            "events in quarantine cannot be sent: look at the spool's quarantine table",
        )
    if census.mine:
        return Check(
            WARN,
            text,
            f"the next client delivers them, or now: produl-server drain --spool {directory}",
        )
    return Check(OK, text)


# -- Redis ------------------------------------------------------------------------------


def redis(config: Config) -> Iterator[Check]:
    if config.redis_url is None:
        yield Check(SKIP, f"no redis_url: no fleet quota to check ({REDIS_ENV})")
        return
    from ._quota import QUOTA_WINDOW  # noqa: PLC0415
    from ._redis import RedisDownError, RedisLink, quota_key, spool_key  # noqa: PLC0415

    where = f"Redis at {mask_url(config.redis_url)}"
    try:
        link = RedisLink(config.redis_url)
    except ConfigurationError as exc:
        yield Check(FAIL, f"{where} cannot be used: {exc}", "see the message")
        return
    window = quota_key(config.api_url, config.quota_key)
    stream = spool_key(config.api_url, key_fingerprint(config.server_key))

    def read(client: Any) -> tuple[int, int]:
        client.ping()
        seconds, micros = client.time()
        horizon = int(seconds) * 1000 + int(micros) // 1000 - int(QUOTA_WINDOW * 1000)
        return int(client.zcount(window, f"({horizon}", "+inf")), int(client.xlen(stream))

    try:
        with captured_warnings() as seen:
            used, spooled = link.call(read, now=True)
    except RedisDownError:
        why = seen[0] if seen else "no answer"
        yield Check(
            FAIL,
            f"{where} does not answer: {why}",
            "check the URL, the password and that Redis runs; until it answers, clients "
            "pace with this host's quota and spool locally",
        )
        return
    finally:
        link.close()
    limit = config.max_requests_per_minute
    yield Check(OK, f"{where} answers")
    share = f"{used} of {limit}" if limit is not None else f"{used} (no limit set)"
    check = Check(OK, f"the fleet's quota: {share} requests used in the last minute")
    if limit is not None and used >= limit:
        check = attrs.evolve(
            check,
            status=WARN,
            remedy="the fleet is at its limit: events wait until the window frees up",
        )
    yield check
    if spooled:
        yield Check(
            WARN,
            f"{spooled} event(s) of this key spooled in Redis",
            "a running client delivers them, or now: produl-server drain --redis URL",
        )
