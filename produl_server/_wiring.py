"""Wiring: the quota and the spool a client's worker is given, built from its Config.

The worker builds none of them: it receives a :class:`Wiring`, so its
tests can hand it their own, and a disabled client opens nothing.

- The quota. By default every client of this user on this host that sends
  to the same ``api_url`` paces against one rolling window, kept in a small
  file (:mod:`._hostquota`), because the API's limit is per IP address, not
  per process. ``shared_quota=False`` paces the process alone;
  ``quota_dir`` moves the file (a volume shared by containers behind one
  address). With ``redis_url`` the window is a fleet's, in Redis, and the
  host's is its fallback.
- The outbox (:mod:`._outbox`): ``spool_dir``'s SQLite file, or with
  ``redis_url`` a Stream in Redis with ``spool_dir`` as its fallback, or
  else the user's default spool, written only at exit (issue #22).
"""

from __future__ import annotations

import attrs
from urllib3.util import parse_url

from ._config import Config, is_loopback, key_fingerprint, mask_url
from ._default_spool import DefaultOutbox
from ._hostquota import HostQuota, HostWideQuota
from ._outbox import Outbox, SqliteOutbox, lease_from_env
from ._quota import Quota, RollingQuota
from ._redis import open_fleet
from ._spool import Spool, SpoolError
from .exceptions import ConfigurationError

__all__ = ["Wiring", "make_quota", "open_outbox", "wire"]


@attrs.frozen
class Wiring:
    """What a worker is given: its quota and its outbox (None without a spool)."""

    quota: Quota
    outbox: Outbox | None = None


def wire(config: Config) -> Wiring:
    """The quota and outbox *config* asks for.

    Raises:
        ConfigurationError: The spool or Redis cannot be used as configured.
    """
    if not config.enabled:
        # A disabled client sends nothing: it opens no quota file, no spool
        # and no Redis connection.
        return Wiring(RollingQuota(None))
    quota = make_quota(config)
    local = open_outbox(config)
    if config.redis_url is not None:
        quota, fleet = open_fleet(config, quota, local)
        return Wiring(quota, fleet)
    return Wiring(quota, local)


def make_quota(config: Config) -> Quota:
    """The quota a client paces against: the host's, or its own."""
    limit = config.max_requests_per_minute
    if limit is None or not config.shared_quota:
        return RollingQuota(limit)
    if config.quota_dir is None and is_loopback(parse_url(config.api_url).host or ""):
        # A collector on this machine is not Produl's API: a test suite's many
        # clients would wait on each other for a quota nobody enforces.
        # quota_dir (PRODUL_QUOTA_DIR) shares it anyway.
        return RollingQuota(limit)
    return HostWideQuota(HostQuota(limit, config.api_url, config.quota_dir))


def open_outbox(config: Config) -> SqliteOutbox | None:
    """Open the configured spool, or None without one.

    Raises:
        ConfigurationError: The directory cannot hold a spool (read-only,
            a file, a damaged database); the message is one line.
    """
    if config.spool_dir is None:
        if config.default_spool_dir is None:
            return None
        # Opened lazily, and never an error: see DefaultOutbox.
        return DefaultOutbox(config, config.default_spool_dir, lease_from_env())
    lease = lease_from_env()
    try:
        owner = key_fingerprint(config.server_key)
        return SqliteOutbox(Spool(config.spool_dir, config.api_url, owner), lease)
    except SpoolError as exc:
        raise ConfigurationError(
            f"spool_dir cannot be used for {mask_url(config.api_url)}: {exc}"
        ) from None
