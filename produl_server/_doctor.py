"""``produl-server doctor``: is this machine ready to deliver events?

Each check prints one line, marked ``✓`` (holds), ``✗`` (fails, with a
remedy under it), ``!`` (a warning, with a remedy; the exit status ignores
it) or ``-`` (not checked, and why). The exit status is 0 when no check
fails, 1 otherwise.

Nothing is sent to the API unless ``--send-test-event`` is given: Produl's
API has no request that checks a key without collecting an event, so
without it the key's shape is checked, never whether the API accepts it.

The checks live in three modules: :mod:`._doctor_net` (can the API be
reached: name, TCP, TLS), :mod:`._doctor_state` (the host's quota, the
spool, Redis) and this one (the configuration, the key, delivery at exit,
the test event, and the report). :mod:`._doctor_report` holds what a check
found. Every wait is bounded: see each module; the test event is tried for
at most ``timeout`` seconds, plus 5 for the last answer.
"""

from __future__ import annotations

import os
import threading
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
    mask_key,
    mask_url,
)
from ._doctor_net import reach
from ._doctor_report import FAIL, OK, SKIP, WARN, Check, captured_warnings
from ._doctor_state import quota, redis, spool
from .exceptions import ConfigurationError, DeliveryError

__all__ = ["Check", "DoctorOptions", "run_doctor", "run_from_args"]

#: The name of the custom event ``--send-test-event`` sends.
TEST_EVENT = "produl_doctor_test"

_MARKS = {OK: "✓", FAIL: "✗", WARN: "!", SKIP: "-"}
_ASCII_MARKS = {OK: "+", FAIL: "x", WARN: "!", SKIP: "-"}


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
    yield from reach(config, options.timeout, environ)
    yield quota(config)
    yield spool(config)
    yield from redis(config)
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
    with captured_warnings():
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
