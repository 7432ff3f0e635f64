"""``produl-server doctor``, run for real: ``python -m produl_server doctor`` in a subprocess.

Against the local collector (plain http and TLS), a wrong key, a dead URL,
a spool with a backlog, and a Redis that answers or does not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_port
from test_tls import _certs, _tls_collector  # noqa: F401 -- the TLS collector's fixtures

from produl_server._config import key_fingerprint
from produl_server._spool import Spool
from produl_server.testing import LocalCollector

pytestmark = pytest.mark.slow

TIMEOUT = 60.0
WRONG_KEY = "sk_wrong_0123456789abcdef"


def doctor(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the doctor with only the variables given (plus what Python needs)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PRODUL_")}
    clean = {
        k: v
        for k, v in clean.items()
        if k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE") and not k.lower().endswith("_proxy")
    }
    clean.update(env)
    clean["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run(
        [sys.executable, "-m", "produl_server", "doctor", *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def line(result: subprocess.CompletedProcess[str], text: str) -> str:
    found = [row for row in result.stdout.splitlines() if text in row]
    assert found, f"{text!r} not in:\n{result.stdout}\n{result.stderr}"
    return found[0]


def test_all_holds_against_the_local_collector_and_the_test_event_arrives():
    # A strict collector: the test event carries every field the reference marks required.
    with LocalCollector(strict=True) as collector:
        result = doctor(
            "--api-url",
            collector.url,
            "--send-test-event",
            PRODUL_SERVER_KEY=collector.server_key,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert line(result, "server key:").endswith("from PRODUL_SERVER_KEY")
        assert line(result, "api_url:").endswith("from --api-url")
        assert line(result, "looks like a server key").startswith("✓")
        assert line(result, "plain http").startswith("✓")
        assert line(result, "was accepted by").startswith("✓")
        assert result.stdout.splitlines()[-1] == "all checks hold, 0 warning(s)"
        event = collector.assert_event("produl_doctor_test", timeout=5)
        assert {"u", "p", "vi", "sk"} <= set(event)
        assert collector.server_key not in result.stdout + result.stderr


def test_without_the_flag_nothing_is_sent_so_a_wrong_key_is_not_found():
    with LocalCollector() as collector:
        result = doctor("--api-url", collector.url, "--server-key", WRONG_KEY)
        assert result.returncode == 0, result.stdout + result.stderr
        assert line(result, "the key was not tried").startswith("-")
        assert collector.requests == []


def test_a_wrong_key_is_refused_with_the_test_event():
    with LocalCollector() as collector:
        result = doctor(
            "--api-url", collector.url, "--send-test-event", PRODUL_SERVER_KEY=WRONG_KEY
        )
        assert result.returncode == 1
        refused = line(result, "refused the key")
        assert refused.startswith("✗")
        assert "sk_…cdef" in refused
        assert "remedy: create a new server key" in result.stdout
        assert result.stdout.splitlines()[-1].startswith("1 check(s) failed")
        assert WRONG_KEY not in result.stdout + result.stderr
        assert collector.events == []


def test_a_dead_url_fails_within_the_timeout():
    dead = f"http://127.0.0.1:{free_port()}"
    result = doctor(
        "--api-url", dead, "--timeout", "2", "--send-test-event", PRODUL_SERVER_KEY=WRONG_KEY
    )
    assert result.returncode == 1
    assert line(result, "no connection to port").startswith("✗")
    assert line(result, "not delivered").startswith("✗")
    assert "remedy: check that the server runs" in result.stdout


def test_an_unknown_host_is_named():
    result = doctor(
        "--api-url", "https://nowhere.invalid", "--timeout", "3", PRODUL_SERVER_KEY=WRONG_KEY
    )
    assert result.returncode == 1
    assert line(result, "cannot resolve nowhere.invalid").startswith("✗")


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({}, (), "the configuration is invalid: no server key"),
        ({"PRODUL_SERVER_KEY": "site_12345"}, (), "does not look like a server key"),
        ({"PRODUL_SERVER_KEY": "sk_local_" + "a" * 32}, (), "one a local collector made"),
        (
            {"PRODUL_SERVER_KEY": WRONG_KEY, "PRODUL_ENABLED": "0"},
            ("--api-url", "http://127.0.0.1:9"),
            "turns the client off",
        ),
    ],
)
def test_configuration_problems_fail(env, args, expected):
    result = doctor("--timeout", "2", *args, **env)
    assert result.returncode == 1
    assert line(result, expected).startswith("✗")


def test_tls_is_checked_with_the_bundle_the_sdk_trusts(certs, tls_collector):
    url = f"https://127.0.0.1:{tls_collector.port}"
    key = tls_collector.server_key
    trusted = doctor(
        "--api-url",
        url,
        "--send-test-event",
        PRODUL_SERVER_KEY=key,
        REQUESTS_CA_BUNDLE=str(certs / "ca.pem"),
    )
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert line(trusted, "TLS handshake done").startswith("✓")
    assert line(trusted, "was accepted by").startswith("✓")
    untrusted = doctor("--api-url", url, "--timeout", "3", PRODUL_SERVER_KEY=key)
    assert untrusted.returncode == 1
    assert line(untrusted, "the TLS handshake failed").startswith("✗")
    assert "REQUESTS_CA_BUNDLE" in untrusted.stdout


def test_the_spool_backlog_is_reported_without_sending_it(tmp_path: Path):
    url = f"http://127.0.0.1:{free_port()}"
    spool = Spool(tmp_path, url, key_fingerprint(WRONG_KEY))
    spool.add([(b'{"t":"ev","n":"kept"}', None), (b'{"t":"ev","n":"kept"}', None)])
    spool.close()
    result = doctor("--api-url", url, "--spool", str(tmp_path), PRODUL_SERVER_KEY=WRONG_KEY)
    backlog = line(result, "is usable: 2 event(s) of this key waiting")
    assert backlog.startswith("!")
    assert f"produl-server drain --spool {tmp_path}" in result.stdout
    again = Spool(tmp_path, url, key_fingerprint(WRONG_KEY))
    assert again.count() == 2  # the doctor sent and removed nothing
    again.close()


def test_redis_answers_and_the_fleet_quota_is_shown(redis_server):
    with LocalCollector() as collector:
        result = doctor(
            "--api-url", collector.url, "--redis", redis_server.url, PRODUL_SERVER_KEY=WRONG_KEY
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert line(result, "Redis at redis://127.0.0.1").startswith("✓")
    assert line(result, "the fleet's quota: 0 of 2000").startswith("✓")


def test_a_redis_that_does_not_answer_fails():
    dead = f"redis://127.0.0.1:{free_port()}/0"
    pytest.importorskip("redis")
    result = doctor("--api-url", "http://127.0.0.1:9", "--redis", dead, PRODUL_SERVER_KEY=WRONG_KEY)
    assert result.returncode == 1
    assert line(result, "does not answer").startswith("✗")


def test_known_hosts_that_skip_exit_hooks_get_a_warning():
    with LocalCollector() as collector:
        result = doctor(
            "--api-url",
            collector.url,
            PRODUL_SERVER_KEY=WRONG_KEY,
            AWS_LAMBDA_FUNCTION_NAME="checkout",
        )
    assert result.returncode == 0  # a warning, not a failure
    assert line(result, "AWS Lambda freezes the process").startswith("!")
    assert "flush_after" in result.stdout


def test_uwsgi_without_threads_gets_a_warning(tmp_path: Path):
    # uWSGI >= 2.0.31 always has threads; the old default is simulated with
    # the one attribute the detection reads, on the doctor's import path.
    (tmp_path / "uwsgi.py").write_text("has_threads = 0\nopt = {}\n")
    with LocalCollector() as collector:
        result = doctor(
            "--api-url", collector.url, PRODUL_SERVER_KEY=WRONG_KEY, PYTHONPATH=str(tmp_path)
        )
    assert result.returncode == 0
    assert line(result, "uWSGI runs without Python threads").startswith("!")
    assert "--enable-threads" in result.stdout
