"""``produl-server doctor``: is this machine ready to deliver events?

Each check prints one line, marked ``✓`` (holds), ``✗`` (fails, with a
remedy under it), ``!`` (a warning, with a remedy; the exit status ignores
it) or ``-`` (not checked, and why). The exit status is 0 when no check
fails, 1 otherwise.

Nothing is sent to the API unless ``--send-test-event`` is given: Produl's
API has no request that checks a key without collecting an event, so
without it the key's shape is checked, never whether the API accepts it.

Every wait is bounded: name resolution, the TCP connection and the TLS
handshake share one ``timeout`` per address; Redis calls keep their own 2 s
deadline; the test event is tried for at most ``timeout`` seconds.

What it opens, all through the modules a client uses, never the sender's
internals: :meth:`Config.from_env <produl_server.Config.from_env>`;
an existing spool file through :class:`~produl_server._spool.Spool`
(``census``, ``pending_count``, ``close``; a missing one is not created);
the host's quota file through :class:`~produl_server._hostquota.HostQuota`
(``wait``, which counts without taking, ``shared``, ``path``, ``close``;
it creates the file as any client would); Redis through
:class:`~produl_server._redis.RedisLink` (``call``) with
:func:`~produl_server._redis.quota_key` and
:func:`~produl_server._redis.spool_key`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
from urllib3.util import parse_url

from ._config import (
    ENABLED_ENV,
    KEY_ENV,
    QUOTA_DIR_ENV,
    REDIS_ENV,
    SPOOL_ENV,
    URL_ENV,
    Config,
    is_loopback,
    key_fingerprint,
    mask_key,
    mask_url,
)
from .exceptions import ConfigurationError, DeliveryError

__all__ = ["Check", "DoctorOptions", "run_doctor", "run_from_args"]

#: The name of the custom event ``--send-test-event`` sends.
TEST_EVENT = "produl_doctor_test"

OK, FAIL, WARN, SKIP = "ok", "fail", "warn", "skip"
_MARKS = {OK: "✓", FAIL: "✗", WARN: "!", SKIP: "-"}
_ASCII_MARKS = {OK: "+", FAIL: "x", WARN: "!", SKIP: "-"}


@attrs.frozen
class Check:
    """One line of the report.

    Attributes:
        status: ``"ok"``, ``"fail"``, ``"warn"`` or ``"skip"``.
        text: What was found.
        remedy: What to do about it (for ``fail`` and ``warn``).
        details: Further lines shown under it.
    """

    status: str
    text: str
    remedy: str | None = None
    details: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class DoctorOptions:
    """What ``produl-server doctor`` was given; ``None`` reads the environment.

    Attributes:
        server_key: ``--server-key``.
        api_url: ``--api-url``.
        spool_dir: ``--spool``.
        quota_dir: ``--quota-dir``.
        redis_url: ``--redis``.
        timeout: Seconds for each network check, and for the test event.
        send_test_event: Send one event to check that the API takes the key.
    """

    server_key: str | None = None
    api_url: str | None = None
    spool_dir: str | None = None
    quota_dir: str | None = None
    redis_url: str | None = None
    timeout: float = 5.0
    send_test_event: bool = False


def run_doctor(
    options: DoctorOptions,
    out: Callable[[str], None],
    environ: Mapping[str, str] = os.environ,
) -> int:
    """Run every check, print the report through *out*, and return the exit status.

    Args:
        options: The command's arguments.
        out: Prints one line.
        environ: Where the ``PRODUL_*`` variables are read.

    Returns:
        0 when no check fails, else 1.
    """
    checks = list(_all_checks(options, environ))
    marks = _marks()
    for check in checks:
        out(f"{marks[check.status]} {check.text}")
        for line in check.details:
            out(f"    {line}")
        if check.remedy is not None:
            out(f"    remedy: {check.remedy}")
    failed = sum(check.status == FAIL for check in checks)
    warned = sum(check.status == WARN for check in checks)
    if failed:
        out(f"{failed} check(s) failed, {warned} warning(s)")
        return 1
    out(f"all checks hold, {warned} warning(s)")
    return 0


def run_from_args(args: Any, out: Callable[[str], None]) -> int:
    """Run the doctor with the parsed ``produl-server doctor`` arguments.

    Args:
        args: The ``argparse`` namespace.
        out: Prints one line.

    Returns:
        The exit status.
    """
    options = DoctorOptions(
        server_key=args.server_key,
        api_url=args.api_url,
        spool_dir=args.spool,
        quota_dir=args.quota_dir,
        redis_url=args.redis,
        timeout=args.timeout,
        send_test_event=args.send_test_event,
    )
    return run_doctor(options, out)


def _marks() -> dict[str, str]:
    """✓ and ✗, or ASCII stand-ins when the terminal cannot show them."""
    import sys  # noqa: PLC0415 -- read when printing, so a test's redirect counts

    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "".join(_MARKS.values()).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return _ASCII_MARKS
    return _MARKS


def _all_checks(options: DoctorOptions, environ: Mapping[str, str]) -> Iterator[Check]:
    config_check, config = _configuration(options, environ)
    yield config_check
    if config is None:
        return
    yield _key(config)
    yield from _reach(config, options.timeout, environ)
    yield _quota(config)
    yield _spool(config)
    yield from _redis(config)
    yield from _exit(config, environ)
    yield _test_event(config, options)


# -- where the configuration comes from ----------------------------------------

_SOURCES = (
    ("server key", "server_key", "--server-key", KEY_ENV),
    ("api_url", "api_url", "--api-url", URL_ENV),
    ("spool_dir", "spool_dir", "--spool", SPOOL_ENV),
    ("quota_dir", "quota_dir", "--quota-dir", QUOTA_DIR_ENV),
    ("redis_url", "redis_url", "--redis", REDIS_ENV),
)


def _configuration(
    options: DoctorOptions, environ: Mapping[str, str]
) -> tuple[Check, Config | None]:
    details = []
    for label, field, flag, variable in _SOURCES:
        if getattr(options, field) is not None:
            source = f"from {flag}"
        elif environ.get(variable):
            source = f"from {variable}"
        else:
            source = "not set" if field != "api_url" else "default"
        details.append(f"{label + ':':12} {source}")
    enabled = environ.get(ENABLED_ENV)
    details.append(f"{'enabled:':12} " + (f"from {ENABLED_ENV}" if enabled else "default"))
    try:
        config = Config.from_env(
            options.server_key,
            options.api_url,
            environ,
            spool_dir=options.spool_dir,
            quota_dir=options.quota_dir,
            redis_url=options.redis_url,
        )
    except ConfigurationError as exc:
        remedy = "fix the value named above (arguments win over the environment)"
        return Check(FAIL, f"the configuration is invalid: {exc}", remedy, tuple(details)), None
    return Check(OK, "the configuration is valid", None, tuple(details)), config


# -- the key ----------------------------------------------------------------------

#: Characters after ``sk_`` below which a value is no key the dashboard made.
_MIN_KEY_BODY = 8


def _key(config: Config) -> Check:
    key = config.server_key
    if not key:
        return Check(
            FAIL,
            "no server key",
            f"set {KEY_ENV} (Settings → Server keys in the Produl dashboard)",
        )
    shown = mask_key(key)
    if not key.startswith("sk_") or len(key) < 3 + _MIN_KEY_BODY:
        return Check(
            FAIL,
            f"the server key {shown} does not look like a server key (sk_ and at least "
            f"{_MIN_KEY_BODY} more characters)",
            "copy the secret of a server key, not the site id or the key's label",
        )
    host = parse_url(config.api_url).host or ""
    if key.startswith("sk_local_") and not is_loopback(host):
        return Check(
            FAIL,
            f"the server key {shown} is one a local collector made, for a remote api_url",
            f"set {KEY_ENV} to a key from the Produl dashboard",
        )
    return Check(OK, f"the server key {shown} looks like a server key")


# -- the API's address --------------------------------------------------------------


def _reach(config: Config, timeout: float, environ: Mapping[str, str]) -> Iterator[Check]:
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
            f"{what}: cannot resolve {host} ({_reason(exc)})",
            "check the host name in the URL, and this machine's DNS",
        )
    shown = ", ".join(sorted({str(address[4][0]) for address in addresses})[:3])
    try:
        sock = _open(addresses, deadline)
    except OSError as exc:
        return Check(
            FAIL,
            f"{what}: {host} resolves to {shown}, but no connection to port {port} "
            f"({_reason(exc)})",
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
                f"{what}: connected to {host}:{port}, but the TLS handshake failed "
                f"({_reason(exc)})",
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


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:200]


# -- the host's quota -----------------------------------------------------------------


@contextlib.contextmanager
def _warnings() -> Iterator[list[str]]:
    """Collect what the library logs at WARNING and above while a check runs."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage().removeprefix("produl_server: "))

    handler = Keep(logging.WARNING)
    logger = logging.getLogger("produl_server")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def _quota(config: Config) -> Check:
    from ._hostquota import HostQuota  # noqa: PLC0415

    limit = config.max_requests_per_minute
    if limit is None or not config.shared_quota:
        return Check(SKIP, "the quota is per process (no shared quota configured)")
    host = parse_url(config.api_url).host or ""
    if config.quota_dir is None and is_loopback(host):
        return Check(
            SKIP,
            "api_url is on this machine: each process paces alone "
            f"({QUOTA_DIR_ENV} shares a quota anyway)",
        )
    with _warnings() as seen:
        quota = HostQuota(limit, config.api_url, config.quota_dir)
        try:
            quota.wait(time.time())
            shared, path, used = quota.shared, quota.path, quota.used
        finally:
            quota.close()
    if shared and path is not None:
        return Check(
            OK,
            f"the quota directory {os.path.dirname(path)} is usable and shared by this "
            f"user's processes: {used} of {limit} requests used in the last minute",
        )
    why = seen[0] if seen else "the quota file could not be used"
    return Check(
        FAIL,
        f"the host's quota cannot be shared: {why}",
        f"set {QUOTA_DIR_ENV} to a directory of your own (mode 0700); containers behind "
        "one address need one on a volume they share",
    )


