"""Soak a fleet sharing its quota and spool in Redis, through restarts.

``python -m bench.soak_fleet [--minutes 10] [--processes 6] [--rate 5] [--quota 1000]``

Each of ``--processes`` fresh interpreters stands for a pod (a temp
directory of its own for ``TMPDIR``, the quota file and ``spool_dir``) and
tracks ``--rate`` events per second with ``redis_url`` against a local
collector that enforces ``--quota`` requests per minute and keeps its
events in SQLite. Every event carries its process and index as properties
(``soak_p``, ``soak_i``), so the collector's events can be deduplicated.

Meanwhile Redis is restarted twice (at a quarter and at 70% of the run)
and the collector once (halfway), each staying down ``--down`` seconds;
during and after each Redis outage the processes are asked which quota
they use (``stats.quota``). Redis keeps an append-only file by default, so
a restart keeps what it held (``--redis-persistence none`` to restart it
empty). At the end every process is shut down (``shutdown()``, within
``shutdown_timeout`` plus a margin), then what is left in the Redis spool
(and in any pod's ``spool_dir``) is drained with ``produl-server drain
--redis``, within the quota. The report: events tracked, distinct events
delivered, lost (tracked minus distinct delivered: must be 0), duplicates
and the bound on what was in flight at the restarts, 429s.

With the defaults the fleet tracks 1,800 events a minute against a quota of
1,000: the backlog grows about 800 a minute, is spooled in Redis at the
shutdown and drained at the quota's pace afterwards, which takes about as
long again as the run's growth (``--rate`` lower to stay within the quota).

Exit status: 0 when nothing was lost, 1 when something was (or a process
failed to report), 2 when Redis cannot be run here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import attrs

from bench import _guard, _proc, _redis
from bench._collector import CollectorProcess

EVENT = "soak"
READY = "SOAK-READY"
PROBE = "SOAK-PROBE "
SHUTDOWN_TIMEOUT = 5.0
#: On top of shutdown_timeout: the sender's finishing wait (2 s) and an interpreter's exit.
EXIT_MARGIN = 5.0


def child(
    url: str, key: str, process: int, rate: float, quota: int, spool_dir: str
) -> dict[str, Any]:
    """Track *rate* events per second until ``stop``; answer ``probe``; shut down."""
    _guard.install()
    from produl_server import Produl

    produl = Produl(
        server_key=key,
        api_url=url,
        max_requests_per_minute=quota,
        max_queue_size=100_000,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        spool_dir=spool_dir,
    )
    stop = threading.Event()
    out = threading.Lock()
    tracked = 0

    def say(line: str) -> None:
        with out:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def listen() -> None:
        for line in sys.stdin:
            word = line.strip()
            if word == "stop":
                break
            if word.startswith("probe"):
                stats = produl.stats
                say(
                    PROBE
                    + json.dumps(
                        {
                            "process": process,
                            "tag": word.partition(" ")[2],
                            "tracked": tracked,
                            "sent": stats.sent,
                            "pending": stats.pending,
                            "spooled": stats.spooled,
                            "quota": stats.quota,
                            "quota_used": stats.quota_used,
                        }
                    )
                )
        stop.set()

    threading.Thread(target=listen, daemon=True).start()
    say(READY)
    started = time.monotonic()
    while not stop.is_set():
        due = started + tracked / rate
        if stop.wait(max(0.0, due - time.monotonic())):
            break
        produl.track_event(
            EVENT,
            {"soak_p": process, "soak_i": tracked},
            visitor_id=f"soak_{process}_{tracked % 20}",
        )
        tracked += 1
    before = produl.stats
    began = time.monotonic()
    produl.shutdown()
    exit_seconds = time.monotonic() - began
    stats = produl.stats
    return {
        "process": process,
        "tracked": tracked,
        "pending_at_stop": before.pending,
        "exit_s": exit_seconds,
        "sent": stats.sent,
        "retried": stats.retried,
        "spooled": stats.spooled,
        "dropped": dict(stats.dropped),
        "quota": stats.quota,
        "refused": _guard.refused,
    }


class _Pod:
    """One child process in a directory of its own."""

    def __init__(self, process: int, root: Path, args: dict[str, Any], redis_url: str) -> None:
        self.process = process
        self.dir = root / f"pod{process}"
        (self.dir / "quota").mkdir(parents=True, mode=0o700)
        self.spool_dir = self.dir / "spool"
        self.errors = self.dir / "stderr.txt"
        env = _proc.child_env(
            {
                "TMPDIR": str(self.dir),
                "PRODUL_QUOTA_DIR": str(self.dir / "quota"),
                "PRODUL_REDIS_URL": redis_url,
            }
        )
        env.pop("XDG_RUNTIME_DIR", None)
        argv = [sys.executable, "-m", "bench._proc", "soak_fleet", "child"]
        payload = {**args, "process": process, "spool_dir": str(self.spool_dir)}
        with self.errors.open("w") as sink:
            self.proc = subprocess.Popen(
                [*argv, json.dumps(payload)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=sink,
                text=True,
                env=env,
                cwd=_proc.NEUTRAL_CWD,
                start_new_session=True,
            )
        assert self.proc.stdout is not None
        self.reader = _proc.LineReader(self.proc.stdout)
        self.probes: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None
        self.stopped_at: float | None = None
        self.exited_in: float | None = None

    def tell(self, word: str) -> None:
        stdin: IO[str] | None = self.proc.stdin
        with contextlib.suppress(OSError, ValueError):
            if stdin is not None:
                stdin.write(word + "\n")
                stdin.flush()

    def read(self, until: float, want: str) -> bool:
        """Read lines until one starting with *want* (probes are kept); False at *until*."""
        while True:
            line = self.reader.readline(max(0.05, until - time.monotonic()))
            if not line:
                return False
            if line.startswith(PROBE):
                self.probes.append(json.loads(line[len(PROBE) :]))
                if want == PROBE:
                    return True
            elif line.startswith(_proc.RESULT_PREFIX):
                self.result = json.loads(line[len(_proc.RESULT_PREFIX) :])
                if want == _proc.RESULT_PREFIX:
                    return True
            elif line.strip() == READY and want == READY:
                return True

    def stderr(self) -> str:
        try:
            return self.errors.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10.0)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _log(text: str, started: float) -> None:
    print(f"soak: {time.monotonic() - started:7.1f} s  {text}", file=sys.stderr, flush=True)


def _probe(pods: list[_Pod], tag: str) -> dict[str, Any]:
    """Ask every pod for its stats now: how many use each quota, events pending."""
    for pod in pods:
        pod.tell(f"probe {tag}")
    deadline = time.monotonic() + 10.0
    kinds: dict[str, int] = {}
    pending = 0
    for pod in pods:
        if pod.read(deadline, PROBE):
            kind = str(pod.probes[-1]["quota"])
            pending += int(pod.probes[-1]["pending"])
        else:
            kind = "no answer"
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"quota": kinds, "pending": pending}


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def _drain(argv: list[str], timeout: float) -> dict[str, Any]:
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "produl_server", *argv],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
        env=_proc.child_env(sdk=False),
        cwd=_proc.NEUTRAL_CWD,
        check=False,
    )
    return {
        "argv": argv,
        "status": proc.returncode,
        "seconds": time.monotonic() - began,
        "output": (proc.stdout + proc.stderr).strip()[-1000:],
    }


def _local_count(directory: Path, url: str) -> int:
    """Events left in a pod's ``spool_dir`` (0 when it holds no spool)."""
    from produl_server._spool import FILENAME, Spool

    if not (directory / FILENAME).exists():
        return 0
    spool = Spool(directory, url)
    try:
        return spool.count()
    finally:
        spool.close()


