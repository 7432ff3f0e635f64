"""After a 429 (the quota used by someone else), the pace recovers without a retry storm."""

from __future__ import annotations

import pytest
import urllib3

from produl_server import Produl
from produl_server._protocol import KEY_HEADER
from produl_server.testing import LocalCollector


@pytest.mark.parametrize("retry_after", [True, False])
def test_a_quota_used_by_another_client_costs_a_few_429s_not_a_storm(retry_after):
    with LocalCollector(
        rate_limit=10,
        rate_limit_mode="fixed",
        rate_limit_window=3.0,
        send_retry_after=retry_after,
    ) as collector:
        # Someone else on this address uses the whole window first.
        with urllib3.PoolManager(retries=False) as http:
            for _ in range(10):
                answer = http.request(
                    "POST",
                    collector.url + "/api/collect",
                    body=b'{"t":"ev","n":"other"}',
                    headers={KEY_HEADER: collector.server_key},
                )
                assert answer.status == 204
        produl = Produl(
            server_key=collector.server_key,
            api_url=collector.url,
            max_requests_per_minute=None,
            retry_initial_delay=0.5,
            retry_max_delay=2.0,
        )
        try:
            for i in range(5):
                produl.track_event("mine", {"i": i}, visitor_id="v")
            assert produl.flush(timeout=60)
        finally:
            produl.shutdown(timeout=2)
        mine = [e["pr"]["i"] for e in collector.events if e["n"] == "mine"]
        assert mine == list(range(5))
        refused = [r.status for r in collector.requests].count(429)
        # A storm, every request retried at once, would be thousands in the
        # 3 s window at loopback; the whole pipe pauses on each 429 instead
        # (Retry-After, or a backoff with full jitter that doubles): a few.
        assert 1 <= refused <= 20
        assert produl.stats.dropped == {}