# -- the spool ---------------------------------------------------------------------------


def _spool(config: Config) -> Check:
    from ._spool import FILENAME, Spool, SpoolError  # noqa: PLC0415

    directory = config.spool_dir
    if directory is None:
        return Check(
            SKIP,
            "no spool: what cannot be sent in time is dropped "
            f"(set {SPOOL_ENV} to keep it for the next run)",
        )
    if not os.path.exists(os.path.join(directory, FILENAME)):
        parent = directory
        while not os.path.exists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
        if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
            made = "exists" if parent == directory else "will be created"
            return Check(OK, f"the spool directory {directory} {made}; no event is spooled yet")
        return Check(
            FAIL,
            f"the spool directory {directory} cannot be created or written",
            f"point {SPOOL_ENV} at a directory this user can write",
        )
    try:
        with _warnings():
            spool = Spool(directory, config.api_url, key_fingerprint(config.server_key))
        try:
            census = spool.census()
            ready = spool.pending_count()
        finally:
            spool.close()
    except SpoolError as exc:
        return Check(FAIL, f"the spool cannot be used: {exc}", "see the message; fix or move it")
    text = (
        f"the spool {directory} is usable: {census.mine} event(s) of this key waiting "
        f"({ready} ready to send now), {census.others} of other URLs or keys, "
        f"{census.unowned} unowned, {census.quarantined} in quarantine"
    )
    if census.quarantined:
        return Check(
            WARN,
            text,
            "events in quarantine cannot be sent: look at the spool's quarantine table",
        )
    if census.mine:
        return Check(
            WARN,
            text,
            f"the next client delivers them, or now: produl-server drain --spool {directory}",
        )
    return Check(OK, text)


