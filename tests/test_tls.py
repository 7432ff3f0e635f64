"""HTTPS for real: a collector on 127.0.0.1 behind TLS, with a certificate made for the test.

A local collector of the test's own listens with TLS, with a certificate
signed by a throwaway CA (``openssl``), so events travel the whole way:
client, TLS, collector, store. Nothing leaves this machine.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import warnings
from pathlib import Path

import pytest
import urllib3
from support import require_tool

from produl_server import DeliveryError, Produl
from produl_server.testing import LocalCollector

CA_EXTENSIONS = """\
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""
LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(name="certs", scope="module")
def _certs(tmp_path_factory) -> Path:
    """A CA (ca.pem) and a server certificate for 127.0.0.1 it signed (leaf.pem, leaf.key)."""
    require_tool(shutil.which("openssl") is not None, "openssl")
    where = tmp_path_factory.mktemp("tls")
    (where / "ca.ext").write_text(CA_EXTENSIONS)
    (where / "leaf.ext").write_text(LEAF_EXTENSIONS)
    for name, subject in (("ca", "/CN=Test CA"), ("leaf", "/CN=127.0.0.1")):
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=where,
        )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "ca.csr", "-signkey", "ca.key", "-out", "ca.pem",
        "-days", "2", "-extfile", "ca.ext", cwd=where,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext", cwd=where,
    )  # fmt: skip
    return where


@pytest.fixture(name="tls_collector")
def _tls_collector(certs):
    """A local collector of its own that speaks only TLS, with the test CA's certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "leaf.pem", certs / "leaf.key")
    with LocalCollector() as collector:
        # The listening socket becomes a TLS one: each accepted connection
        # shakes hands before the collector reads a byte (a failed handshake
        # is dropped by socketserver, like any failed accept).
        httpd = collector._server._httpd
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        yield collector


@pytest.fixture(name="client")
def _client(tls_collector):
    made: list[Produl] = []

    def make(host: str = "127.0.0.1", **options) -> Produl:
        options.setdefault("retry_initial_delay", 0.02)
        options.setdefault("retry_max_delay", 0.1)
        produl = Produl(
            server_key=tls_collector.server_key,
            api_url=f"https://{host}:{tls_collector.port}",
            max_requests_per_minute=None,
            **options,
        )
        made.append(produl)
        return produl

    yield make
    for produl in made:
        produl.shutdown(timeout=5)


def test_events_arrive_over_verified_tls_on_one_kept_connection(client, certs, tls_collector):
    produl = client(verify=str(certs / "ca.pem"))
    for number in range(3):
        produl.track_event("over_tls", {"n": number}, visitor_id="v")
    assert produl.flush(timeout=15)
    assert [event["pr"]["n"] for event in tls_collector.events] == [0, 1, 2]
    assert len({request.client_port for request in tls_collector.requests}) == 1


def test_the_ca_bundle_variable_is_the_default_trust(client, certs, tls_collector, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs / "ca.pem"))
    produl = client()
    produl.track_event("trusted_by_env", visitor_id="v")
    assert produl.flush(timeout=15)
    assert tls_collector.events[0]["n"] == "trusted_by_env"


def failing_client(client, **options):
    reported: list[DeliveryError] = []
    produl = client(
        max_retry_time=0.3, on_error=lambda error, event: reported.append(error), **options
    )
    produl.track_event("refused", visitor_id="v")
    assert produl.flush(timeout=15) is False  # done, but events were dropped
    assert produl.stats.pending == 0
    return produl, reported


def test_an_untrusted_certificate_is_refused(client, tls_collector, monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    produl, reported = failing_client(client)  # certifi's bundle does not know our CA
    assert produl.stats.dropped["retries_exhausted"] == 1
    assert "CERTIFICATE_VERIFY_FAILED" in str(reported[0])
    assert tls_collector.events == []
    assert tls_collector.requests == []  # no handshake ever completed


def test_a_certificate_for_another_name_is_refused(client, certs, tls_collector):
    # localhost is this machine too, but not a name the certificate carries.
    produl, reported = failing_client(client, host="localhost", verify=str(certs / "ca.pem"))
    assert produl.stats.dropped["retries_exhausted"] == 1
    assert "CERTIFICATE_VERIFY_FAILED" in str(reported[0])
    assert tls_collector.events == []


def test_a_missing_ca_bundle_is_a_failed_attempt_not_a_crash(client, tmp_path):
    produl, reported = failing_client(client, verify=str(tmp_path / "missing.pem"))
    assert produl.stats.dropped["retries_exhausted"] == 1
    assert "FileNotFoundError" in str(reported[0])


def test_verify_false_delivers_and_warns(client, tls_collector):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        produl = client(verify=False)
        produl.track_event("unverified", visitor_id="v")
        assert produl.flush(timeout=15)
    assert tls_collector.events[0]["n"] == "unverified"
    insecure = [
        w for w in caught if issubclass(w.category, urllib3.exceptions.InsecureRequestWarning)
    ]
    assert insecure
    assert "Unverified HTTPS request" in str(insecure[0].message)
