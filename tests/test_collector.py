"""LocalCollector speaks PROTOCOL.md over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3

from produl_server._protocol import KEY_HEADER, MAX_BODY, WireError, check_wire_event
from produl_server.testing import LocalCollector

EVENT = {"t": "ev", "n": "invoice_paid", "vi": "cus_1", "pr": {"amount_cents": 4900}}


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    # One connection per host, so consecutive requests share it (keep-alive).
    pool = urllib3.PoolManager(maxsize=1, retries=False, timeout=10.0)
    yield pool
    pool.clear()


def post(
    http: urllib3.PoolManager,
    collector: LocalCollector,
    body: Any = EVENT,
    *,
    key: str | None = "same",
    path: str = "/api/collect",
    headers: dict[str, str] | None = None,
) -> urllib3.BaseHTTPResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        sent[KEY_HEADER] = collector.server_key if key == "same" else key
    return http.request("POST", collector.url + path, body=raw, headers=sent)


@pytest.mark.parametrize("path", ["/api/collect", "/r"])
def test_accepts_an_event_with_204_and_stores_it(
    http: urllib3.PoolManager, produl_collector: LocalCollector, path: str
) -> None:
    response = post(http, produl_collector, path=path)

    assert response.status == 204
    assert response.data == b""
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert produl_collector.events == [EVENT]
    (request,) = produl_collector.requests
    assert (request.method, request.path, request.status) == ("POST", path, 204)
    assert request.headers["x-produl-server-key"] == produl_collector.server_key
    assert json.loads(request.body) == EVENT


def test_events_are_copies(http: urllib3.PoolManager, produl_collector: LocalCollector) -> None:
    post(http, produl_collector)
    produl_collector.events[0]["n"] = "tampered"
    produl_collector.events[0]["pr"]["amount_cents"] = 0
    assert produl_collector.events == [EVENT]


@pytest.mark.parametrize(
    ("key", "code", "message"),
    [
        (None, "missing_key", "Send your server key in X-Produl-Server-Key"),
        ("sk_wrong_key_1234", "invalid_key", "Unknown server key."),
    ],
)
def test_refuses_a_missing_or_wrong_key_with_401(
    http: urllib3.PoolManager,
    produl_collector: LocalCollector,
    key: str | None,
    code: str,
    message: str,
) -> None:
    response = post(http, produl_collector, key=key)

    assert response.status == 401
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    body = json.loads(response.data)
    assert body["message"].startswith(message)
    assert body == {"error": code, "message": body["message"], "field": KEY_HEADER}
    assert produl_collector.server_key not in response.data.decode()
    assert produl_collector.events == []
    assert [r.status for r in produl_collector.requests] == [401]


@pytest.mark.parametrize(
    "body",
    [
        {"t": "pv", "vi": "u1"},  # no path
        {"t": "ev", "n": ""},  # empty name
        {"t": "ev", "n": "x", "p": "no-slash"},
        {"t": "xx"},
        {"t": "ev", "n": "x", "vi": None},
        [EVENT],
    ],
)
def test_refuses_an_invalid_event_with_the_protocol_error_body(
    http: urllib3.PoolManager, produl_collector: LocalCollector, body: Any
) -> None:
    with pytest.raises(WireError) as expected:
        check_wire_event(body)

    response = post(http, produl_collector, body)

    assert response.status == 400
    assert json.loads(response.data) == expected.value.as_body()
    assert produl_collector.events == []


@pytest.mark.parametrize(
    "raw", [b"{", b"", b"\xff\xfe{}", b'{"t": "ev", "n": "x", "pr": {"v": NaN}}', b"[" * 50_000]
)
def test_refuses_bad_json_with_400(
    http: urllib3.PoolManager, produl_collector: LocalCollector, raw: bytes
) -> None:
    response = post(http, produl_collector, raw)

    assert response.status == 400
    assert json.loads(response.data)["error"] == "invalid_json"
    assert produl_collector.events == []


def test_refuses_a_body_over_64_kib_with_413_and_keeps_the_connection(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    big = {"t": "ev", "n": "big", "pr": {"blob": "x" * MAX_BODY}}

    too_big = post(http, produl_collector, big)
    after = post(http, produl_collector)

    assert too_big.status == 413
    assert json.loads(too_big.data)["error"] == "body_too_large"
    assert after.status == 204
    first, second = produl_collector.requests
    # The oversized body was read to its end, so the kept-alive connection
    # carried the next request intact.
    assert first.client_port == second.client_port
    assert produl_collector.events == [EVENT]


def test_a_body_of_exactly_64_kib_is_accepted(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    event = {"t": "ev", "n": "edge", "pr": {"blob": ""}}
    padding = MAX_BODY - len(json.dumps(event).encode())
    event["pr"]["blob"] = "x" * padding
    assert len(json.dumps(event).encode()) == MAX_BODY

    assert post(http, produl_collector, event).status == 204


def test_keeps_one_connection_alive_across_requests(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    statuses = [post(http, produl_collector).status for _ in range(5)]
    statuses.append(post(http, produl_collector, b"{").status)
    statuses.append(post(http, produl_collector).status)

    assert statuses == [204] * 5 + [400, 204]
    assert len({r.client_port for r in produl_collector.requests}) == 1


def test_honours_connection_close(produl_collector: LocalCollector) -> None:
    body = json.dumps(EVENT).encode()
    head = (
        f"POST /api/collect HTTP/1.1\r\nHost: 127.0.0.1:{produl_collector.port}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{KEY_HEADER}: {produl_collector.server_key}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", produl_collector.port), timeout=10) as sock:
        sock.sendall(head + body)
        received = b""
        while chunk := sock.recv(4096):  # ends only when the server closes
            received += chunk

    assert received.startswith(b"HTTP/1.1 204 ")
    assert b"\r\nConnection: close\r\n" in received
    assert produl_collector.events == [EVENT]


def test_accepts_a_chunked_body(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    raw = json.dumps(EVENT).encode()
    response = http.request(
        "POST",
        produl_collector.url + "/api/collect",
        body=iter([raw[:10], raw[10:]]),
        headers={KEY_HEADER: produl_collector.server_key},
        chunked=True,
    )
    assert response.status == 204
    assert produl_collector.events == [EVENT]


def test_rate_limit_answers_429_with_retry_after(http: urllib3.PoolManager) -> None:
    with LocalCollector(rate_limit=3) as collector:
        statuses = [post(http, collector).status for _ in range(3)]
        limited = post(http, collector)

        assert statuses == [204, 204, 204]
        assert limited.status == 429
        assert json.loads(limited.data)["error"] == "rate_limited"
        # 3 per minute refills one token every 20 s.
        assert 1 <= int(limited.headers["Retry-After"]) <= 20
        assert len(collector.events) == 3


def test_keyless_requests_have_their_own_limit(http: urllib3.PoolManager) -> None:
    browser_event = {**EVENT, "k": "site_1"}
    with LocalCollector(rate_limit=100, keyless_rate_limit=1) as collector:
        statuses = [post(http, collector, browser_event, key=None).status for _ in range(2)]
        assert statuses == [204, 429]
        assert post(http, collector).status == 204


def test_no_rate_limit_by_default(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    browser_event = {**EVENT, "k": "site_1"}
    statuses = {post(http, produl_collector, browser_event, key=None).status for _ in range(250)}
    assert statuses == {204}


def test_fail_next_answers_the_status_and_stores_nothing(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    produl_collector.fail_next(2, 503, retry_after=0.5)

    first, second, third = (post(http, produl_collector) for _ in range(3))

    assert (first.status, second.status, third.status) == (503, 503, 204)
    assert first.headers["Retry-After"] == "0.5"
    assert "Retry-After" not in third.headers
    assert produl_collector.events == [EVENT]
    assert [r.status for r in produl_collector.requests] == [503, 503, 204]


def test_fail_next_without_retry_after_sends_no_header(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    produl_collector.fail_next(1, 429)
    response = post(http, produl_collector)
    assert response.status == 429
    assert "Retry-After" not in response.headers


def test_drop_next_closes_without_answer(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    produl_collector.drop_next(1)

    with pytest.raises(urllib3.exceptions.ProtocolError):
        post(http, produl_collector)
    after = post(http, produl_collector)

    assert after.status == 204
    dropped, answered = produl_collector.requests
    assert dropped.status is None
    assert json.loads(dropped.body) == EVENT  # the request was read in full
    assert answered.client_port != dropped.client_port  # a new connection
    assert produl_collector.events == [EVENT]


def _status_or_none(http: urllib3.PoolManager, collector: LocalCollector) -> int | None:
    try:
        return post(http, collector).status
    except urllib3.exceptions.ProtocolError:
        return None


def test_faults_apply_in_the_order_queued(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    produl_collector.fail_next(1, 500)
    produl_collector.drop_next(1)
    produl_collector.fail_next(1, 502)

    outcomes = [_status_or_none(http, produl_collector) for _ in range(4)]

    assert outcomes == [500, None, 502, 204]


def test_latency_delays_each_answer(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    produl_collector.latency = 0.3
    started = time.monotonic()
    response = post(http, produl_collector)
    assert response.status == 204
    assert time.monotonic() - started >= 0.3
    with pytest.raises(ValueError, match="negative"):
        produl_collector.latency = -1


def _post_in_thread(collector: LocalCollector) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        pool = urllib3.PoolManager(retries=False, timeout=30.0)
        try:
            outcome["status"] = post(pool, collector).status
        except urllib3.exceptions.HTTPError as exc:
            outcome["error"] = exc
        finally:
            pool.clear()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_hang_holds_posts_until_release(produl_collector: LocalCollector) -> None:
    produl_collector.hang()
    thread, outcome = _post_in_thread(produl_collector)

    produl_collector.wait_for_held(1)
    assert thread.is_alive(), "a POST was answered while the collector hung"
    assert produl_collector.events == []
    assert produl_collector.requests == []

    produl_collector.release()
    thread.join(10)
    assert outcome == {"status": 204}
    assert produl_collector.wait_for(1, timeout=5) == [EVENT]


def test_stop_is_prompt_with_idle_and_hung_connections() -> None:
    collector = LocalCollector().start()
    idle = socket.create_connection(("127.0.0.1", collector.port), timeout=10)
    collector.hang()
    collector.latency = 60
    thread, outcome = _post_in_thread(collector)
    collector.wait_for_held(1)

    started = time.monotonic()
    collector.stop()
    collector.stop()  # idempotent
    stopped_in = time.monotonic() - started

    thread.join(10)
    with idle:
        assert idle.recv(1) == b""  # the server closed the idle connection
    assert stopped_in < 5
    assert "status" not in outcome  # dropped, never answered
    assert collector.held == 0
    assert [r.status for r in collector.requests] == [None]
    with pytest.raises(RuntimeError, match="not running"):
        _ = collector.url


def test_wait_for_raises_a_helpful_assertion(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    post(http, produl_collector)
    post(http, produl_collector, key=None)

    with pytest.raises(
        AssertionError, match=r"at least 3 .* got 1.*\[204, 401\].*event invoice_paid"
    ):
        produl_collector.wait_for(3, timeout=0.2)


def test_wait_for_wakes_on_arrival(produl_collector: LocalCollector) -> None:
    thread, _ = _post_in_thread(produl_collector)
    assert produl_collector.wait_for(1, timeout=10) == [EVENT]
    thread.join(10)


def test_reset_forgets_events_requests_and_faults(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    post(http, produl_collector)
    produl_collector.fail_next(5)
    produl_collector.latency = 0.5
    produl_collector.hang()

    produl_collector.reset()

    assert produl_collector.events == []
    assert produl_collector.requests == []
    assert produl_collector.latency == 0.0
    assert post(http, produl_collector).status == 204


def test_concurrent_clients_lose_nothing(produl_collector: LocalCollector) -> None:
    def send(worker: int) -> None:
        pool = urllib3.PoolManager(maxsize=1, retries=False, timeout=30.0)
        try:
            for i in range(50):
                event = {"t": "ev", "n": "load", "vi": f"w{worker}", "pr": {"i": i}}
                assert post(pool, produl_collector, event).status == 204
        finally:
            pool.clear()

    threads = [threading.Thread(target=send, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    events = produl_collector.wait_for(200, timeout=10)
    assert len(events) == 200
    for worker in range(4):
        mine = [e["pr"]["i"] for e in events if e["vi"] == f"w{worker}"]
        assert mine == list(range(50))  # per connection, arrival order is kept


def test_options_preflight_allows_the_key_header(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    response = http.request("OPTIONS", produl_collector.url + "/api/collect")
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert KEY_HEADER in response.headers["Access-Control-Allow-Headers"]
    assert "POST" in response.headers["Access-Control-Allow-Methods"]


def test_post_elsewhere_is_404(http: urllib3.PoolManager, produl_collector: LocalCollector) -> None:
    assert post(http, produl_collector, path="/api/nope").status == 404
    assert produl_collector.events == []


def test_recorded_request_repr_hides_the_key(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    post(http, produl_collector, key="sk_live_secret_value_9f3a")
    text = repr(produl_collector.requests)
    assert "sk_live_secret_value" not in text
    assert "9f3a" in text


def test_restart_serves_again_on_a_new_port(http: urllib3.PoolManager) -> None:
    collector = LocalCollector()
    with collector:
        assert post(http, collector).status == 204
    with collector:
        assert post(http, collector).status == 204
        assert len(collector.events) == 2  # the in-memory store survives a restart
