"""The server key never appears in logs, reprs or exception messages."""

from __future__ import annotations

import logging
import socket

import pytest

from produl_server import ConfigurationError, Produl

KEY = "sk_live_SECRETSECRET_4321"


def test_the_key_is_in_no_log_line_repr_or_exception(produl_collector, make_client, caplog):
    seen: list[str] = []
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]

    def hook(error, event):
        seen.extend([str(error), repr(error), repr(event)])

    with caplog.at_level(logging.DEBUG):  # every logger, DEBUG included
        # A wrong key (401), a server error, a refused event, a dead server.
        wrong = make_client(server_key=KEY, on_error=hook)
        wrong.track_event("e", visitor_id="v")
        assert wrong.flush(timeout=10) is False  # done, but events were dropped
        assert wrong.stats.pending == 0
        good = make_client(on_error=hook)
        produl_collector.fail_next(1, status=500)
        good.track_event("e", visitor_id="v")
        produl_collector.fail_next(1, status=400)
        good.track_event("e", visitor_id="v")
        assert good.flush(timeout=10) is False  # the refused one was dropped
        assert good.stats.pending == 0
        dead = make_client(
            server_key=KEY,
            api_url=f"http://127.0.0.1:{dead_port}",
            max_retry_time=0.1,
            on_error=hook,
        )
        dead.track_event("e", visitor_id="v")
        assert dead.flush(timeout=10) is False  # given up
        assert dead.stats.pending == 0
        http = Produl(server_key=KEY, api_url="http://analytics.example.com", enabled=False)
        for bad in ({"api_url": "ftp://x"}, {"flush_at": 0}, {"server_key": KEY + " x"}):
            options = {"server_key": KEY, **bad}
            with pytest.raises(ConfigurationError) as info:
                Produl(**options)
            seen.extend([str(info.value), repr(info.value)])
        wrong.shutdown()
        dead.shutdown()

    seen += [repr(wrong), repr(dead), repr(http), repr(wrong.config), str(wrong.stats)]
    seen += [repr(wrong._worker._transport), repr(dead.config)]
    text = caplog.text + "\n".join(seen)
    assert "401" in text  # the scenario really ran into the refusal
    assert "sk_…4321" in text  # masked form is what users see
    assert KEY not in text
    assert "SECRETSECRET" not in text
    for record in caplog.records:
        assert KEY not in str(record.args)
