"""The collector's JSON API and page, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import urllib3

from produl_server._protocol import KEY_HEADER
from produl_server.testing import LocalCollector

EVENTS = [
    {"t": "pv", "p": "/pricing", "vi": "u1"},
    {"t": "ev", "n": "signup", "vi": "u1", "pr": {"plan": "pro"}},
    {"t": "ev", "n": "invoice_paid", "vi": "u2"},
    {"t": "ev", "n": "signup", "vi": "u3"},
]


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    pool = urllib3.PoolManager(maxsize=1, retries=False, timeout=10.0)
    yield pool
    pool.clear()


@pytest.fixture
def filled(http: urllib3.PoolManager, produl_collector: LocalCollector) -> LocalCollector:
    for event in EVENTS:
        response = http.request(
            "POST",
            produl_collector.url + "/api/collect",
            body=json.dumps(event).encode(),
            headers={KEY_HEADER: produl_collector.server_key},
        )
        assert response.status == 204
    return produl_collector


def auth(collector: LocalCollector) -> dict[str, str]:
    return {"Authorization": f"Bearer {collector.access_token}"}


def get_events(http: urllib3.PoolManager, collector: LocalCollector, query: str = "") -> dict:  # type: ignore[type-arg]
    response = http.request("GET", collector.url + "/api/events" + query, headers=auth(collector))
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    return json.loads(response.data)  # type: ignore[no-any-return]


def test_lists_events_newest_first_with_counts(
    http: urllib3.PoolManager, filled: LocalCollector
) -> None:
    body = get_events(http, filled)

    assert [item["event"] for item in body["events"]] == EVENTS[::-1]
    ids = [item["id"] for item in body["events"]]
    assert ids == sorted(ids, reverse=True)
    assert all(isinstance(item["received_at"], float) for item in body["events"])
    assert body["total"] == 4
    assert body["counts"] == {"signup": 2, "invoice_paid": 1, "pageview": 1}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("?t=pv", [EVENTS[0]]),
        ("?n=signup", [EVENTS[3], EVENTS[1]]),
        ("?vi=u1", [EVENTS[1], EVENTS[0]]),
        ("?t=ev&vi=u1", [EVENTS[1]]),
        ("?limit=1", [EVENTS[3]]),
        ("?n=", EVENTS[::-1]),  # an empty filter is no filter
        ("?n=nothing", []),
    ],
)
def test_filters(
    http: urllib3.PoolManager,
    filled: LocalCollector,
    query: str,
    expected: list[dict],  # type: ignore[type-arg]
) -> None:
    assert [item["event"] for item in get_events(http, filled, query)["events"]] == expected


@pytest.mark.parametrize("limit", ["0", "abc", "1001", "-1"])
def test_refuses_a_bad_limit(
    http: urllib3.PoolManager, produl_collector: LocalCollector, limit: str
) -> None:
    response = http.request(
        "GET", f"{produl_collector.url}/api/events?limit={limit}", headers=auth(produl_collector)
    )
    assert response.status == 400
    assert json.loads(response.data)["field"] == "limit"


def test_delete_forgets_everything(http: urllib3.PoolManager, filled: LocalCollector) -> None:
    response = http.request("DELETE", filled.url + "/api/events", headers=auth(filled))

    assert response.status == 204
    assert filled.events == []
    assert get_events(http, filled) == {"events": [], "total": 0, "counts": {}, "flagged": 0}
    assert http.request("DELETE", filled.url + "/api/collect").status == 405


def test_healthz(http: urllib3.PoolManager, filled: LocalCollector) -> None:
    response = http.request("GET", filled.url + "/healthz")
    assert response.status == 200
    assert json.loads(response.data) == {"status": "ok", "events": 4}
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_inspection_api_is_not_readable_cross_origin(
    http: urllib3.PoolManager, filled: LocalCollector
) -> None:
    # Another site open in the same browser must not read the local events.
    response = http.request("GET", filled.url + "/api/events", headers=auth(filled))
    assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize(
    ("path", "content_type", "marker"),
    [
        ("/", "text/html; charset=utf-8", b'<tbody id="events">'),
        ("/app.js", "text/javascript; charset=utf-8", b"/api/events"),
        ("/", "text/html; charset=utf-8", b'<svg id="pace-chart" role="img"'),
        ("/app.js", "text/javascript; charset=utf-8", b"/api/pace"),
        ("/app.css", "text/css; charset=utf-8", b"table"),
    ],
)
def test_serves_the_page_from_package_data(
    http: urllib3.PoolManager,
    produl_collector: LocalCollector,
    path: str,
    content_type: str,
    marker: bytes,
) -> None:
    response = http.request("GET", produl_collector.url + path)
    assert response.status == 200
    assert response.headers["Content-Type"] == content_type
    assert marker in response.data
    assert b"http://" not in response.data
    assert b"https://" not in response.data


def test_head_has_headers_and_no_body(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    response = http.request("HEAD", produl_collector.url + "/", preload_content=False)
    try:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) > 100
        assert response.read() == b""
    finally:
        response.release_conn()
    # The connection is still in step: the next request works.
    assert http.request("GET", produl_collector.url + "/healthz").status == 200


def test_unknown_paths_and_methods(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    assert http.request("GET", produl_collector.url + "/nope").status == 404
    response = http.request("PUT", produl_collector.url + "/api/collect", body=b"{}")
    assert response.status == 405
    response = http.request("PATCH", produl_collector.url + "/api/events", body=b"x" * 100)
    assert response.status == 405
    assert http.request("GET", produl_collector.url + "/healthz").status == 200
    assert len({r.client_port for r in produl_collector.requests}) == 1


def test_api_events_warn_about_fields_the_reference_marks_required(
    http: urllib3.PoolManager, produl_collector: LocalCollector
) -> None:
    # Stored as today, but flagged: Produl may drop events without u, p, vi or sk.
    complete = {"t": "pv", "p": "/a", "u": "https://server/a", "vi": "u1", "sk": "s1"}
    partial = {"t": "ev", "n": "signup"}
    for event in (complete, partial):
        response = http.request(
            "POST",
            produl_collector.url + "/api/collect",
            body=json.dumps(event).encode(),
            headers={KEY_HEADER: produl_collector.server_key},
        )
        assert response.status == 204
    listed = get_events(http, produl_collector)["events"]
    warnings = {item["event"].get("n", "pv"): item["warnings"] for item in listed}
    assert warnings == {"pv": [], "signup": ["missing u", "missing p", "missing vi", "missing sk"]}


def test_api_events_counts_the_flagged_events(
    http: urllib3.PoolManager, filled: LocalCollector
) -> None:
    # None of EVENTS has u and sk: all four are flagged; a complete one is not.
    assert get_events(http, filled)["flagged"] == 4
    complete = {"t": "pv", "p": "/a", "u": "https://server/a", "vi": "u1", "sk": "s1"}
    response = http.request(
        "POST",
        filled.url + "/api/collect",
        body=json.dumps(complete).encode(),
        headers={KEY_HEADER: filled.server_key},
    )
    assert response.status == 204
    listed = get_events(http, filled, "?limit=1")
    assert (listed["flagged"], listed["total"]) == (4, 5)


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"t": "ev", "n": "signup", "p": "/a", "u": "https://s/a", "vi": "u1"}, "sk"),
        ({"t": "pv", "p": "/a", "vi": "u1", "sk": "s"}, "u"),
        ({"t": "ev", "n": "signup", "u": "https://s/a", "vi": "u1", "sk": "s"}, "p"),
        ({"t": "ev", "n": "signup", "p": "/a", "u": "https://s/a", "sk": "s"}, "vi"),
    ],
)
def test_a_strict_collector_refuses_what_produl_may_drop(
    http: urllib3.PoolManager,
    event: dict,
    field: str,  # type: ignore[type-arg]
) -> None:
    with LocalCollector(strict=True) as strict:
        response = http.request(
            "POST",
            strict.url + "/api/collect",
            body=json.dumps(event).encode(),
            headers={KEY_HEADER: strict.server_key},
        )
        assert response.status == 400
        assert json.loads(response.data)["field"] == field
        assert strict.events == []
        complete = {**event, "p": "/a", "u": "https://s/a", "vi": "u1", "sk": "s"}
        response = http.request(
            "POST",
            strict.url + "/api/collect",
            body=json.dumps(complete).encode(),
            headers={KEY_HEADER: strict.server_key},
        )
        assert response.status == 204
