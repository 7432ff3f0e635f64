"""``visitor_id_secret``: pseudonymous visitor ids and session keys."""

from __future__ import annotations

import hashlib
import hmac
import uuid

import pytest

from produl_server import ConfigurationError, InvalidEventError, Produl
from produl_server._config import Config

SECRET = "a-long-random-secret-0123456789"


def expected(value: str, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), value.encode(), hashlib.sha256).hexdigest()


def test_ids_arrive_as_stable_keyed_hashes(produl_collector, make_client):
    seen = []
    produl = make_client(
        visitor_id_secret=SECRET, before_send=lambda event: seen.append(event) or event
    )
    produl.track_pageview(path="/", visitor_id=42, session_key="s-1")
    produl.track_event("e", visitor_id="42", session_key="s-1")
    produl.track_event("anonymous")
    other = make_client(visitor_id_secret=b"another-secret-of-enough-bytes")
    other.track_event("e", visitor_id="42")
    assert produl.flush(timeout=10)
    assert other.flush(timeout=10)
    first, second, anonymous = produl_collector.events[:3]
    assert first["vi"] == second["vi"] == expected("42")  # int and str: one visitor
    assert first["sk"] == second["sk"] == expected("s-1")
    assert "vi" not in anonymous
    assert "sk" not in anonymous
    assert produl_collector.events[3]["vi"] not in (expected("42"), "42")
    assert len(first["vi"]) == 64
    assert seen[0]["vi"] == expected("42")  # before_send sees the pseudonym only


def test_ids_are_validated_before_they_are_hashed(make_client):
    produl = make_client(visitor_id_secret=SECRET)
    with pytest.raises(InvalidEventError, match="visitor_id"):
        produl.track_event("e", visitor_id="x" * 300)
    with pytest.raises(InvalidEventError, match="session_key"):
        produl.track_pageview(path="/", visitor_id="v", session_key=1.5)  # type: ignore[arg-type]
    produl.track_pageview(path="/", visitor_id=uuid.UUID(int=7))


def test_the_secret_is_checked_and_never_shown():
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        Produl("sk_test_1234", visitor_id_secret="short", enabled=False)
    with pytest.raises(ConfigurationError, match="str or bytes"):
        Produl("sk_test_1234", visitor_id_secret=12345, enabled=False)  # type: ignore[arg-type]
    config = Config.from_env("sk_test_1234", None, {"PRODUL_VISITOR_SECRET": SECRET})
    assert config.visitor_id_secret == SECRET.encode()
    assert SECRET not in repr(config)
    assert "visitor_id_secret='***'" in repr(config)
