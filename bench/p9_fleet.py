"""P9, a fleet behind one IP: three pods of three processes, one quota.

Nine fresh interpreters stand for three pods of three processes each: every
pod has a temp directory of its own (``TMPDIR`` and ``PRODUL_QUOTA_DIR``),
so the host-wide quota file is shared inside a pod and never across pods,
as with Kubernetes pods leaving through one NAT gateway. The collector
enforces 400 keyed requests per minute per IP (all of them come from
127.0.0.1), and every client paces itself with
``max_requests_per_minute=400``. When all nine are ready, each queues a
burst of 150 events at once: 1,350 in all, more than three times the
quota. The collector's counters are read every quarter of a second for
15 s, then the processes are stopped.

The fleet runs twice against fresh collectors: once with ``redis_url``
(``PRODUL_REDIS_URL``: one window in Redis for the whole fleet) and once
without (one window per pod), which is the floor: the fleet as it was. With
``redis_url`` the target is no ``429`` at all and the 400 requests the quota
allows delivered within the 15 s. It runs against each of the collector's
window shapes (a token bucket, a fixed window, a rolling window), since
Produl does not document its own.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from bench import _guard, _proc, _redis, _report, _sdks
from bench._collector import CollectorProcess
from bench._report import Line, Result, Sizes

QUOTA_PER_MINUTE = 400
PODS = 3
PER_POD = 3
BURST = 150
SECONDS = 15.0
MODES = ("bucket", "fixed", "sliding")
_SAMPLE_SECONDS = 0.25
_READY_SECONDS = 90.0
READY = "P9-READY"
#: The child's client, kept alive until the process ends: a client dropped
#: sooner would begin closing, and report on stderr what it could not send.
_alive: list[Any] = []
WITH, WITHOUT = "with redis_url", "without"


def child(url: str, key: str, process: int, events: int) -> dict[str, Any]:
    """Build a paced client, wait for ``go``, burst *events*, report at ``stop``."""
    _guard.install()
    client = _sdks.make(
        _sdks.PRODUL,
        url,
        key,
        max_queue_size=events + 1000,
        max_requests_per_minute=QUOTA_PER_MINUTE,
    )
    produl = client.raw
    _alive.append(produl)
    sys.stdout.write(READY + "\n")
    sys.stdout.flush()
    sys.stdin.readline()  # go
    started = time.monotonic()
    for index in range(events):
        client.track(f"p9_{process}_{index:04d}")
    queued_in = time.monotonic() - started
    sys.stdin.readline()  # stop
    stats = produl.stats
    return {
        "process": process,
        "queued_in_s": queued_in,
        "sent": stats.sent,
        "retried": stats.retried,
        "dropped": dict(stats.dropped),
        "pending": stats.pending,
        "quota": getattr(stats, "quota", None),
        "quota_used": getattr(stats, "quota_used", None),
        "refused": _guard.refused,
    }


class _Fleet:
    """Nine children in three pod directories, started together."""

    def __init__(self, collector: CollectorProcess, redis_url: str, root: Path) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.readers: list[_proc.LineReader] = []
        self.errors: list[Path] = []
        for pod in range(PODS):
            pod_dir = root / f"pod{pod}"
            (pod_dir / "quota").mkdir(parents=True, mode=0o700)
            extra = {"TMPDIR": str(pod_dir), "PRODUL_QUOTA_DIR": str(pod_dir / "quota")}
            if redis_url:
                extra["PRODUL_REDIS_URL"] = redis_url
            env = _proc.child_env(extra)
            env.pop("XDG_RUNTIME_DIR", None)  # the default quota directory must be the pod's
            for n in range(PER_POD):
                process = pod * PER_POD + n
                args = {"url": collector.url, "key": collector.key, "process": process}
                args["events"] = BURST
                errors = pod_dir / f"stderr-{n}.txt"
                self.errors.append(errors)
                argv = [sys.executable, "-m", "bench._proc", "p9_fleet", "child"]
                with errors.open("w") as sink:
                    proc = subprocess.Popen(
                        [*argv, json.dumps(args)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=sink,
                        text=True,
                        env=env,
                        cwd=_proc.NEUTRAL_CWD,
                        start_new_session=True,
                    )
                self.procs.append(proc)
                assert proc.stdout is not None
                self.readers.append(_proc.LineReader(proc.stdout))

    def wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_SECONDS
        for index, reader in enumerate(self.readers):
            line = reader.readline(max(0.1, deadline - time.monotonic()))
            if line.strip() != READY:
                raise _proc.ChildError(
                    f"P9 process {index} did not get ready ({line.strip()!r}); "
                    f"stderr: {self.stderr(index)}"
                )

    def tell(self, word: str) -> None:
        for proc in self.procs:
            stdin: IO[str] | None = proc.stdin
            if stdin is not None:
                stdin.write(word + "\n")
                stdin.flush()

    def results(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        out = []
        for index, reader in enumerate(self.readers):
            while True:
                line = reader.readline(max(0.1, deadline - time.monotonic()))
                if not line:
                    raise _proc.ChildError(
                        f"P9 process {index} gave no result; stderr: {self.stderr(index)}"
                    )
                if line.startswith(_proc.RESULT_PREFIX):
                    out.append(json.loads(line[len(_proc.RESULT_PREFIX) :]))
                    break
        return out

    def stderr(self, index: int) -> str:
        try:
            return self.errors[index].read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10.0)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


def one_run(mode: str, redis: _redis.RedisServer | None) -> dict[str, Any]:
    """The fleet's burst against a fresh collector, with redis_url when *redis* is given."""
    if redis is not None:
        redis.command("FLUSHALL")
    with (
        CollectorProcess(rate_limit=QUOTA_PER_MINUTE, mode=mode) as collector,
        tempfile.TemporaryDirectory(prefix="bench-p9-") as root,
    ):
        fleet = _Fleet(collector, redis.url if redis else "", Path(root))
        try:
            fleet.wait_ready()
            fleet.tell("go")
            started = time.monotonic()
            samples: list[tuple[float, int, int]] = []
            while True:
                now = time.monotonic() - started
                stats = collector.stats()
                samples.append((now, stats.events, stats.rate_limited))
                if now >= SECONDS:
                    break
                time.sleep(min(_SAMPLE_SECONDS, max(0.0, SECONDS - now)))
            fleet.tell("stop")
            children = fleet.results()
            stderr = [fleet.stderr(i) for i in range(len(fleet.procs))]
        finally:
            fleet.close()
    return {
        "mode": mode,
        "redis": redis is not None,
        "samples": samples,
        "children": children,
        "stderr": [text for text in stderr if text.strip()],
    }


