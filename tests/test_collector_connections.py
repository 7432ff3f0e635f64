"""The collector bounds its connections and how long a request may take (issue 18, item 13).

3,000 connections dripping one byte every 20 s used to cost 3,000 threads:
nothing capped the connections, and each read stayed under the idle timeout.
Real sockets against a real collector on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import urllib3

from produl_server.collector._server import CollectorServer
from produl_server.collector._store import MemoryStore

KEY = "sk_test_connections"
CAP = 8
CONNECTION_THREAD = "produl-server.collector.connection"


@pytest.fixture
def start() -> Iterator:
    made: list[CollectorServer] = []

    def make(**options) -> CollectorServer:
        server = CollectorServer(store=MemoryStore(), server_key=KEY, **options)
        server.start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def connection_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == CONNECTION_THREAD}


def wait_for(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes *sock* (without answering) within *timeout* seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def slow_start(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /api/collect HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port)
    return sock


def post_event(server: CollectorServer) -> int:
    http = urllib3.PoolManager(retries=False, timeout=10.0)
    response = http.request(
        "POST",
        server.url + "/api/collect",
        body=b'{"t":"ev","n":"e","vi":"v"}',
        headers={"Content-Type": "application/json", "X-Produl-Server-Key": KEY},
    )
    http.clear()
    return response.status


def test_connections_over_the_cap_are_closed_and_threads_stay_bounded(start, caplog) -> None:
    server = start(max_connections=CAP, request_deadline=60)
    # Threads of this server only: an earlier test's may still be ending.
    before = connection_threads()

    def new_threads() -> int:
        return len(connection_threads() - before)

    held = [slow_start(server.port) for _ in range(CAP)]
    extra: list[socket.socket] = []
    try:
        assert wait_for(lambda: new_threads() == CAP)
        extra = [slow_start(server.port) for _ in range(10)]
        assert all(closed_by_peer(sock, 20) for sock in extra)
        assert new_threads() <= CAP
        assert "the most this collector serves at once" in caplog.text
    finally:
        for sock in held + extra:
            sock.close()
    # Room again once the held ones are gone.
    assert wait_for(lambda: new_threads() == 0)
    assert post_event(server) == 204


def test_a_request_that_arrives_too_slowly_is_cut_at_the_deadline(start) -> None:
    server = start(request_deadline=1.0)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    head = b"POST /api/collect HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 500\r\n"
    sock.sendall(head % server.port + b"X-Produl-Server-Key: " + KEY.encode() + b"\r\n\r\n")
    cut = False
    deadline = time.monotonic() + 20
    with contextlib.closing(sock):
        # Each byte comes well within the 30 s idle timeout; only the
        # whole-request deadline can end this.
        while not cut and time.monotonic() < deadline:
            try:
                sock.sendall(b"x")
            except OSError:
                cut = True
                break
            cut = closed_by_peer(sock, 0.2)
    assert cut, "a request dripping one byte at a time was never cut"
    assert wait_for(lambda: server.running and not server._httpd._arriving)
    assert post_event(server) == 204
