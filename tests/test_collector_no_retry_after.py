"""Produl never promises Retry-After on a 429 (issue #9, item 12d).

The collector can answer 429s without it; the client must still deliver
everything, backing off on its own with bounded waits. Real HTTP against a
LocalCollector on 127.0.0.1, with the collector's rate limit (not injected
faults) producing the 429s.
"""

from __future__ import annotations

import itertools
import json

import pytest
import urllib3

from produl_server import Produl
from produl_server._protocol import KEY_HEADER
from produl_server.testing import LocalCollector

LIMIT = 8
WINDOW = 1.0
EVENTS = 40
RETRY_MAX_DELAY = 0.4


def test_a_rate_limited_answer_has_no_retry_after() -> None:
    with LocalCollector(rate_limit=1, send_retry_after=False) as collector:
        pool = urllib3.PoolManager(retries=False, timeout=10.0)
        body = json.dumps({"t": "ev", "n": "x"}).encode()
        headers = {KEY_HEADER: collector.server_key}
        answers = [
            pool.request("POST", collector.url + "/api/collect", body=body, headers=headers)
            for _ in range(2)
        ]
        pool.clear()
    assert [a.status for a in answers] == [204, 429]
    assert "Retry-After" not in answers[1].headers
    assert json.loads(answers[1].data)["error"] == "rate_limited"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fixed", "sliding", "bucket"])
def test_the_client_delivers_everything_without_retry_after(mode: str) -> None:
    collector = LocalCollector(
        rate_limit=LIMIT,
        rate_limit_window=WINDOW,
        rate_limit_mode=mode,
        send_retry_after=False,
    )
    with collector:
        client = Produl(
            server_key=collector.server_key,
            api_url=collector.url,
            max_requests_per_minute=None,  # no pacing: meet the collector's limit
            retry_initial_delay=0.05,
            retry_max_delay=RETRY_MAX_DELAY,
            # Shorter than the 429 episode: 429s must not use up retry time.
            max_retry_time=0.5,
        )
        try:
            for n in range(EVENTS):
                client.track_event("burst", {"n": n}, visitor_id=f"u{n % 3}")
            assert client.flush(timeout=60.0)
            stats = client.stats
        finally:
            client.shutdown(timeout=5.0)
        posts = [r for r in collector.requests if r.method == "POST"]
        events = collector.events

    assert stats.sent == EVENTS
    assert stats.dropped_total == 0
    assert sorted(e["pr"]["n"] for e in events) == list(range(EVENTS))  # each once
    statuses = [r.status for r in posts]
    assert statuses.count(204) == EVENTS
    assert statuses.count(429) >= 1, "the limit was never met; the test proves nothing"
    assert stats.retried == statuses.count(429)
    # Bounded backoff: the client never paused far beyond retry_max_delay,
    # although no answer told it how long to wait. The slack absorbs a
    # loaded machine; an unbounded or missing backoff would blow it.
    gaps = [later.time - earlier.time for earlier, later in itertools.pairwise(posts)]
    assert max(gaps) < RETRY_MAX_DELAY + 3.0
    # The client kept the collector's pace rather than hammering it: about
    # LIMIT accepted per window, so the refusals stay within a small multiple.
    assert statuses.count(429) < EVENTS * 10
