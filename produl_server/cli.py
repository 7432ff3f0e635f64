"""The ``produl-server`` command: a local collector, one-off events, a demo.

Subcommands::

    produl-server collector   run a local collector with a live page
    produl-server event       send one custom event and flush
    produl-server pageview    send one pageview and flush
    produl-server events      list what a collector stored
    produl-server demo        a self-contained tour, no account needed

Exit status: 0 on success, 1 when something failed at run time (not
delivered, port in use, unreadable database), 2 for bad arguments. Errors
are one line on stderr; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from produl_server._client import worker_of
from produl_server._config import MAX_SECONDS, is_loopback, mask_key, mask_url
from produl_server._protocol import KEYED_RATE_LIMIT, KEYLESS_RATE_LIMIT
from produl_server._version import __version__
from produl_server.collector import (
    DEFAULT_RATE_LIMIT_MODE,
    RATE_LIMIT_MODES,
    CollectorServer,
    Query,
    SqliteStore,
    StoredEvent,
    StoreError,
    describe_stored,
    terminal_json,
)
from produl_server.exceptions import ConfigurationError

__all__ = ["main"]

PROG = "produl-server"
DEFAULT_PORT = 8787
DEFAULT_DB = "produl-events.sqlite3"
#: Exit statuses.
OK, FAILED, USAGE = 0, 1, 2


class CommandError(Exception):
    """A run-time failure reported as one line on stderr, with exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: scripts log stderr line by line.
        # Always "produl-server: error:", as the docs promise (issue #23);
        # a subcommand's parser names itself after it.
        command = self.prog.removeprefix(PROG).strip()
        where = f"{command}: " if command else ""
        self.exit(USAGE, f"{PROG}: error: {where}{message} (see --help)\n")


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _err(line: str) -> None:
    sys.stderr.write(f"{PROG}: {line}\n")
    sys.stderr.flush()


def _rate_limit(text: str) -> int | None:
    if text.lower() == "off":
        return None
    if not _digits(text) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number or 'off', not {text!r}")
    return int(text)


def _digits(text: str) -> bool:
    # str.isdigit() alone accepts "²" and "٣".
    return text.isascii() and text.isdigit() and len(text) <= 18


def _positive_int(text: str) -> int:
    if not _digits(text) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # False for NaN; the cap is the client's (issue #9: 1e10 used to pass).
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"expected seconds, more than 0 and at most {MAX_SECONDS:g}, not {text!r}"
        )
    return value


def _port(text: str) -> int:
    if not _digits(text) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, not {text!r}")
    return int(text)


# -- collector ------------------------------------------------------------------


def _collector_server(args: argparse.Namespace, store: SqliteStore, key: str) -> CollectorServer:
    """The server ``collector`` runs, printing each event it stores."""
    lock = threading.Lock()

    def show(stored: StoredEvent) -> None:
        with lock:
            _out(describe_stored(stored))

    try:
        return CollectorServer(
            store=store,
            server_key=key,
            host=args.host,
            port=args.port,
            rate_limit=args.rate_limit,
            keyless_rate_limit=args.keyless_rate_limit,
            rate_limit_mode=args.rate_limit_mode,
            send_retry_after=args.send_retry_after,
            allowed_hosts=args.allow_host,
            on_event=show,
            redis_url=args.redis,
            strict=args.strict,
        )
    except ConfigurationError as exc:
        raise CommandError(str(exc)) from None


def _banner(
    server: CollectorServer, args: argparse.Namespace, stored: int, new_key: str | None
) -> None:
    """What ``collector`` prints once it listens; ``new_key`` is a key it generated."""
    _out(f"Produl local collector listening on {server.url}")
    _out(f"  live page:  {server.page_url}")
    _out(f"  events in:  {os.path.abspath(args.db)} ({stored} stored)")
    if args.strict:
        _out("  strict:     events without u, p, vi or sk are refused with 400")
    _out("Point the SDK at it with:")
    _out(f"  PRODUL_API_URL={server.url}")
    if new_key is not None:
        # Printing the generated key once is this command's purpose.
        _out(f"  PRODUL_SERVER_KEY={new_key}")
    else:
        _out(f"  PRODUL_SERVER_KEY=<the key you passed, {mask_key(server.server_key)}>")
    _out("Press Ctrl-C to stop.")


