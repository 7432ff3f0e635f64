"""The collector answers like Produl's API reference (issue #9, item 12), over HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3

from produl_server._protocol import KEY_HEADER, MAX_BODY
from produl_server.testing import LocalCollector

EVENT = {"t": "ev", "n": "signup", "vi": "u1"}
BROWSER_PV = {"t": "pv", "p": "/pricing", "vi": "v1", "k": "site_123"}


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    pool = urllib3.PoolManager(maxsize=1, retries=False, timeout=10.0)
    yield pool
    pool.clear()


def post(
    http: urllib3.PoolManager, collector: LocalCollector, body: Any, key: str | None
) -> urllib3.BaseHTTPResponse:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers[KEY_HEADER] = key
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.request("POST", collector.url + "/api/collect", body=raw, headers=headers)


# -- (a) the key before the rate limit ---------------------------------------------


def test_a_wrong_key_is_401_even_over_the_limit_and_uses_no_quota(
    http: urllib3.PoolManager,
) -> None:
    with LocalCollector(rate_limit=2) as collector:
        wrong = [post(http, collector, EVENT, "sk_wrong_key_1234").status for _ in range(5)]
        right = [post(http, collector, EVENT, collector.server_key).status for _ in range(3)]
        after = post(http, collector, EVENT, "sk_wrong_key_1234")

    assert wrong == [401] * 5
    assert right == [204, 204, 429]  # the 5 wrong keys took nothing from the 2
    assert after.status == 401  # not 429, though the quota is used up
    assert json.loads(after.data)["error"] == "invalid_key"


# -- (b) keyless browser requests with a site id -----------------------------------


def test_a_keyless_request_with_a_site_id_is_accepted_at_the_keyless_rate(
    http: urllib3.PoolManager,
) -> None:
    with LocalCollector(rate_limit=100, keyless_rate_limit=2) as collector:
        statuses = [post(http, collector, BROWSER_PV, None).status for _ in range(3)]
        keyed = post(http, collector, EVENT, collector.server_key).status
        events = collector.events

    assert statuses == [204, 204, 429]
    assert keyed == 204  # the keyed quota is separate
    assert events == [BROWSER_PV, BROWSER_PV, EVENT]


@pytest.mark.parametrize(
    "body",
    [
        EVENT,  # no k
        {**EVENT, "k": ""},
        {**EVENT, "k": 123},
        {**EVENT, "k": "x" * 257},
        b"not json",
        [BROWSER_PV],
    ],
)
def test_a_keyless_request_without_a_usable_site_id_is_401_and_uses_no_quota(
    http: urllib3.PoolManager, body: Any
) -> None:
    with LocalCollector(keyless_rate_limit=1) as collector:
        refused = [post(http, collector, body, None) for _ in range(3)]
        accepted = post(http, collector, BROWSER_PV, None)

    assert [r.status for r in refused] == [401] * 3
    assert json.loads(refused[0].data)["error"] == "missing_key"
    assert accepted.status == 204


def test_a_keyless_request_with_a_site_id_is_still_validated(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    response = post(http, produl_collector, {**BROWSER_PV, "p": "pricing"}, None)
    assert (response.status, json.loads(response.data)["field"]) == (400, "p")
    big = {**BROWSER_PV, "ti": "x" * MAX_BODY}
    assert post(http, produl_collector, big, None).status == 413
    assert produl_collector.events == []


# -- (c) browser fields are type-checked -------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("d", "long"),
        ("d", -1),
        ("d", True),
        ("sd", "lots"),
        ("sd", 101),
        ("sd", -0.5),
        ("sw", 1920.5),
        ("sw", "1920"),
        ("sh", -1),
        ("sh", 10**6),
        ("sh", False),
        ("l", 5),
        ("l", ""),
        ("l", "x" * 36),
        ("k", ["site"]),
    ],
)
def test_a_mistyped_browser_field_gets_400_naming_it(
    http: urllib3.PoolManager, produl_collector: LocalCollector, field: str, value: Any
) -> None:
    response = post(http, produl_collector, {**EVENT, field: value}, produl_collector.server_key)
    assert response.status == 400
    assert json.loads(response.data)["error"] == "invalid_field"
    assert json.loads(response.data)["field"] == field
    assert produl_collector.events == []


def test_well_typed_browser_fields_are_accepted(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    hit = {**BROWSER_PV, "d": 1234.5, "sd": 87, "sw": 1920, "sh": 1080, "l": "de-CH"}
    assert post(http, produl_collector, hit, None).status == 204
    edges = {**BROWSER_PV, "d": 0, "sd": 0.0, "sw": 0, "sh": 100_000, "l": "x" * 35}
    assert post(http, produl_collector, edges, None).status == 204
    assert produl_collector.events == [hit, edges]


@pytest.mark.parametrize("depth", [65, 500, 900])
def test_properties_nested_too_deep_get_a_400_naming_the_rule(
    http: urllib3.PoolManager, produl_collector: LocalCollector, depth: int
) -> None:
    raw = b'{"t":"ev","n":"deep","vi":"v","k":"site_123","pr":' + b'{"a":' * depth
    raw += b"1" + b"}" * depth + b"}"
    response = post(http, produl_collector, raw, None)
    body = json.loads(response.data)
    assert (response.status, body["field"]) == (400, "pr")
    assert "nested more than 64 levels deep" in body["message"]
    assert produl_collector.events == []