# -- Redis ------------------------------------------------------------------------------


def _redis(config: Config) -> Iterator[Check]:
    if config.redis_url is None:
        yield Check(SKIP, f"no redis_url: no fleet quota to check ({REDIS_ENV})")
        return
    from ._redis import RedisDownError, RedisLink, quota_key, spool_key  # noqa: PLC0415
    from ._schedule import QUOTA_WINDOW  # noqa: PLC0415

    where = f"Redis at {mask_url(config.redis_url)}"
    try:
        link = RedisLink(config.redis_url)
    except ConfigurationError as exc:
        yield Check(FAIL, f"{where} cannot be used: {exc}", "see the message")
        return
    window = quota_key(config.api_url, config.quota_key)
    stream = spool_key(config.api_url, key_fingerprint(config.server_key))

    def read(client: Any) -> tuple[int, int]:
        client.ping()
        seconds, micros = client.time()
        horizon = int(seconds) * 1000 + int(micros) // 1000 - int(QUOTA_WINDOW * 1000)
        return int(client.zcount(window, f"({horizon}", "+inf")), int(client.xlen(stream))

    try:
        with _warnings() as seen:
            used, spooled = link.call(read, now=True)
    except RedisDownError:
        why = seen[0] if seen else "no answer"
        yield Check(
            FAIL,
            f"{where} does not answer: {why}",
            "check the URL, the password and that Redis runs; until it answers, clients "
            "pace with this host's quota and spool locally",
        )
        return
    finally:
        link.close()
    limit = config.max_requests_per_minute
    yield Check(OK, f"{where} answers")
    share = f"{used} of {limit}" if limit is not None else f"{used} (no limit set)"
    check = Check(OK, f"the fleet's quota: {share} requests used in the last minute")
    if limit is not None and used >= limit:
        check = attrs.evolve(
            check,
            status=WARN,
            remedy="the fleet is at its limit: events wait until the window frees up",
        )
    yield check
    if spooled:
        yield Check(
            WARN,
            f"{spooled} event(s) of this key spooled in Redis",
            "a running client delivers them, or now: produl-server drain --redis URL",
        )