#: How often ``collector``'s main thread wakes to run a pending signal handler.
_SIGNAL_CHECK_SECONDS = 0.2


def cmd_collector(args: argparse.Namespace) -> int:  # noqa: C901 - a flat list of options
    """Run a collector until Ctrl-C or SIGTERM.

    Args:
        args: Parsed ``collector`` arguments.

    Returns:
        The exit status.

    Raises:
        CommandError: If the database or the address cannot be used.
    """
    generated = not args.server_key
    key = args.server_key or "sk_local_" + secrets.token_hex(16)
    store = SqliteStore(args.db)
    server = _collector_server(args, store, key)
    # SIGTERM (docker stop, systemd) ends it as cleanly as Ctrl-C; so does
    # SIGINT when the collector was started in a shell script's background,
    # which starts it with SIGINT ignored.
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in handlers:
            signal.signal(sig, signal.default_int_handler)
    try:
        try:
            server.start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise CommandError(f"cannot listen on {args.host}:{args.port}: {reason}") from None
        if not is_loopback(args.host):
            _err(
                f"warning: listening on {args.host}, reachable from other machines; "
                "the collector is meant for local development"
            )
        _banner(server, args, store.count(), key if generated else None)
        # Until SIGINT or SIGTERM raises KeyboardInterrupt. Not one endless
        # wait: the kernel may hand a process's SIGTERM to a connection
        # thread, and Python runs the handler only when the main thread next
        # runs bytecode, which an untimed lock wait never does (issue 23: the
        # collector outlived SIGTERM). A short timeout bounds that delay.
        idle = threading.Event()
        while not idle.wait(_SIGNAL_CHECK_SECONDS):
            pass
    except KeyboardInterrupt:
        pass  # Ctrl-C is how this command ends, even during startup
    finally:
        if in_main:
            # A second Ctrl-C must not interrupt the (bounded) shutdown.
            for sig in handlers:
                signal.signal(sig, signal.SIG_IGN)
        server.stop()
        count = store.count()
        store.close()
        if in_main:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    _out(f"Stopped; {count} event(s) stored in {args.db}.")
    return OK


# -- events ---------------------------------------------------------------------


def cmd_events(args: argparse.Namespace) -> int:
    """Print the events a collector stored, oldest of the last ``--limit`` first.

    Args:
        args: Parsed ``events`` arguments.

    Returns:
        The exit status.

    Raises:
        CommandError: If the database cannot be read.
    """
    store = SqliteStore(args.db, readonly=True)
    try:
        query = Query(type=args.type, name=args.name, visitor_id=args.visitor_id, limit=args.limit)
        found = list(reversed(store.query(query)))
    finally:
        store.close()
    if args.json:
        _out(terminal_json([stored.as_json() for stored in found], indent=2))
    else:
        for stored in found:
            _out(describe_stored(stored))
        if not found:
            _err(f"no events stored in {args.db}")
    return OK


# -- event / pageview -----------------------------------------------------------


