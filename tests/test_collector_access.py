"""Who may read, wipe or reach the collector (issue #9, item 9), over real HTTP.

Bad ``Host`` headers go over raw sockets: an HTTP library would fix them.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from http.client import HTTPResponse

import pytest
import urllib3

from produl_server._protocol import KEY_HEADER
from produl_server.collector._access import HostCheck, bearer
from produl_server.testing import LocalCollector

EVENT = {"t": "ev", "n": "signup", "vi": "u1"}


def raw(port: int, request: bytes) -> tuple[int, HTTPResponse, bytes]:
    """Send bytes as they are; read one answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        response = HTTPResponse(sock)
        response.begin()
        return response.status, response, response.read()


def request(method: str, target: str, host: str | None, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [*headers, f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    pool = urllib3.PoolManager(maxsize=1, retries=False, timeout=10.0)
    yield pool
    pool.clear()


@pytest.fixture
def filled(http: urllib3.PoolManager, produl_collector: LocalCollector) -> LocalCollector:
    response = http.request(
        "POST",
        produl_collector.url + "/api/collect",
        body=json.dumps(EVENT).encode(),
        headers={KEY_HEADER: produl_collector.server_key},
    )
    assert response.status == 204
    return produl_collector


# -- Host ------------------------------------------------------------------------


def test_dns_rebinding_delete_is_refused_even_with_the_token(filled: LocalCollector) -> None:
    # The repro: curl -X DELETE -H 'Host: attacker.example:PORT' ...
    status, response, body = raw(
        filled.port,
        request(
            "DELETE",
            "/api/events",
            f"attacker.example:{filled.port}",
            f"Authorization: Bearer {filled.access_token}",
        ),
    )

    assert status == 421
    assert response.getheader("Content-Type") == "application/json"
    assert json.loads(body)["error"] == "invalid_host"
    assert json.loads(body)["field"] == "Host"
    assert filled.events == [EVENT]


@pytest.mark.parametrize(
    "host",
    [
        "attacker.example:{port}",
        "127.0.0.1:{other}",  # right name, wrong port
        "localhost",  # no port means 80
        "localhost.attacker.example:{port}",
        "127.0.0.1.nip.io:{port}",
        "10.1.2.3:{port}",  # an address, but not this loopback-bound collector's
        "[::1:{port}",
        "127.0.0.1:\xb2{port}",
        "",
    ],
)
def test_requests_naming_another_host_get_421(filled: LocalCollector, host: str) -> None:
    value = host.format(port=filled.port, other=filled.port % 65535 + 1)
    for method, target in (("GET", "/api/events"), ("GET", "/"), ("POST", "/api/collect")):
        auth = f"Authorization: Bearer {filled.access_token}"
        key = f"{KEY_HEADER}: {filled.server_key}"
        body = json.dumps({**EVENT, "n": "injected"}).encode()
        status, _, _ = raw(filled.port, request(method, target, value, auth, key, body=body))
        assert status == 421, (method, value)
    assert filled.events == [EVENT]


def test_a_missing_or_doubled_host_is_refused(filled: LocalCollector) -> None:
    port = filled.port
    no_host = b"GET /healthz HTTP/1.0\r\n\r\n"
    doubled = request("GET", "/healthz", f"127.0.0.1:{port}", f"Host: attacker.example:{port}")
    assert raw(port, no_host)[0] == 421
    assert raw(port, doubled)[0] == 421


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",
        "localhost:{port}",
        "LocalHost:{port}",
        "localhost.:{port}",
        "app.localhost:{port}",
        "127.8.9.10:{port}",
        "[::1]:{port}",
    ],
)
def test_loopback_names_and_addresses_are_answered(
    produl_collector: LocalCollector, host: str
) -> None:
    status, _, body = raw(
        produl_collector.port,
        request("GET", "/healthz", host.format(port=produl_collector.port)),
    )
    assert status == 200
    assert json.loads(body)["status"] == "ok"


def test_host_check_rules() -> None:
    loopback = HostCheck("127.0.0.1")
    assert loopback.allows("localhost:80", 80)
    assert not loopback.allows("192.168.1.5:80", 80)
    assert not loopback.allows(None, 80)

    everywhere = HostCheck("0.0.0.0", allowed_hosts=["Collector.internal"])
    # Bound to every interface: any address (a rebinding attack needs a
    # name), loopback names, and the names the user allowed.
    assert everywhere.allows("192.168.1.5:8787", 8787)
    assert everywhere.allows("[fe80::1]:8787", 8787)
    assert everywhere.allows("collector.internal:8787", 8787)
    assert not everywhere.allows("attacker.example:8787", 8787)
    assert not everywhere.allows("192.168.1.5:9999", 8787)

    named = HostCheck("dev-box")
    assert named.allows("DEV-BOX:8787", 8787)
    assert not named.allows("10.0.0.1:8787", 8787)
    assert HostCheck("::1").allows("[::1]:8787", 8787)


# -- the inspection API needs the token or the key -------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer "},
        {KEY_HEADER: "sk_wrong_key_1234"},
    ],
)
def test_reading_or_deleting_events_without_a_credential_is_401(
    http: urllib3.PoolManager,
    filled: LocalCollector,
    method: str,
    headers: dict[str, str],
) -> None:
    response = http.request(method, filled.url + "/api/events", headers=headers)

    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Access-Control-Allow-Origin" not in response.headers
    if method != "HEAD":
        assert json.loads(response.data)["error"] == "unauthorized"
        assert filled.access_token not in response.data.decode()
        assert filled.server_key not in response.data.decode()
    assert filled.events == [EVENT]


@pytest.mark.parametrize("credential", ["token", "key header", "key as bearer"])
def test_the_token_or_the_server_key_unlocks_the_api(
    http: urllib3.PoolManager, filled: LocalCollector, credential: str
) -> None:
    headers = {
        "token": {"Authorization": f"Bearer {filled.access_token}"},
        "key header": {KEY_HEADER: filled.server_key},
        "key as bearer": {"Authorization": f"bearer {filled.server_key}"},
    }[credential]

    listed = http.request("GET", filled.url + "/api/events", headers=headers)
    assert listed.status == 200
    assert [item["event"] for item in json.loads(listed.data)["events"]] == [EVENT]
    assert http.request("DELETE", filled.url + "/api/events", headers=headers).status == 204
    assert filled.events == []


def test_the_page_itself_needs_no_token_and_its_address_carries_one(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    assert http.request("GET", produl_collector.url + "/").status == 200
    assert produl_collector.page_url == (
        f"{produl_collector.url}/#token={produl_collector.access_token}"
    )
    assert len(produl_collector.access_token) >= 32
    with LocalCollector() as other:
        assert other.access_token != produl_collector.access_token


def test_bearer_parsing() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("  bearer   abc ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer("Bearer") is None
    assert bearer(None) is None


def test_a_forward_proxy_request_is_answered_but_events_stay_locked(
    filled: LocalCollector,
) -> None:
    # Absolute form: what a proxy receives, never what a rebinding page sends.
    target = "http://analytics.internal.example:8080/api/events"
    host = "analytics.internal.example:8080"
    status, _, _ = raw(filled.port, request("GET", target, host))
    assert status == 401
    auth = f"Authorization: Bearer {filled.access_token}"
    assert raw(filled.port, request("DELETE", target, host))[0] == 401
    assert raw(filled.port, request("GET", target, host, auth))[0] == 200
    assert filled.events == [EVENT]
