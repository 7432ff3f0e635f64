"""The Redis spool hardened (issue #18): a stream per key, bad entries set
aside, and a Redis password never shown. Real redis-server, real collector."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time

from test_spool_owners import KEY_A, KEY_B, bodies_sent_with, run_drain, spool_three

from produl_server import Produl
from produl_server._config import key_fingerprint
from produl_server._redis import spool_key
from produl_server.testing import LocalCollector


def test_another_sites_client_never_sends_a_sites_events_from_redis(redis_server):
    with LocalCollector(server_key=KEY_A) as collector:
        spool_three(collector, KEY_A, redis_url=redis_server.url)
        site_b = Produl(
            server_key=KEY_B,
            api_url=collector.url,
            redis_url=redis_server.url,
            max_requests_per_minute=None,
        )
        site_b.track_event("b_only", visitor_id="cus_b")
        site_b.flush(timeout=10)
        site_b.shutdown(timeout=5)
        drained = run_drain(collector, KEY_B, "--redis", redis_server.url)
        assert drained.returncode == 0, drained.stderr
        assert "3 event(s) of other API URLs or keys left untouched" in drained.stdout
        assert [json.loads(b)["n"] for b in bodies_sent_with(collector, KEY_B)] == ["b_only"]
        drained = run_drain(collector, KEY_A, "--redis", redis_server.url)
        assert drained.returncode == 0, drained.stderr
        plans = sorted(
            json.loads(b)["pr"]["secret_plan"] for b in bodies_sent_with(collector, KEY_A)
        )
        assert plans == ["a-0", "a-1", "a-2"]


def test_bad_stream_entries_are_set_aside_and_the_good_ones_sent(redis_server):
    import redis

    with LocalCollector(server_key=KEY_A) as collector:
        spool_three(collector, KEY_A, redis_url=redis_server.url)
        client = redis.Redis.from_url(redis_server.url)
        stream = spool_key(collector.url, key_fingerprint(KEY_A))
        client.xadd(stream, {"x": "no body field"})
        client.xadd(stream, {"b": b'{"t":"ev","n":"e"}', "v": b"\xff"})
        client.close()
        drained = run_drain(collector, KEY_A, "--redis", redis_server.url)
        assert drained.returncode == 0, drained.stderr
        assert "delivered 3 spooled event(s)" in drained.stdout
        assert "2 event(s) in quarantine" in drained.stdout
        assert len(collector.events) == 3


def test_a_redis_password_in_the_query_is_never_shown(redis_server, caplog):
    secret = "S3CRET-redis-pass"
    url = redis_server.url + f"?password={secret}"
    with LocalCollector(server_key=KEY_A) as collector:
        collector.fail_next(1_000_000, status=503)
        with caplog.at_level(logging.INFO, logger="produl_server"):
            site = Produl(
                server_key=KEY_A,
                api_url=collector.url,
                redis_url=url,
                shutdown_timeout=0.5,
                retry_initial_delay=0.02,
                retry_max_delay=0.05,
            )
            site.track_event("e", visitor_id="v")
            site.shutdown()
        shown = repr(site.config) + repr(site) + caplog.text
        assert "password=***" in repr(site.config)
        assert secret not in shown
        collector.reset()
        failed = run_drain(
            collector, KEY_A, "--redis", url.replace(redis_server.url, "redis://127.0.0.1:1/0")
        )
        assert failed.returncode != 0
        assert secret not in failed.stdout + failed.stderr
    # The collector's fleet view, which /api/pace and the live page show.
    with LocalCollector(redis_url=url) as watched:
        fleet = watched._server.fleet
        assert fleet is not None
        shown = json.dumps(fleet.read())
        assert "password=***" in shown
        assert secret not in shown


class _LoopbackServer:
    """A TCP server on 127.0.0.1 that hands each connection to :meth:`accepted`."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        self.stopping = threading.Event()
        self.opened: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            self.opened.append(conn)
            self.accepted(conn)

    def accepted(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stopping.set()
        self.sock.close()
        for opened in self.opened:
            with contextlib.suppress(OSError):
                opened.shutdown(socket.SHUT_RDWR)
            opened.close()


class _NonsenseRedis(_LoopbackServer):
    """Answers ``+OK`` to every command it is sent."""

    def accepted(self, conn: socket.socket) -> None:
        threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(10)
            while not self.stopping.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                # One reply per command: each command starts a line with "*".
                commands = sum(1 for line in data.split(b"\r\n") if line.startswith(b"*"))
                conn.sendall(b"+OK\r\n" * max(commands, 1))


def test_a_redis_that_answers_nonsense_counts_as_down(caplog):
    nonsense = _NonsenseRedis()
    try:
        with LocalCollector(server_key=KEY_A) as collector:
            client = Produl(
                server_key=KEY_A,
                api_url=collector.url,
                redis_url=nonsense.url,
            )
            for i in range(5):
                client.track_event("e", {"i": i}, visitor_id=f"v{i}")
            assert client.flush(timeout=15)
            assert client.stats.quota != "redis"
            client.shutdown(timeout=2)  # must not raise
            assert sorted(e["pr"]["i"] for e in collector.events) == [0, 1, 2, 3, 4]
    finally:
        nonsense.close()
    assert "does not answer" in caplog.text


class _DrippingRelay(_LoopbackServer):
    """Forwards to a real Redis, and its answers back one byte every 0.2 s."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        super().__init__()

    def accepted(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream))
        self.opened.append(upstream)
        threading.Thread(target=self._pipe, args=(conn, upstream, 0), daemon=True).start()
        threading.Thread(target=self._pipe, args=(upstream, conn, 0.2), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, pause: float) -> None:
        with contextlib.suppress(OSError):
            while not self.stopping.is_set():
                data = source.recv(65536)
                if not data:
                    break
                for index in range(len(data)) if pause else [None]:
                    if index is None:
                        target.sendall(data)
                    elif not self.stopping.wait(pause):
                        target.sendall(data[index : index + 1])
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_RDWR)


def test_a_redis_that_drips_its_answers_counts_as_down_and_shutdown_is_bounded(redis_server):
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    relay = _DrippingRelay(port)
    try:
        with LocalCollector(server_key=KEY_A) as collector:
            client = Produl(
                server_key=KEY_A, api_url=collector.url, redis_url=relay.url, shutdown_timeout=2
            )
            for i in range(5):
                client.track_event("e", {"i": i}, visitor_id=f"v{i}")
            assert client.flush(timeout=20)
            assert sorted(e["pr"]["i"] for e in collector.events) == [0, 1, 2, 3, 4]
            client.track_event("late", visitor_id="v")
            started = time.monotonic()
            client.shutdown()
            # shutdown_timeout (2 s) and one bounded Redis call, not 90 s.
            assert time.monotonic() - started < 10
    finally:
        relay.close()
