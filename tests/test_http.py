"""The transport's HTTP/1.1 (urllib3), against raw-socket servers on 127.0.0.1.

Each server answers with exactly the bytes a test writes, so the answers a
real server rarely gives (interim 1xx, chunked bodies with trailers, a close
between two requests, headers that never end) are exercised for real, on
real sockets, through :class:`Transport`.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from support import RawServer, wait_until

from produl_server import Produl
from produl_server._config import Config
from produl_server._transport import MAX_ANSWER, Transport, Verdict
from produl_server.testing import LocalCollector

KEY = "sk_test_key_0000"
BODY = b'{"t":"ev","n":"e","vi":"v"}'


@pytest.fixture(name="serve")
def _serve():
    made: list[tuple[RawServer, list[Transport]]] = []

    def make(answer, **options):
        server = RawServer(answer)
        options.setdefault("request_timeout", 5)
        transport = Transport(Config.from_env(KEY, server.url, **options))
        made.append((server, [transport]))
        return server, transport

    yield make
    for server, transports in made:
        for transport in transports:
            transport.close()
        server.close()


def reply(*parts: bytes, keep: bool = True):
    """An answer that writes *parts* (each its own send) and keeps the connection or not."""

    def answer(conn, number):
        for part in parts:
            conn.sendall(part)
        return keep

    return answer


NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


def test_requests_carry_the_wire_headers_and_reuse_one_connection(serve):
    server, transport = serve(reply(NO_CONTENT))
    for _ in range(3):
        assert transport.send(BODY).verdict is Verdict.DELIVERED
    assert server.connections == 1
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /api/collect HTTP/1.1"
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert headers[b"Host"] == server.url.removeprefix("http://").encode()
    assert headers[b"X-Produl-Server-Key"] == KEY.encode()
    assert headers[b"Content-Type"] == b"application/json"
    assert headers[b"Content-Length"] == str(len(BODY)).encode()
    assert body == BODY


def test_interim_1xx_answers_are_skipped(serve):
    server, transport = serve(reply(b"HTTP/1.1 100 Continue\r\n\r\n", NO_CONTENT))
    assert transport.send(BODY).verdict is Verdict.DELIVERED
    assert transport.send(BODY).verdict is Verdict.DELIVERED
    assert server.connections == 1


def test_a_chunked_error_body_with_a_trailer_is_read_whole(serve):
    message = json.dumps({"message": "n is too long.", "field": "n"}).encode()
    first, second = message[:10], message[10:]
    server, transport = serve(
        reply(
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"%x;ext=1\r\n%s\r\n" % (len(first), first),
            b"%X\r\n%s\r\n0\r\nX-Trailer: yes\r\n\r\n" % (len(second), second),
        )
    )
    outcome = transport.send(BODY)
    assert (outcome.verdict, outcome.detail) == (
        Verdict.DROP,
        "HTTP 400: n is too long. (field: n)",
    )
    assert transport.send(BODY).verdict is Verdict.DROP
    assert server.connections == 1  # complete answer: the connection was kept


def test_retry_after_is_read_from_a_429(serve):
    _, transport = serve(
        reply(b"HTTP/1.1 429 Too Many\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n")
    )
    outcome = transport.send(BODY)
    assert (outcome.verdict, outcome.retry_after) == (Verdict.RETRY, 7.0)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
        b"HTTP/1.0 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nno length: the body ends with the connection",
    ],
    ids=["connection-close", "http-1.0", "no-length"],
)
def test_answers_that_end_their_connection_get_a_new_one_next_time(serve, answer):
    server, transport = serve(reply(answer, keep=False))
    assert transport.send(BODY).verdict is Verdict.DELIVERED
    assert transport.send(BODY).verdict is Verdict.DELIVERED
    assert server.connections == 2


def test_http_1_0_with_keep_alive_keeps_its_connection(serve):
    server, transport = serve(reply(b"HTTP/1.0 204 No Content\r\nConnection: keep-alive\r\n\r\n"))
    assert transport.send(BODY).verdict is Verdict.DELIVERED
    assert transport.send(BODY).verdict is Verdict.DELIVERED
    assert server.connections == 1


def test_a_connection_the_server_closed_while_idle_is_replaced_without_a_failure(serve):
    # The server answers, then closes: the next send sees the close and
    # opens a new connection instead of failing an attempt on the old one.
    server, transport = serve(reply(NO_CONTENT, keep=False))
    assert transport.send(BODY).verdict is Verdict.DELIVERED
    wait_until(lambda: server.closed == 1, 5, "the server to close the connection")
    assert transport.send(BODY).verdict is Verdict.DELIVERED
    assert server.connections == 2


def test_a_request_the_server_drops_unanswered_on_a_kept_connection_is_sent_anew(serve):
    # The second request on a connection is read and dropped without a byte
    # of answer (a server closing an idle connection just as we reuse it).
    def answer(conn, number):
        if number == 0:
            conn.sendall(NO_CONTENT)
            return True
        return False

    server, transport = serve(answer)
    assert transport.send(BODY).verdict is Verdict.DELIVERED
    assert transport.send(BODY).verdict is Verdict.DELIVERED
    assert server.connections == 2
    assert len(server.requests) == 3  # the dropped one, then the same body anew


def test_a_new_connection_that_is_dropped_unanswered_is_a_network_failure(serve):
    server, transport = serve(lambda conn, number: False)
    outcome = transport.send(BODY)
    assert (outcome.verdict, outcome.reason) == (Verdict.RETRY, "network")
    assert "closed connection without response" in outcome.detail
    assert server.connections == 1  # sent once: no second try on a fresh connection


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "BadStatusLine"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "BadStatusLine"),
    ],
    ids=["not-http", "four-digit-status"],
)
def test_answers_that_break_http_are_network_failures(serve, answer, detail):
    _, transport = serve(reply(answer, keep=False))
    outcome = transport.send(BODY)
    assert (outcome.verdict, outcome.reason) == (Verdict.RETRY, "network")
    assert detail in outcome.detail


def test_endless_headers_are_refused(serve):
    # http.client's bounds: a header line of at most 64 KiB, at most 100 lines.
    filler = b"X-Filler: " + b"y" * 1000 + b"\r\n"
    _, transport = serve(reply(b"HTTP/1.1 204 No Content\r\n", filler * 200, keep=False))
    outcome = transport.send(BODY)
    assert (outcome.verdict, outcome.reason) == (Verdict.RETRY, "network")
    assert "more than 100 headers" in outcome.detail


def test_a_long_body_is_cut_and_its_connection_closed(serve):
    big = b"z" * (MAX_ANSWER * 2)
    server, transport = serve(
        reply(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(big), big)
    )
    outcome = transport.send(BODY)
    assert outcome.verdict is Verdict.DROP
    assert outcome.detail.startswith("HTTP 400: zzz")
    assert transport.send(BODY).verdict is Verdict.DROP
    assert server.connections == 2


def test_a_bad_chunk_lets_the_status_stand_but_not_the_connection(serve):
    server, transport = serve(
        reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnope\r\n0\r\n\r\n")
    )
    assert transport.send(BODY).verdict is Verdict.DELIVERED
    assert transport.send(BODY).verdict is Verdict.DELIVERED
    assert server.connections == 2


def dripping(conn, number):
    """Status and headers at once, then a body one byte a second."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(1000):
        time.sleep(1)
        conn.sendall(b"x")
    return False