# -- delivery at exit ---------------------------------------------------------------------

#: Hosts that freeze or end a process without running its exit hooks.
_FROZEN_HOSTS = (
    ("AWS_LAMBDA_FUNCTION_NAME", "AWS Lambda"),
    ("FUNCTION_TARGET", "Google Cloud Functions"),
    ("FUNCTIONS_WORKER_RUNTIME", "Azure Functions"),
)


def _exit(config: Config, environ: Mapping[str, str]) -> Iterator[Check]:
    from .integrations.wsgi import uwsgi_threads_enabled  # noqa: PLC0415 -- no framework

    if not config.enabled:
        yield Check(
            FAIL,
            f"{ENABLED_ENV} turns the client off: nothing is sent",
            f"unset {ENABLED_ENV} (or set it to 1) where events should be delivered",
        )
    ran = threading.Event()
    worker = threading.Thread(target=ran.set, name="produl-server.doctor-thread", daemon=True)
    worker.start()
    if not ran.wait(2.0):
        yield Check(
            FAIL,
            "a thread started here did not run within 2 s: no sender thread would",
            "use sync_mode=True, or give the host threads",
        )
    else:
        yield Check(
            OK,
            "threads run, and a client's atexit hook flushes within shutdown_timeout "
            f"({config.shutdown_timeout:g} s) when the process ends normally",
        )
    threads = uwsgi_threads_enabled()
    if threads is False:
        yield Check(
            WARN,
            "uWSGI runs without Python threads: the integrations send while the request "
            "waits (sync_mode), and a plain client's sender thread never runs",
            "start uWSGI with --enable-threads (or --threads N)",
        )
    elif threads:
        yield Check(OK, "uWSGI runs with Python threads")
    for variable, host in _FROZEN_HOSTS:
        if environ.get(variable):
            yield Check(
                WARN,
                f"{host} freezes the process after each invocation: exit hooks may never run",
                "flush before returning: produl_server.integrations.serverless.flush_after",
            )


# -- the test event --------------------------------------------------------------------------


def _test_event(config: Config, options: DoctorOptions) -> Check:
    if not options.send_test_event:
        return Check(
            SKIP,
            "the key was not tried: no event is sent without --send-test-event (the API "
            "has no request that checks a key without collecting an event)",
        )
    if not config.server_key:
        return Check(FAIL, "no test event: there is no server key", f"set {KEY_ENV}")
    from ._client import Produl  # noqa: PLC0415

    errors: list[DeliveryError] = []
    timeout = options.timeout
    with _warnings():
        client = Produl(
            server_key=config.server_key,
            api_url=config.api_url,
            proxy=config.proxy,
            verify=config.verify,
            enabled=True,
            max_retry_time=timeout,
            retry_initial_delay=min(0.5, timeout / 4),
            shutdown_timeout=1.0,
            on_error=lambda error, _event: errors.append(error),
        )
        try:
            client.track_event(
                TEST_EVENT,
                {"source": "produl-server doctor"},
                visitor_id="produl-doctor",
                session_key="produl-doctor",
                path="/produl-doctor",
            )
            client.flush(timeout + 5.0)
            sent = client.stats.sent
        finally:
            client.shutdown(1.0)
    where = mask_url(config.api_url)
    if sent:
        return Check(OK, f"the test event {TEST_EVENT!r} was accepted by {where}")
    if errors:
        error = errors[0]
        if error.status in (401, 403):
            return Check(
                FAIL,
                f"{where} refused the key {mask_key(config.server_key)} ({error.status})",
                "create a new server key in the dashboard (Settings → Server keys); "
                "check that it belongs to this site and was not revoked",
            )
        return Check(
            FAIL,
            f"the test event was not delivered: {error}",
            "see the reason; run with -v for the library's log",
        )
    return Check(
        FAIL,
        f"the test event was not delivered within {timeout:g} s",
        "check the connection lines above; raise --timeout",
    )
