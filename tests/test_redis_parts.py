"""The Redis quota, spool and link, in this process, against a real redis-server.

``test_redis_fleet.py`` proves the fleet with real processes; these check
each part's rules one by one, quickly: the shared window, the lease, the
fallback while Redis is down and the return when it answers again.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import urllib.request

import pytest
from support import free_port, wait_until

from produl_server import ConfigurationError, Produl
from produl_server._config import Config, key_fingerprint
from produl_server._outbox import SqliteOutbox
from produl_server._quota import RollingQuota
from produl_server._redis import (
    RETRY_EVERY,
    FleetOutbox,
    FleetQuota,
    RedisLink,
    RedisSpool,
    open_fleet,
    quota_key,
    spool_key,
)
from produl_server._spool import Spool
from produl_server.collector._fleet import FleetView
from produl_server.testing import LocalCollector

API = "https://app.produl.tech"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def closed_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


_opened: list = []


@pytest.fixture(autouse=True)
def _close_what_tests_open():
    """Close every outbox and link a test opened (SQLite files, sockets)."""
    yield
    while _opened:
        _opened.pop().close()


def opened(thing):
    _opened.append(thing)
    return thing


def fleet_outbox(url, api=API, lease=60.0, local=None):
    return opened(FleetOutbox(RedisLink(url), RedisSpool(api, lease), local))


def local_outbox(directory):
    return opened(SqliteOutbox(Spool(directory, API)))


def redis_records(caplog):
    return [r for r in caplog.records if r.name == "produl_server" and "Redis" in r.getMessage()]


# -- the quota -------------------------------------------------------------------


def test_two_clients_share_one_window(redis_server):
    key = quota_key(API)
    first = FleetQuota(RedisLink(redis_server.url), 5, key, RollingQuota(5))
    second = FleetQuota(RedisLink(redis_server.url), 5, key, RollingQuota(5))
    assert [first.take(0.0) for _ in range(3)] == [0.0] * 3
    assert [second.take(0.0) for _ in range(2)] == [0.0] * 2
    assert second.used == 5
    wait = first.take(0.0)
    # The oldest slot leaves the 61 s window in a little under 61 s.
    assert 55.0 < wait <= 61.0
    assert first.used == 5
    assert first.kind == "redis"


def test_quota_key_names_a_window_shared_across_api_urls(redis_server):
    one = FleetQuota(RedisLink(redis_server.url), 2, quota_key(API, "egress-1"), RollingQuota(2))
    other = FleetQuota(
        RedisLink(redis_server.url),
        2,
        quota_key("https://eu.example", "egress-1"),
        RollingQuota(2),
    )
    own = FleetQuota(
        RedisLink(redis_server.url), 2, quota_key("https://eu.example"), RollingQuota(2)
    )
    assert one.take(0.0) == 0.0
    assert other.take(0.0) == 0.0
    assert one.take(0.0) > 0  # the shared window is full
    assert own.take(0.0) == 0.0  # a window of its own


def test_redis_down_paces_with_the_fallback_warns_once_and_comes_back(tmp_path, caplog):
    from support import RedisServer

    caplog.set_level(logging.INFO, logger="produl_server")
    clock = Clock()
    server = RedisServer(tmp_path / "redis.log")
    link = RedisLink(server.url, clock=clock)
    quota = FleetQuota(link, 3, quota_key(API), RollingQuota(3))
    try:
        assert [quota.take(0.0) for _ in range(3)] == [0.0] * 3
        assert quota.kind == "memory"
        assert quota.take(0.0) > 0  # the fallback's own window is full
        assert quota.used == 3
        warnings = [r for r in redis_records(caplog) if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "does not answer" in warnings[0].getMessage()
        assert server.url in warnings[0].getMessage()
        # Not tried again before RETRY_EVERY: even once Redis is up.
        server.start()
        clock.now += RETRY_EVERY / 2
        quota.take(0.0)
        assert quota.kind == "memory"
        clock.now += RETRY_EVERY
        assert quota.take(0.0) == 0.0
        assert quota.kind == "redis"
        assert quota.used == 1
        back = [r for r in redis_records(caplog) if r.levelno == logging.INFO]
        assert len(back) == 1
        assert "answers again" in back[0].getMessage()
        assert len([r for r in redis_records(caplog) if r.levelno == logging.WARNING]) == 1
    finally:
        server.stop()
        link.close()


# -- the spool ---------------------------------------------------------------------


def test_spool_keep_take_done(redis_server):
    outbox = fleet_outbox(redis_server.url)
    assert outbox.keep([(b'{"i":1}', "v1"), (b'{"i":2}', None)]) == 2
    assert outbox.count() == 2
    assert outbox.directory == f"Redis at {redis_server.url}"
    taken = outbox.take()
    assert [(e.body, e.visitor) for e in taken] == [(b'{"i":1}', "v1"), (b'{"i":2}', None)]
    assert all(isinstance(e.id, str) for e in taken)
    assert outbox.take() == []  # claimed: not handed out twice
    outbox.done([e.id for e in taken])
    assert outbox.count() == 0
    outbox.close()


def test_given_back_events_go_to_the_next_sender_at_once(redis_server):
    first = fleet_outbox(redis_server.url)
    second = fleet_outbox(redis_server.url)
    first.keep([(b"a", None), (b"b", None)])
    taken = first.take()
    assert second.take() == []
    first.give_back([e.id for e in taken])
    assert [e.body for e in second.take()] == [b"a", b"b"]


def test_a_dead_senders_claims_are_taken_over_after_the_lease(redis_server):
    dead = fleet_outbox(redis_server.url, lease=0.3)
    heir = fleet_outbox(redis_server.url, lease=0.3)
    dead.keep([(b"x", None)])
    assert [e.body for e in dead.take()] == [b"x"]  # ...and never acknowledged
    assert heir.take() == []  # within the lease: still the dead sender's
    found = []
    wait_until(lambda: found.extend(heir.take()) or found, 10, "the lease to run out")
    assert [e.body for e in found] == [b"x"]


def test_the_spool_is_bounded(redis_server):
    outbox = FleetOutbox(RedisLink(redis_server.url), RedisSpool(API, 60.0, max_events=3), None)
    assert outbox.keep([(b"%d" % i, None) for i in range(5)]) == 3
    assert outbox.keep([(b"more", None)]) == 0
    assert outbox.count() == 3


def test_each_api_url_has_its_own_spool(redis_server):
    one = fleet_outbox(redis_server.url)
    other = fleet_outbox(redis_server.url, api="https://eu.example")
    one.keep([(b"one", None)])
    assert other.take() == []
    assert spool_key(API) != spool_key("https://eu.example")


def test_a_redis_that_lost_the_group_gets_it_again(redis_server):
    outbox = fleet_outbox(redis_server.url)
    outbox.keep([(b"first", None)])
    outbox.done([e.id for e in outbox.take()])
    redis_server.command("FLUSHALL")  # a restart without persistence
    outbox.keep([(b"second", None)])
    assert [e.body for e in outbox.take()] == [b"second"]


def test_a_closing_sender_leaves_the_group_only_when_it_holds_nothing(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url)
    idle = fleet_outbox(redis_server.url)
    holder = fleet_outbox(redis_server.url)
    idle.keep([(b"x", None)])
    assert idle.take()
    idle.done([])  # nothing acknowledged: it still holds x
    holder.take()  # joins the group, takes nothing
    holder.close()
    consumers = {c["name"].decode() for c in client.xinfo_consumers(spool_key(API), "senders")}
    assert holder.spool.consumer not in consumers
    idle.close()
    consumers = {c["name"].decode() for c in client.xinfo_consumers(spool_key(API), "senders")}
    assert idle.spool.consumer in consumers  # what it held stays claimable after the lease


def test_redis_down_spools_locally_and_routes_acknowledgements(tmp_path, caplog):
    local = local_outbox(tmp_path / "spool")
    outbox = fleet_outbox(closed_url(), local=local)
    assert outbox.keep([(b"kept", "v")]) == 1
    assert outbox.directory == str(tmp_path / "spool")
    assert outbox.count() == 1
    taken = outbox.take()
    assert [(e.body, e.visitor) for e in taken] == [(b"kept", "v")]
    assert all(isinstance(e.id, int) for e in taken)
    outbox.give_back([e.id for e in taken])
    taken = outbox.take()
    outbox.done([e.id for e in taken])
    assert outbox.count() == 0
    assert len(redis_records(caplog)) == 1
    outbox.close()


def test_redis_down_without_a_local_spool_keeps_nothing(caplog):
    outbox = fleet_outbox(closed_url())
    assert outbox.keep([(b"x", None)]) == 0
    assert outbox.take() == []
    assert outbox.count() == 0
    outbox.done(["1-0"])  # ignored while down: the lease brings it back
    outbox.close()
    assert len(redis_records(caplog)) == 1


def test_a_full_queue_never_reaches_redis_on_the_callers_thread(redis_server, tmp_path):
    local = local_outbox(tmp_path / "spool")
    outbox = fleet_outbox(redis_server.url, local=local)
    assert outbox.keep([(b"door", None)], caller=True) == 1
    assert local.count() == 1
    assert outbox.spool.count(outbox.link.client) == 0
    without = fleet_outbox(redis_server.url)
    assert without.keep([(b"door", None)], caller=True) == 0


# -- the client ------------------------------------------------------------------


def test_a_client_with_redis_paces_in_redis_even_for_a_local_collector(redis_server):
    with LocalCollector(redis_url=redis_server.url) as collector:
        produl = Produl(collector.server_key, api_url=collector.url, redis_url=redis_server.url)
        for i in range(12):
            produl.track_event("e", {"i": i}, visitor_id="v")
        assert produl.flush(30)
        stats = produl.stats
        assert (stats.sent, stats.quota, stats.quota_used) == (12, "redis", 12)
        request = urllib.request.Request(
            collector.url + "/api/pace",
            headers={"Authorization": f"Bearer {collector.access_token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            fleet = json.load(answer)["fleet"]
        assert fleet == {
            "redis": f"Redis at {redis_server.url}",
            "windows": [{"key": quota_key(collector.url), "used": 12}],
            "error": None,
        }
        produl.shutdown()


def test_the_live_page_says_when_redis_does_not_answer():
    view = FleetView(closed_url())
    assert view.read()["error"] == "Redis does not answer"
    view.close()


def test_a_client_without_a_working_redis_still_delivers(caplog):
    with LocalCollector() as collector:
        produl = Produl(collector.server_key, api_url=collector.url, redis_url=closed_url())
        produl.track_event("e", visitor_id="v")
        assert produl.flush(30)
        assert produl.stats.quota == "memory"
        produl.shutdown()
    assert len(redis_records(caplog)) == 1


def test_open_fleet_keeps_the_local_quota_when_pacing_is_off_or_not_shared(redis_server):
    for options in ({"max_requests_per_minute": None}, {"shared_quota": False}):
        config = Config(server_key="sk_test_0000", redis_url=redis_server.url, **options)
        local = RollingQuota(None)
        quota, outbox = open_fleet(config, local, None)
        assert quota is local
        assert isinstance(outbox, FleetOutbox)
        outbox.close()


# -- configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"redis_url": "http://cache:6379"}, "redis_url must be a redis://"),
        ({"redis_url": 6379}, "redis_url must be a string"),
        ({"quota_key": ""}, "quota_key must be a string of 1 to 200"),
        ({"quota_key": "k" * 201}, "quota_key must be a string of 1 to 200"),
    ],
)
def test_bad_redis_options_are_refused(options, message):
    with pytest.raises(ConfigurationError, match=message):
        Produl(server_key="sk_test_0000", enabled=False, **options)


def test_the_redis_password_never_shows():
    url = "redis://:hunter2-secret@127.0.0.1:1/0"
    config = Config(server_key="sk_test_0000", redis_url=url)
    assert "hunter2-secret" not in repr(config)
    assert "hunter2-secret" not in RedisLink(url).where
    with pytest.raises(ConfigurationError) as caught:
        Config(server_key="sk_test_0000", redis_url="http://:hunter2-secret@h/0")
    assert "hunter2-secret" not in str(caught.value)


def test_the_environment_sets_the_redis_options():
    config = Config.from_env(
        "sk_test_0000",
        None,
        environ={"PRODUL_REDIS_URL": "redis://cache:6379/1", "PRODUL_QUOTA_KEY": "egress"},
    )
    assert (config.redis_url, config.quota_key) == ("redis://cache:6379/1", "egress")


def test_without_the_redis_package_redis_url_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis raises ImportError
    with pytest.raises(ConfigurationError, match=r"pip install 'produl-server\[redis\]'"):
        Produl(server_key="sk_test_0000", redis_url="redis://127.0.0.1:1/0")


def test_an_unusable_redis_url_is_one_clear_error():
    with pytest.raises(ConfigurationError, match=r"redis_url .* is not usable"):
        Produl(server_key="sk_test_0000", redis_url="redis://127.0.0.1:notaport/0")


def test_plain_import_does_not_import_redis():
    import subprocess

    code = "import sys, produl_server; print('redis' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"


def test_a_slow_redis_costs_the_sender_at_most_the_timeout(tmp_path):
    # A listening socket that never answers: each call waits TIMEOUT, then
    # Redis counts as down and is left alone for RETRY_EVERY.
    import socket

    from produl_server._redis import TIMEOUT

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        quota = FleetQuota(RedisLink(url), 5, quota_key(API), RollingQuota(5))
        started = time.monotonic()
        assert quota.take(0.0) == 0.0
        first = time.monotonic() - started
        started = time.monotonic()
        for _ in range(3):
            quota.take(0.0)
        assert time.monotonic() - started < TIMEOUT  # not tried again meanwhile
        assert first >= TIMEOUT * 0.9
        assert quota.kind == "memory"


def test_a_full_queue_spools_in_redis_through_the_sender(redis_server):
    import redis

    # The collector is down: the sender holds a few events in backoff, the
    # queue holds 5, and the rest are refused at the door. Without a
    # spool_dir they go to Redis, by the sender, not dropped (up to as many
    # again as the queue holds, waiting for the sender).
    url = f"http://127.0.0.1:{free_port()}"
    produl = Produl(
        "sk_test_0000",
        api_url=url,
        redis_url=redis_server.url,
        max_queue_size=5,
        shutdown_timeout=1,
        max_requests_per_minute=None,
    )
    for i in range(10):  # 5 queued, 5 refused (more if the sender took some)
        produl.track_event("e", {"i": i}, visitor_id="v")
    produl.shutdown()
    stats = produl.stats
    assert (stats.queued, stats.spooled, stats.dropped, stats.pending) == (10, 10, {}, 0)
    client = redis.Redis.from_url(redis_server.url)
    bodies = [
        fields[b"b"]
        for _id, fields in client.xrange(spool_key(url, key_fingerprint("sk_test_0000")))
    ]
    assert sorted(json.loads(body)["pr"]["i"] for body in bodies) == list(range(10))