def test_a_dripping_body_ends_at_the_deadline_and_the_status_stands(serve):
    _, transport = serve(dripping)
    started = time.monotonic()
    assert transport.send(BODY, timeout=0.5).verdict is Verdict.DELIVERED
    assert time.monotonic() - started < 3.0  # one deadline, not one per read


def test_an_answer_that_never_comes_times_out_at_the_deadline(serve):
    release = threading.Event()

    def silent(conn, number):
        release.wait(10)
        return False

    _, transport = serve(silent)
    started = time.monotonic()
    outcome = transport.send(BODY, timeout=0.3)
    release.set()
    assert (outcome.verdict, outcome.reason) == (Verdict.RETRY, "network")
    assert "timed out" in outcome.detail
    assert time.monotonic() - started < 3.0


def test_a_refused_connection_is_a_network_failure():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    transport = Transport(Config.from_env(KEY, f"http://127.0.0.1:{port}"))
    outcome = transport.send(BODY)
    transport.close()
    assert (outcome.verdict, outcome.reason) == (Verdict.RETRY, "network")
    assert outcome.detail.startswith("ConnectionRefusedError")


def _ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_an_ipv6_collector_gets_a_bracketed_host_header():
    with LocalCollector(host="::1") as collector:
        assert collector.url.startswith("http://[::1]:")
        produl = Produl(server_key=collector.server_key, api_url=collector.url)
        produl.track_event("over_ipv6", visitor_id="v")
        assert produl.flush(timeout=10)
        produl.shutdown(timeout=5)
        assert collector.events[0]["n"] == "over_ipv6"
        port = collector.url.rsplit(":", 1)[1]
        assert collector.requests[0].headers["Host"] == f"[::1]:{port}"


def drip_headers(conn, number):
    """A status line, then header bytes 0.1 s apart: every read is quick, the answer endless."""
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    for _ in range(600):
        time.sleep(0.1)
        conn.sendall(b"X")
    return False


@pytest.mark.parametrize("through_proxy", [False, True], ids=["direct", "proxy"])
def test_dripping_headers_end_at_the_deadline_on_either_route(serve, through_proxy):
    # Each read returns within urllib3's read timeout; only the watchdog's
    # one deadline for the whole request can end it. A proxy that drips is
    # the same route: the raw server plays the proxy for a remote host.
    server = RawServer(drip_headers)
    try:
        if through_proxy:
            config = Config.from_env(
                KEY, "http://collector.invalid", proxy=server.url, request_timeout=1
            )
        else:
            config = Config.from_env(KEY, server.url, request_timeout=1)
        transport = Transport(config)
        started = time.monotonic()
        outcome = transport.send(BODY)
        elapsed = time.monotonic() - started
        transport.close()
    finally:
        server.close()
    assert (outcome.verdict, outcome.reason) == (Verdict.RETRY, "network")
    assert "timed out after 1 s" in outcome.detail
    assert elapsed < 5.0  # one deadline (1 s), not one per read (600 reads)
    if through_proxy:
        assert server.requests[0].startswith(b"POST http://collector.invalid/api/collect ")


def test_every_resolved_address_shares_one_connect_deadline(monkeypatch):
    # A listener whose accept queue is full drops new SYNs: connecting to it
    # hangs, as to a dead address. The name resolves to it three times.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    held = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            held.append(filler)
        real = socket.getaddrinfo
        dead = real("127.0.0.1", port, 0, socket.SOCK_STREAM)[:1] * 3

        def resolve(host, *args, **kwargs):
            return dead if host == "three-dead.test" else real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", resolve)
        config = Config.from_env(KEY, f"http://three-dead.test:{port}", request_timeout=1)
        transport = Transport(config)
        started = time.monotonic()
        outcome = transport.send(BODY)
        elapsed = time.monotonic() - started
        transport.close()
    finally:
        for filler in held:
            filler.close()
        listener.close()
    assert (outcome.verdict, outcome.reason) == (Verdict.RETRY, "network")
    assert elapsed < 2.5  # three addresses, one request_timeout between them
