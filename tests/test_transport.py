"""The transport's HTTP details: proxies, TLS settings, status classification."""

from __future__ import annotations

import base64

import attrs
import pytest

from produl_server._config import Config
from produl_server._transport import Transport, Verdict, _tls_options, classify


def test_plain_http_through_a_proxy_uses_absolute_form_and_proxy_credentials(
    produl_collector, make_client
):
    # The collector plays the proxy: it receives the absolute-form request a
    # forward proxy would, and records it. Nothing leaves this machine.
    proxy = produl_collector.url.replace("http://", "http://user:s3cret@")
    produl = make_client(api_url="http://analytics.internal.example:8080", proxy=proxy)
    produl.track_event("via_proxy", visitor_id="v")
    assert produl.flush(timeout=10)
    (request,) = produl_collector.requests
    assert request.path == "http://analytics.internal.example:8080/api/collect"
    expected = "Basic " + base64.b64encode(b"user:s3cret").decode()
    assert request.headers["Proxy-Authorization"] == expected
    assert produl_collector.events[0]["n"] == "via_proxy"


def test_environment_proxies_apply_to_remote_hosts_but_never_to_loopback(
    produl_collector, make_client, monkeypatch
):
    monkeypatch.setenv("HTTP_PROXY", produl_collector.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    remote = make_client(api_url="http://collector.example.net")
    remote.track_event("remote", visitor_id="v")
    assert remote.flush(timeout=10)
    local = make_client()
    local.track_event("local", visitor_id="v")
    assert local.flush(timeout=10)
    paths = [r.path for r in produl_collector.requests]
    assert paths == ["http://collector.example.net/api/collect", "/api/collect"]


@pytest.mark.parametrize(
    ("verify", "cert_reqs", "ca_certs"),
    [(False, "CERT_NONE", None), ("/etc/ssl/my-ca.pem", "CERT_REQUIRED", "/etc/ssl/my-ca.pem")],
)
def test_tls_settings_reach_both_routes(verify, cert_reqs, ca_certs):
    config = Config.from_env("sk_test_key_1234", "https://collector.example.net", verify=verify)
    options = _tls_options(config, "https")
    assert (options["cert_reqs"], options.get("ca_certs")) == (cert_reqs, ca_certs)
    # Through a proxy, urllib3's pool gets the same settings.
    proxied = Transport(attrs.evolve(config, proxy="http://127.0.0.1:9"))
    pool = proxied._pool
    assert (pool.cert_reqs, pool.ca_certs) == (cert_reqs, ca_certs)
    proxied.close()


def test_default_tls_trust_is_the_bundle_requests_uses(monkeypatch):
    import requests.utils

    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    config = Config.from_env("sk_test_key_1234", "https://c.example.net")
    assert _tls_options(config, "https")["ca_certs"] == requests.utils.DEFAULT_CA_BUNDLE_PATH
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/corp/ca.pem")
    assert _tls_options(config, "https")["ca_certs"] == "/corp/ca.pem"
    assert _tls_options(config, "http") == {}


@pytest.mark.parametrize(
    ("status", "header", "verdict", "reason", "retry_after"),
    [
        (204, None, Verdict.DELIVERED, "", None),
        (202, None, Verdict.DELIVERED, "", None),
        (429, "7", Verdict.RETRY, "rate_limited", 7.0),
        (429, "0.5", Verdict.RETRY, "rate_limited", 0.5),
        (429, "Wed, 21 Oct 2026 07:28:00 GMT", Verdict.RETRY, "rate_limited", None),
        (429, "99999", Verdict.RETRY, "rate_limited", 3600.0),
        (429, "nan", Verdict.RETRY, "rate_limited", None),
        (408, None, Verdict.RETRY, "server_error", None),
        (502, None, Verdict.RETRY, "server_error", None),
        (400, None, Verdict.DROP, "rejected", None),
        (301, None, Verdict.DROP, "rejected", None),
        (401, None, Verdict.DROP, "unauthorized", None),
        (403, None, Verdict.DROP, "unauthorized", None),
    ],
)
def test_classify(status, header, verdict, reason, retry_after):
    outcome = classify(status, b"", header)
    assert (outcome.verdict, outcome.reason, outcome.retry_after) == (verdict, reason, retry_after)


def test_error_bodies_are_summarised_for_the_log():
    body = b'{"error": "field_length", "message": "n is too long.", "field": "n"}'
    assert classify(400, body, None).detail == "HTTP 400: n is too long. (field: n)"
    assert classify(400, b"<html>nope</html>", None).detail == "HTTP 400: <html>nope</html>"
    assert classify(400, b"", None).detail == "HTTP 400: no body"


def test_proxy_credentials_are_percent_decoded(produl_collector, make_client):
    proxy = produl_collector.url.replace("http://", "http://ops:p%40ss%20w@")
    produl = make_client(api_url="http://analytics.internal.example", proxy=proxy)
    produl.track_event("e", visitor_id="v")
    assert produl.flush(timeout=10)
    expected = "Basic " + base64.b64encode(b"ops:p@ss w").decode()
    assert produl_collector.requests[0].headers["Proxy-Authorization"] == expected


def test_a_ca_directory_is_passed_as_one(tmp_path, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path))
    options = _tls_options(Config.from_env("sk_test_key_1234", "https://c.example.net"), "https")
    assert options["ca_cert_dir"] == str(tmp_path)
    assert "ca_certs" not in options