def _delivered(db: Path) -> list[tuple[int, int]]:
    from produl_server.collector import SqliteStore

    store = SqliteStore(db, readonly=True)
    try:
        keys = []
        for stored in store.query():
            event = stored.event
            props = event.get("pr") or {}
            if event.get("n") == EVENT and "soak_p" in props and "soak_i" in props:
                keys.append((int(props["soak_p"]), int(props["soak_i"])))
        return keys
    finally:
        store.close()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak_fleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to track (0.5 ok)")
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--rate", type=float, default=5.0, help="events per second per process")
    parser.add_argument("--quota", type=int, default=1000, help="the collector's requests/min")
    parser.add_argument("--down", type=float, default=5.0, help="seconds each restart stays down")
    parser.add_argument(
        "--redis-persistence",
        choices=("aof", "none"),
        default="aof",
        help="aof: an append-only file, a restart keeps the data (default); none: it does not",
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.processes < 1 or args.rate <= 0 or args.quota < 1:
        parser.error("--minutes, --processes, --rate and --quota must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the soak; see the module docstring."""
    args = _parse(argv)
    missing = _redis.missing()
    if missing:
        print(f"soak: error: {missing} ({_redis.INSTALL_HINT})", file=sys.stderr)
        return 2
    _guard.install()
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as scratch:
        return _soak(args, Path(scratch))


def _soak(args: argparse.Namespace, root: Path) -> int:
    from produl_server._outbox import SPOOL_BATCH
    from produl_server._redis import spool_key

    duration = args.minutes * 60.0
    db = root / "collector.sqlite"
    started = time.monotonic()
    rate_limited: list[int] = []
    events: list[dict[str, Any]] = []
    pods: list[_Pod] = []
    redis = _redis.RedisServer(persistent=args.redis_persistence == "aof")
    collector: CollectorProcess | None = None
    try:
        redis.start()
        port = _redis.free_port()
        collector = CollectorProcess(rate_limit=args.quota, port=port, db=str(db)).__enter__()
        url, key = collector.url, collector.key
        child_args = {"url": url, "key": key, "rate": args.rate, "quota": args.quota}
        pods = [_Pod(i, root, child_args, redis.url) for i in range(args.processes)]
        deadline = time.monotonic() + 90.0
        for pod in pods:
            if not pod.read(deadline, READY):
                raise RuntimeError(f"process {pod.process} did not start: {pod.stderr()[-2000:]}")
        began = time.monotonic()
        _log(
            f"{args.processes} processes tracking {args.rate:g}/s each for "
            f"{duration:g} s; redis {redis.url} ({args.redis_persistence}), collector {url}",
            started,
        )
        plan = [
            (0.25, "redis"),
            (0.5, "collector"),
            (0.7, "redis"),
        ]
        for fraction, what in plan:
            _sleep_until(began + fraction * duration)
            event: dict[str, Any] = {"what": what, "at_s": time.monotonic() - began}
            if what == "redis":
                redis.stop()
                _log(f"redis stopped (restart {redis.starts})", started)
                time.sleep(args.down)
                event["during"] = _probe(pods, f"redis down {redis.starts}")
                redis.start()
                _log(f"redis started again; during the outage: {event['during']}", started)
                time.sleep(min(8.0, duration / 10))
                event["after"] = _probe(pods, f"redis back {redis.starts}")
                _log(f"after: {event['after']}", started)
            else:
                rate_limited.append(collector.stats().rate_limited)
                collector.close()
                _log("collector stopped", started)
                time.sleep(args.down)
                collector = CollectorProcess(rate_limit=args.quota, port=port, db=str(db))
                collector.__enter__()
                _log("collector started again", started)
            events.append(event)
        _sleep_until(began + duration)
        tracked_for = time.monotonic() - began
        _log("stopping the processes", started)
        budget = SHUTDOWN_TIMEOUT + EXIT_MARGIN
        stop_sent = time.monotonic()
        for pod in pods:
            pod.tell("stop")
            pod.stopped_at = time.monotonic()
        for pod in pods:
            if pod.read(stop_sent + budget + 20.0, _proc.RESULT_PREFIX):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    pod.proc.wait(5.0)
            pod.exited_in = time.monotonic() - stop_sent if pod.proc.poll() is not None else None
            pod.kill()
        left_in_redis = int(redis.call("XLEN", spool_key(url)))
        spooled = sum(int(pod.result["spooled"]) for pod in pods if pod.result)
        drains = []
        wait = 90.0 + 62.0 * math.ceil(max(left_in_redis, spooled) / args.quota)
        common = ["--api-url", url, "--server-key", key, "--rate-limit", str(args.quota)]
        if left_in_redis:
            _log(f"draining {left_in_redis} event(s) from Redis", started)
            drains.append(
                _drain(["drain", "--redis", redis.url, *common, "--timeout", f"{wait:g}"], wait)
            )
        for pod in pods:
            local = _local_count(pod.spool_dir, url)
            if local:
                _log(f"draining {local} event(s) from pod {pod.process}'s spool_dir", started)
                drains.append(
                    _drain(
                        [
                            "drain",
                            "--spool",
                            str(pod.spool_dir),
                            "--redis",
                            redis.url,
                            *common,
                            "--timeout",
                            f"{wait:g}",
                        ],
                        wait,
                    )
                )
        left_after = int(redis.call("XLEN", spool_key(url)))
        rate_limited.append(collector.stats().rate_limited)
        collector.close()
        collector = None
        delivered = _delivered(db)
    finally:
        for pod in pods:
            pod.kill()
        if collector is not None:
            collector.close()
        redis.close()
    return _report(
        args,
        pods,
        events,
        drains,
        delivered,
        rate_limited,
        left_in_redis,
        left_after,
        SPOOL_BATCH,
        budget,
        tracked_for,
    )


def _report(
    args: argparse.Namespace,
    pods: list[_Pod],
    events: list[dict[str, Any]],
    drains: list[dict[str, Any]],
    delivered: list[tuple[int, int]],
    rate_limited: list[int],
    left_in_redis: int,
    left_after: int,
    spool_batch: int,
    budget: float,
    tracked_for: float,
) -> int:
    missing_results = [pod.process for pod in pods if pod.result is None]
    tracked_keys = {
        (pod.process, index)
        for pod in pods
        if pod.result is not None
        for index in range(int(pod.result["tracked"]))
    }
    tracked = len(tracked_keys)
    distinct = set(delivered)
    found = distinct & tracked_keys
    lost = tracked - len(found)
    duplicates = len(delivered) - len(distinct)
    unknown = len(distinct - tracked_keys)
    collector_restarts = sum(1 for e in events if e["what"] == "collector")
    redis_restarts = sum(1 for e in events if e["what"] == "redis")
    # A collector restart can cut off requests it stored but had not answered
    # (at most max_in_flight per process); a Redis restart can lose the
    # acknowledgement of spooled events a sender had claimed (a batch each).
    from produl_server._config import Config

    max_in_flight = int(attrs.fields(Config).max_in_flight.default)
    bound = args.processes * (collector_restarts * max_in_flight + redis_restarts * spool_batch)
    exits = [pod.result["exit_s"] for pod in pods if pod.result]
    over = [pod.process for pod in pods if pod.exited_in is None or pod.exited_in > budget]
    dropped: dict[str, int] = {}
    for pod in pods:
        for reason, count in (pod.result or {}).get("dropped", {}).items():
            dropped[reason] = dropped.get(reason, 0) + count
    warnings = [
        line
        for pod in pods
        for line in pod.stderr().splitlines()
        if line.strip() and not line.startswith("Traceback")
    ]
    rows = [
        ("tracked for", f"{tracked_for:.0f} s (--minutes {args.minutes:g})"),
        ("processes x rate", f"{args.processes} x {args.rate:g}/s against {args.quota:,}/min"),
        (
            "restarts",
            f"redis {redis_restarts} ({args.redis_persistence}), collector {collector_restarts}",
        ),
        ("tracked", f"{tracked:,}"),
        ("delivered (distinct)", f"{len(found):,}"),
        ("lost", f"{lost:,}"),
        (
            "duplicates",
            f"{duplicates:,} ({'within' if duplicates <= bound else 'OVER'} the in-flight "
            f"bound {bound:,})",
        ),
        ("unknown delivered", f"{unknown:,}"),
        ("429s", f"{sum(rate_limited):,} ({' + '.join(map(str, rate_limited))})"),
        ("dropped by clients", ", ".join(f"{k} {v}" for k, v in dropped.items()) or "0"),
        (
            "left in the Redis spool",
            f"{left_in_redis:,} after the shutdown, {left_after:,} after the drain",
        ),
        (
            "exit (shutdown)",
            f"max {max(exits):.1f} s, budget {budget:g} s; over budget: {over or 'none'}"
            if exits
            else "-",
        ),
    ]
    for event in events:
        if event["what"] == "redis":
            rows.append(
                (
                    f"redis restart at {event['at_s']:.0f} s",
                    f"stats.quota during the outage {_kinds(event['during']['quota'])}, "
                    f"after {_kinds(event['after']['quota'])}; "
                    f"{event['during']['pending']:,} pending during",
                )
            )
        else:
            rows.append((f"collector restart at {event['at_s']:.0f} s", "-"))
    for drain in drains:
        said = drain["output"].splitlines()[-1][:90] if drain["output"] else ""
        where = "Redis" if drain["argv"][1] == "--redis" else Path(drain["argv"][2]).parent.name
        rows.append(
            (
                f"drain {drain['argv'][1]} ({where})",
                f"exit {drain['status']} in {drain['seconds']:.0f} s: {said}",
            )
        )
    distinct_warnings = sorted({_shape(w) for w in warnings})
    rows.append(("stderr lines", f"{len(warnings)} ({len(distinct_warnings)} distinct)"))
    width = max(len(name) for name, _ in rows)
    print("-" * (width + 2) + " " + "-" * 60)
    for name, value in rows:
        print(f"{name.ljust(width + 2)} {value}")
    print("-" * (width + 2) + " " + "-" * 60)
    for shape in distinct_warnings[:10]:
        print(f"stderr: {shape[:200]}")
    failed = lost > 0 or bool(missing_results)
    if missing_results:
        print(f"soak: error: no result from process(es) {missing_results}", file=sys.stderr)
        for pod in pods:
            if pod.result is None:
                print(pod.stderr()[-2000:], file=sys.stderr)
    if lost:
        by_process: dict[int, list[int]] = {}
        for p, i in sorted(tracked_keys - found):
            by_process.setdefault(p, []).append(i)
        for p, indices in by_process.items():
            print(
                f"soak: lost from process {p}: {len(indices)} e.g. {indices[:10]}", file=sys.stderr
            )
    print(f"soak: {'FAILED' if failed else 'ok'}: {lost} lost", file=sys.stderr)
    return 1 if failed else 0


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} x {n}" for kind, n in sorted(counts.items()))


def _shape(line: str) -> str:
    """A stderr line without the digits that vary (ports, pids, counts)."""
    return "".join("#" if ch.isdigit() else ch for ch in line.strip())


if __name__ == "__main__":
    sys.exit(main())
