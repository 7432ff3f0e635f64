"""``produl-server doctor``: can this machine reach the API? Name, TCP, TLS; nothing sent.

Every wait is bounded: resolving (in a daemon thread, since ``getaddrinfo``
has no timeout), connecting and the TLS handshake share one ``timeout``.
The certificates trusted are the SDK's: ``verify``, else
``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` or ``requests``' bundle.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from urllib3.util import parse_url

from ._config import Config, is_loopback, mask_url
from ._doctor_report import FAIL, OK, SKIP, WARN, Check, reason

__all__ = ["reach"]


def reach(config: Config, timeout: float, environ: Mapping[str, str]) -> Iterator[Check]:
    url = parse_url(config.api_url)
    scheme, host = url.scheme or "https", url.host or ""
    port = url.port or (443 if scheme == "https" else 80)
    shown = mask_url(config.api_url)
    proxy = config.proxy or _environ_proxy(config.api_url, scheme, host)
    if proxy is not None:
        proxy_url = parse_url(proxy)
        proxy_host = proxy_url.host or ""
        proxy_port = proxy_url.port or (443 if proxy_url.scheme == "https" else 80)
        yield _connect(
            f"the proxy {mask_url(proxy)}", proxy_host, proxy_port, None, timeout, environ
        )
        yield Check(
            SKIP,
            f"{shown} is reached through that proxy: its name and TLS are not checked "
            "from here (--send-test-event tries the whole way)",
        )
        return
    tls = config.verify if scheme == "https" else None
    yield _connect(shown, host, port, tls, timeout, environ)
    if scheme == "http" and not is_loopback(host):
        yield Check(
            FAIL,
            f"{shown} is plain http to another machine: the key would cross the "
            "network unencrypted",
            "use the https:// URL",
        )
    elif scheme == "https" and config.verify is False:
        yield Check(
            WARN,
            "TLS certificates are not checked (verify=False)",
            "pass verify=True, or the path of your CA bundle",
        )


def _environ_proxy(api_url: str, scheme: str, host: str) -> str | None:
    if is_loopback(host):
        return None  # the SDK never reaches this machine through a proxy
    import requests.utils  # noqa: PLC0415 -- what the SDK reads, as it reads it

    proxy: str | None = requests.utils.get_environ_proxies(api_url).get(scheme)
    return proxy or None


def _connect(
    what: str,
    host: str,
    port: int,
    verify: bool | str | None,
    timeout: float,
    environ: Mapping[str, str],
) -> Check:
    """Resolve, connect and (with *verify* not None) complete a TLS handshake."""
    deadline = time.monotonic() + timeout
    try:
        addresses = _resolve(host, port, timeout)
    except OSError as exc:
        return Check(
            FAIL,
            f"{what}: cannot resolve {host} ({reason(exc)})",
            "check the host name in the URL, and this machine's DNS",
        )
    shown = ", ".join(sorted({str(address[4][0]) for address in addresses})[:3])
    try:
        sock = _open(addresses, deadline)
    except OSError as exc:
        return Check(
            FAIL,
            f"{what}: {host} resolves to {shown}, but no connection to port {port} ({reason(exc)})",
            "check that the server runs and that a firewall lets this machine reach it",
        )
    with contextlib.closing(sock):
        if verify is None:
            return Check(OK, f"{what}: connected to {host}:{port} ({shown}), plain http")
        try:
            context = _tls_context(verify, environ)
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            with context.wrap_socket(sock, server_hostname=host) as tls:
                version = tls.version()
        except (OSError, ssl.SSLError) as exc:
            return Check(
                FAIL,
                f"{what}: connected to {host}:{port}, but the TLS handshake failed ({reason(exc)})",
                "check the certificate, or point REQUESTS_CA_BUNDLE at your CA bundle",
            )
    return Check(OK, f"{what}: {host} resolves ({shown}); TLS handshake done ({version})")


def _resolve(host: str, port: int, timeout: float) -> list[Any]:
    """``getaddrinfo`` within *timeout*: it has no timeout of its own."""
    found: list[Any] = []
    failed: list[OSError] = []

    def look_up() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            failed.append(exc)

    # A daemon thread: a resolver that hangs is left behind, never waited for.
    worker = threading.Thread(target=look_up, name="produl-server.doctor-dns", daemon=True)
    worker.start()
    worker.join(timeout)
    if failed:
        raise failed[0]
    if not found:
        raise TimeoutError(f"no answer within {timeout:g} s")
    return found


def _open(addresses: list[Any], deadline: float) -> socket.socket:
    last: OSError = TimeoutError("no time left")
    for family, kind, proto, _name, address in addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        sock.settimeout(left)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    raise last


def _tls_context(verify: bool | str, environ: Mapping[str, str]) -> ssl.SSLContext:
    """The certificates the SDK would trust (``verify`` as ``requests`` reads it)."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    import requests.utils  # noqa: PLC0415

    bundle = (
        verify
        if isinstance(verify, str)
        else environ.get("REQUESTS_CA_BUNDLE")
        or environ.get("CURL_CA_BUNDLE")
        or requests.utils.DEFAULT_CA_BUNDLE_PATH
    )
    # Like requests, a directory of hashed certificates works too.
    if os.path.isdir(bundle):
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle)