def _parse_props(args: argparse.Namespace) -> dict[str, Any] | None:
    props: dict[str, Any] = {}
    if args.props_json is not None:
        try:
            loaded = json.loads(args.props_json)
        except ValueError as exc:
            raise _UsageError(f"--props-json is not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise _UsageError('--props-json must be a JSON object, like \'{"plan": "pro"}\'')
        props.update(loaded)
    for item in args.prop or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise _UsageError(f"bad --prop {item!r}: expected key=value")
        props[key] = _prop_value(raw)
    return props or None


def _prop_value(raw: str) -> Any:
    # Numbers, true/false/null, quoted strings, lists and objects are JSON;
    # anything else is taken as a plain string (plan=pro).
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class _UsageError(Exception):
    """Bad arguments found after parsing; exit status 2."""


def cmd_send(args: argparse.Namespace) -> int:
    """Send one event or pageview through the SDK and flush it.

    Args:
        args: Parsed ``event`` or ``pageview`` arguments.

    Returns:
        0 when delivered.

    Raises:
        CommandError: When the event was not delivered (``main`` turns it
            into exit status 1 and a one-line reason).
    """
    from produl_server import Produl  # noqa: PLC0415 -- the client is only needed here
    from produl_server.exceptions import InvalidEventError  # noqa: PLC0415

    props = _parse_props(args) if args.command == "event" else None
    errors: list[BaseException] = []
    try:
        client = Produl(
            server_key=args.server_key,
            api_url=args.api_url,
            # One bound, --timeout: no retry, and no one request, outlives it.
            max_retry_time=args.timeout,
            request_timeout=min(10.0, args.timeout),
            retry_initial_delay=min(0.5, args.timeout / 4),
            shutdown_timeout=1.0,
            # The exit status says whether it arrived: keeping it for a
            # later run too would send it twice when the user tries again.
            spool_dir=False,
            on_error=lambda error, event: errors.append(error),
            enabled=True,  # a command asked to send: PRODUL_ENABLED=0 is for apps
        )
    except ConfigurationError as exc:
        raise _UsageError(str(exc)) from None
    try:
        try:
            if args.command == "event":
                client.track_event(
                    args.name,
                    props,
                    visitor_id=args.visitor_id,
                    path=args.path,
                    url=args.url,
                    session_key=args.session_key,
                )
                what = f"event {args.name!r}"
            else:
                client.track_pageview(
                    path=args.path,
                    visitor_id=args.visitor_id,
                    url=args.url,
                    title=args.title,
                    referrer=args.referrer,
                    session_key=args.session_key,
                )
                what = f"pageview {args.path!r}"
        except InvalidEventError as exc:
            raise _UsageError(f"invalid input: {exc}") from None
        # A small margin past --timeout for the last try's answer.
        client.flush(timeout=args.timeout + 0.5)
        sent = client.stats.sent
    finally:
        client.shutdown(timeout=0.0)
    where = mask_url(client.config.api_url)
    if sent >= 1:
        _out(f"delivered {what} to {where}")
        return OK
    refused = [e for e in errors if getattr(e, "reason", "") in ("unauthorized", "rejected")]
    if refused:
        raise CommandError(f"not delivered: {_explain(refused[0])}")
    # Given up, or still trying at the end: one message, with the cause.
    cause = worker_of(client).last_failure or "no answer"
    raise CommandError(f"not delivered within {args.timeout:g} s to {where}: {cause}")


def cmd_drain(args: argparse.Namespace) -> int:
    """Deliver a spool's events, within the host's quota.

    Only the events this server key tracked for this ``api_url`` are sent;
    the others are counted and left alone.

    Args:
        args: Parsed ``drain`` arguments.

    Returns:
        0 when none of this key's events is left.

    Raises:
        CommandError: When some are left (``main`` turns it into exit
            status 1 and a one-line reason, with the last failure's cause).
    """
    from produl_server import Produl  # noqa: PLC0415 -- the client is only needed here

    if args.spool is None and args.redis is None:
        raise _UsageError("drain needs --spool DIR, --redis URL, or both")
    if args.spool is not None:
        _existing_spool(args.spool)
    try:
        client = Produl(
            server_key=args.server_key,
            api_url=args.api_url,
            spool_dir=args.spool,
            redis_url=args.redis,
            enabled=True,  # a command asked to deliver: PRODUL_ENABLED=0 is for apps
            max_requests_per_minute=args.rate_limit,
            max_retry_time=args.timeout,
            shutdown_timeout=min(5.0, args.timeout),
        )
    except ConfigurationError as exc:
        raise _UsageError(str(exc)) from None
    worker = worker_of(client)
    adopted = worker.adopt_unowned() if args.adopt_unowned else 0
    show = _progress if sys.stderr.isatty() else None
    try:
        worker.drain_spool(args.timeout, show)
        # Rows leave the spool only when delivered: the count stays true
        # through the shutdown, which hands unsent claims back.
        left = worker.spool_count()
        census = worker.spool_census()
        problem = worker.spool_problem()
    finally:
        client.shutdown()
        if show is not None:
            sys.stderr.write("\n")
    sent = client.stats.sent
    where = mask_url(client.config.api_url)
    notes = _drain_notes(census, adopted)
    if problem is not None:
        raise CommandError(f"{problem}: cannot tell what is still spooled after {sent} sent")
    if left:
        place = " and ".join(
            str(place)
            for place in (args.spool, args.redis and f"Redis at {mask_url(args.redis)}")
            if place
        )
        cause = worker.last_failure or "not delivered within --timeout"
        raise CommandError(
            f"{left} event(s) still spooled in {place} after {sent} sent "
            f"(last failure: {cause}){notes}"
        )
    _out(f"delivered {sent} spooled event(s) to {where}; {notes[2:] or 'the spool is empty'}")
    return OK


def _existing_spool(directory: str) -> None:
    """Refuse a spool directory that does not hold a spool: a typo must not look like success."""
    from produl_server._spool import FILENAME  # noqa: PLC0415

    if not os.path.isdir(directory):
        raise _UsageError(f"no spool at {directory}: there is no such directory")
    if not os.path.exists(os.path.join(directory, FILENAME)):
        raise _UsageError(f"no spool at {directory}: the directory holds no {FILENAME}")


def _drain_notes(census: Any, adopted: int) -> str:
    """What ``drain`` left alone, and why, as clauses of its last line."""
    notes = []
    if adopted:
        notes.append(f"{adopted} unowned event(s) adopted as this key's")
    if census is not None:
        if census.others:
            notes.append(f"{census.others} event(s) of other API URLs or keys left untouched")
        if census.unowned:
            notes.append(
                f"{census.unowned} event(s) spooled before events carried their key's "
                "fingerprint left untouched (--adopt-unowned sends them under this key)"
            )
        if census.quarantined:
            notes.append(
                f"{census.quarantined} event(s) in quarantine: they cannot be sent "
                "(see the quarantine table or stream)"
            )
    return "".join(f"; {note}" for note in notes)


def _progress(left: int) -> None:
    sys.stderr.write(f"\r{PROG}: {left} event(s) left in the spool ")
    sys.stderr.flush()


def _explain(error: BaseException) -> str:
    reason = getattr(error, "reason", "")
    status = getattr(error, "status", None)
    if reason == "unauthorized":
        return f"the collector refused the server key (HTTP {status})"
    return str(error)


# -- parser ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``produl-server`` argument parser.

    Returns:
        A parser whose namespaces carry the subcommand in ``command``.
    """
    parser = _Parser(prog=PROG, description="Produl server-side SDK tools.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    col = sub.add_parser("collector", help="run a local collector with a live web page")
    col.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    col.add_argument("--port", type=_port, default=DEFAULT_PORT, help="0 picks a free port")
    col.add_argument("--db", default=DEFAULT_DB, help="SQLite file the events are kept in")
    col.add_argument("--server-key", help="key to accept (default: generate and print one)")
    col.add_argument(
        "--rate-limit",
        type=_rate_limit,
        default=KEYED_RATE_LIMIT,
        metavar="N|off",
        help=f"keyed requests per minute per IP (default {KEYED_RATE_LIMIT})",
    )
    col.add_argument(
        "--keyless-rate-limit",
        type=_rate_limit,
        default=KEYLESS_RATE_LIMIT,
        metavar="N|off",
        help=f"requests without a key per minute per IP (default {KEYLESS_RATE_LIMIT})",
    )
    col.add_argument(
        "--rate-limit-mode",
        choices=RATE_LIMIT_MODES,
        default=DEFAULT_RATE_LIMIT_MODE,
        help=f"the quota's shape: fixed, sliding or bucket (default {DEFAULT_RATE_LIMIT_MODE})",
    )
    col.add_argument(
        "--no-retry-after",
        dest="send_retry_after",
        action="store_false",
        help="answer 429 without Retry-After (Produl does not promise it)",
    )
    col.add_argument(
        "--redis",
        metavar="URL",
        help="show a fleet's quota windows in this Redis on the live page (the clients' redis_url)",
    )
    col.add_argument(
        "--strict",
        action="store_true",
        help="refuse (400) events without u, p, vi or sk, which Produl may drop",
    )
    col.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host is NAME (repeatable)",
    )

    lst = sub.add_parser("events", help="list the events a collector stored")
    lst.add_argument("--db", default=DEFAULT_DB, help="the collector's SQLite file")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.add_argument("--limit", type=_positive_int, default=100, help="the last N (default 100)")
    lst.add_argument("--type", choices=("pv", "ev"), help="only pageviews or only events")
    lst.add_argument("--name", help="only events with this name")
    lst.add_argument("--visitor-id", help="only this visitor")

    ev = sub.add_parser("event", help="send one custom event and flush")
    ev.add_argument("name", help="the event's name, such as signup")
    ev.add_argument("--prop", action="append", metavar="KEY=VALUE", help="a property (repeat)")
    ev.add_argument("--props-json", metavar="JSON", help="properties as a JSON object")
    ev.add_argument("--path", help="the path the event happened on")
    pv = sub.add_parser("pageview", help="send one pageview and flush")
    pv.add_argument("path", help="the page's path, such as /pricing")
    pv.add_argument("--title", help="the page's title")
    pv.add_argument("--referrer", help="the URL the visitor came from")
    for send in (ev, pv):
        send.add_argument(
            "--visitor-id",
            required=send is pv,
            help="who did it: your user id or another stable id"
            + (" (required)" if send is pv else ""),
        )
        send.add_argument("--url", help="the full URL of the page")
        send.add_argument(
            "--session-key", help="the session key, as in track_pageview / track_event"
        )
        send.add_argument("--server-key", help="default: $PRODUL_SERVER_KEY")
        send.add_argument("--api-url", help="default: $PRODUL_API_URL or Produl's API")
        send.add_argument(
            "--timeout", type=_seconds, default=10.0, help="seconds to keep trying (default 10)"
        )

    dr = sub.add_parser("drain", help="deliver the events kept in a spool directory or Redis")
    dr.add_argument("--spool", metavar="DIR", help="the clients' spool_dir")
    dr.add_argument("--redis", metavar="URL", help="the clients' redis_url")
    dr.add_argument("--server-key", help="default: $PRODUL_SERVER_KEY")
    dr.add_argument("--api-url", help="default: $PRODUL_API_URL or Produl's API")
    dr.add_argument(
        "--timeout", type=_seconds, default=60.0, help="seconds to spend at most (default 60)"
    )
    dr.add_argument(
        "--adopt-unowned",
        action="store_true",
        help="also send, under this key, the events of this API URL spooled by a version "
        "that did not record which key tracked them",
    )
    dr.add_argument(
        "--rate-limit",
        type=_rate_limit,
        default=KEYED_RATE_LIMIT,
        metavar="N|off",
        help=f"requests per minute, shared with this host's clients (default {KEYED_RATE_LIMIT})",
    )

    sub.add_parser("demo", help="a tour against an embedded collector; no account needed")
    doc = sub.add_parser("doctor", help="check that this machine can deliver events")
    doc.add_argument("--server-key", help="default: $PRODUL_SERVER_KEY")
    doc.add_argument("--api-url", help="default: $PRODUL_API_URL or Produl's API")
    doc.add_argument("--spool", metavar="DIR", help="the spool_dir (default: $PRODUL_SPOOL_DIR)")
    doc.add_argument("--quota-dir", metavar="DIR", help="default: $PRODUL_QUOTA_DIR")
    doc.add_argument("--redis", metavar="URL", help="the redis_url (default: $PRODUL_REDIS_URL)")
    doc.add_argument("--timeout", type=_seconds, default=5.0, help="seconds per check (default 5)")
    doc.add_argument("--send-test-event", action="store_true", help="send one event to try the key")
    return parser


def main(argv: Sequence[str] | None = None) -> int:  # noqa: C901 - one branch per error kind
    """Run ``produl-server``.

    Args:
        argv: The arguments after the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 success, 1 run-time failure, 2 bad arguments,
        130 when interrupted with Ctrl-C.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argument errors
        return exc.code if isinstance(exc.code, int) else USAGE
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    quiet = logging.NullHandler()
    if not args.verbose and args.command not in ("collector", "demo"):
        # These commands report the outcome in one line of their own; the
        # library's records would repeat it (--verbose shows them).
        logging.getLogger("produl_server").addHandler(quiet)
    try:
        if args.command == "collector":
            return cmd_collector(args)
        if args.command == "events":
            return cmd_events(args)
        if args.command == "drain":
            return cmd_drain(args)
        if args.command == "doctor":
            from produl_server._doctor import run_from_args  # noqa: PLC0415

            return run_from_args(args, _out)
        if args.command == "demo":
            from produl_server._demo import run_demo  # noqa: PLC0415

            return run_demo(_out)
        return cmd_send(args)
    except _UsageError as exc:
        _err(f"error: {exc}")
        return USAGE
    except (CommandError, StoreError) as exc:
        _err(f"error: {exc}")
        return FAILED
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    finally:
        logging.getLogger("produl_server").removeHandler(quiet)