def measure(sizes: Sizes) -> dict[str, Any]:
    """Both runs for each window shape in *sizes*."""
    modes = MODES[: sizes.p9_modes]
    raw: dict[str, Any] = {"modes": list(modes), "runs": {}}
    with _redis.RedisServer() as redis:
        for mode in modes:
            raw["runs"][mode] = {
                WITHOUT: one_run(mode, None),
                WITH: one_run(mode, redis),
            }
    return raw


def summary(run: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run: 429s and deliveries at 15 s, when the quota was reached."""
    samples = run["samples"]
    _t, delivered, refused = samples[-1]
    reached = next((t for t, events, _r in samples if events >= QUOTA_PER_MINUTE), None)

    def at(moment: float) -> int:
        return max((events for t, events, _r in samples if t <= moment + 1e-9), default=0)

    quotas = sorted({str(c.get("quota")) for c in run["children"]})
    return {
        "delivered": delivered,
        "rate_limited": refused,
        "reached_quota_s": reached,
        "at_5": at(5.0),
        "at_10": at(10.0),
        "quotas": quotas,
        "retried": sum(c["retried"] for c in run["children"]),
        "warnings": len(run["stderr"]),
    }


def run(sizes: Sizes) -> Result:
    """P9 as table rows."""
    no_redis = _redis.missing()
    what = (
        f"fleet behind one IP: {PODS} pods x {PER_POD} processes burst "
        f"{PODS * PER_POD * BURST:,} events, quota {QUOTA_PER_MINUTE}/min"
    )
    target = f"with redis_url: 0 x 429, {QUOTA_PER_MINUTE} delivered in {SECONDS:g} s"
    if no_redis:
        print(f"bench: warning: P9 not measured: {no_redis}", file=sys.stderr)
        line = Line("P9", what, f"not measured: {no_redis}", "", "", "", target, None)
        note = f"Not measured: {no_redis} ({_redis.INSTALL_HINT})."
        return Result("P9", "a fleet behind one IP", [line], [note], {"missing": no_redis})
    raw = measure(sizes)
    lines, rows = [], []
    for mode in raw["modes"]:
        ours = summary(raw["runs"][mode][WITH])
        floor = summary(raw["runs"][mode][WITHOUT])
        met = ours["rate_limited"] == 0 and ours["delivered"] >= QUOTA_PER_MINUTE
        lines.append(
            Line(
                "P9",
                f"{what} ({mode})",
                f"{ours['rate_limited']} x 429; {ours['delivered']} delivered in {SECONDS:g} s",
                f"without redis_url: {floor['rate_limited']} x 429; {floor['delivered']} delivered",
                "",
                f"{ours['delivered'] / QUOTA_PER_MINUTE:.0%} of quota; "
                f"429s {ours['rate_limited']} vs {floor['rate_limited']}",
                target,
                met,
            )
        )
        for name, figures in ((WITH, ours), (WITHOUT, floor)):
            reached = figures["reached_quota_s"]
            rows.append(
                [
                    mode,
                    name,
                    str(figures["rate_limited"]),
                    f"{figures['at_5']} / {figures['at_10']} / {figures['delivered']}",
                    "-" if reached is None else f"{reached:.1f} s",
                    str(figures["retried"]),
                    ", ".join(figures["quotas"]),
                    str(figures["warnings"]),
                ]
            )
    notes = [
        "\n\n".join((__doc__ or "").split("\n\n")[1:]).strip(),
        _report.rst_table(
            "P9 runs",
            (
                "window",
                "fleet",
                "429s",
                "delivered at 5 / 10 / 15 s",
                "400 reached after",
                "retries",
                "stats.quota",
                "processes that wrote to stderr",
            ),
            rows,
        ),
        "The 429s and deliveries are the collector's counts; retries and "
        "``stats.quota`` are the clients' own, read at 15 s. A token bucket "
        f"refills {QUOTA_PER_MINUTE / 60:.2f} requests per second, so a fleet that "
        "ignores the shared window can get more than 400 through in 15 s, at the "
        "price of the 429s.",
    ]
    return Result("P9", "a fleet behind one IP", lines, notes, raw)
