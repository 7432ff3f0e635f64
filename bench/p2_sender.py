"""P2, sender CPU: whole-process CPU time per delivered event.

A fresh interpreter tracks ``events`` events back to back and flushes;
``resource.getrusage`` (user + system, all threads) brackets the tracking and
the delivery, and the figure is that CPU time divided by the events the
collector acknowledged. The collector runs in its own process, answers at
once and has no rate limit; produl's pacer is off, so nothing waits.

Floor, same collector, same request: a bare loop of ``urllib3`` POSTs of
pre-encoded bodies over one kept-alive connection, with produl's headers.
It does no validation, no encoding, no queue and no thread switch, so the
ratio is what the SDK's machinery costs per event on top of the wire.

The sender sends through urllib3 too, so the urllib3 loop is the floor the
target is set against (≤ 1.3x). A second floor is reported beside it: the
cheapest loop that puts the same requests on the wire, pre-built request
bytes on one socket (``sendall``, then read up to the end of the answer's
headers and its ``Content-Length``).
"""

from __future__ import annotations

import json
import resource
import time
from typing import Any

from bench import _guard, _proc, _sdks
from bench._collector import CollectorProcess
from bench._report import Line, Result, Sizes
from bench._stats import Summary, ratio

FLOOR = "floor: urllib3 loop"
SOCKET_FLOOR = "floor: socket loop"
_WARMUP = 50


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(subject: str, url: str, key: str, events: int) -> dict[str, Any]:
    """Deliver *events* events with *subject*; CPU seconds and wall seconds."""
    _guard.install()
    visitors = [f"cust_{i:07d}" for i in range(events + _WARMUP)]
    if subject == _sdks.PRODUL:
        client = _sdks.make(
            subject, url, key, max_queue_size=events + _WARMUP + 100, max_requests_per_minute=None
        )
        produl = client.raw
        for visitor in visitors[:_WARMUP]:
            client.track(visitor)
        client.flush()
        sent_before = produl.stats.sent
        cpu, wall = _cpu(), time.perf_counter()
        for visitor in visitors[_WARMUP:]:
            client.track(visitor)
        client.flush()
        cpu, wall = _cpu() - cpu, time.perf_counter() - wall
        delivered = produl.stats.sent - sent_before
    elif subject == SOCKET_FLOOR:
        delivered, cpu, wall = _socket_loop(url, key, visitors)
    else:
        import urllib3

        from produl_server._transport import USER_AGENT

        headers = {
            "X-Produl-Server-Key": key,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        bodies = [
            json.dumps(
                {"t": "ev", "n": _sdks.EVENT_NAME, "vi": v, "pr": _sdks.PROPERTIES},
                separators=(",", ":"),
            ).encode()
            for v in visitors
        ]
        pool = urllib3.connection_from_url(url, maxsize=1)

        def post(body: bytes) -> bool:
            response = pool.urlopen(
                "POST", "/api/collect", body=body, headers=headers, retries=False, redirect=False
            )
            return 200 <= response.status < 300

        for body in bodies[:_WARMUP]:
            post(body)
        cpu, wall = _cpu(), time.perf_counter()
        delivered = 0
        for body in bodies[_WARMUP:]:
            delivered += post(body)
        cpu, wall = _cpu() - cpu, time.perf_counter() - wall
        pool.close()
    return {"cpu_s": cpu, "wall_s": wall, "delivered": delivered, "refused": _guard.refused}


def _socket_loop(url: str, key: str, visitors: list[str]) -> tuple[int, float, float]:
    """The same POSTs as pre-built bytes on one socket: events delivered, CPU s, wall s."""
    import socket
    from urllib.parse import urlsplit

    from produl_server._transport import USER_AGENT

    where = urlsplit(url)
    head = (
        f"POST /api/collect HTTP/1.1\r\nHost: {where.netloc}\r\nX-Produl-Server-Key: {key}\r\n"
        f"Content-Type: application/json\r\nUser-Agent: {USER_AGENT}\r\nContent-Length: "
    ).encode()
    requests = []
    for visitor in visitors:
        body = json.dumps(
            {"t": "ev", "n": _sdks.EVENT_NAME, "vi": visitor, "pr": _sdks.PROPERTIES},
            separators=(",", ":"),
        ).encode()
        requests.append(head + b"%d\r\n\r\n" % len(body) + body)
    sock = socket.create_connection((where.hostname, where.port or 80), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(request: bytes) -> bool:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        head_part, _, body = answer.partition(b"\r\n\r\n")
        for line in head_part.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                while len(body) < int(value):
                    body += sock.recv(65536)
        return head_part[9:10] == b"2"

    for request in requests[:_WARMUP]:
        post(request)
    cpu, wall = _cpu(), time.perf_counter()
    delivered = sum(post(request) for request in requests[_WARMUP:])
    cpu, wall = _cpu() - cpu, time.perf_counter() - wall
    sock.close()
    return delivered, cpu, wall


def measure(sizes: Sizes) -> dict[str, list[dict[str, Any]]]:
    """Alternate floor and produl runs; raw figures per subject."""
    raw: dict[str, list[dict[str, Any]]] = {FLOOR: [], SOCKET_FLOOR: [], _sdks.PRODUL: []}
    with CollectorProcess(rate_limit=None) as collector:
        for _ in range(sizes.p2_repeats):
            for subject, runs in raw.items():
                before = collector.stats().events
                result = _proc.run_child(
                    "p2_sender",
                    "child",
                    {
                        "subject": subject,
                        "url": collector.url,
                        "key": collector.key,
                        "events": sizes.p2_events,
                    },
                    timeout=120 + sizes.p2_events / 100,
                )
                result["collector_events"] = collector.stats().events - before - _WARMUP
                runs.append(result)
    return raw


def run(sizes: Sizes) -> Result:
    """P2 as a table row."""
    raw = measure(sizes)
    per_event = {
        s: Summary.of([r["cpu_s"] / max(r["delivered"], 1) for r in runs]).scaled(1e6)
        for s, runs in raw.items()
    }
    rate = {s: Summary.of([r["delivered"] / r["wall_s"] for r in runs]) for s, runs in raw.items()}
    lost = sum(sizes.p2_events - r["collector_events"] for r in raw[_sdks.PRODUL])
    ours, floor = per_event[_sdks.PRODUL], per_event[FLOOR]
    to_floor = ratio(ours.median, floor.median)
    bare = per_event[SOCKET_FLOOR]
    lines = [
        Line(
            "P2",
            "sender CPU per delivered event",
            ours.show("µs"),
            f"urllib3 loop {floor.show('µs')}",
            "(batching peers: not comparable)",
            f"{to_floor:.2f}x floor",
            "≤ 1.3x floor",
            to_floor <= 1.3 and lost == 0,
        ),
        Line(
            "P2",
            "sender CPU per delivered event, against the socket floor",
            ours.show("µs"),
            f"socket loop {bare.show('µs')}",
            "",
            f"{ratio(ours.median, bare.median):.2f}x socket floor",
            "(reported)",
            None,
        ),
        Line(
            "P2",
            "delivery rate, one connection",
            rate[_sdks.PRODUL].show("events/s"),
            f"urllib3 loop {rate[FLOOR].show('events/s')}",
            "",
            f"{ratio(rate[_sdks.PRODUL].median, rate[FLOOR].median):.2f}x floor",
            "(reported)",
            None,
        ),
    ]
    notes = [
        (__doc__ or "").split("\n\n", 1)[1].strip(),
        f"{sizes.p2_repeats} runs of {sizes.p2_events:,} events per subject, alternating, "
        f"after {_WARMUP} warm-up events each. Events the collector did not store: {lost}.",
        "Segment and PostHog are not run here: they send up to 100 events per request "
        "to batch endpoints, which Produl's API does not have, so their CPU per event "
        "measures a different protocol.",
    ]
    return Result("P2", "sender CPU per delivered event", lines, notes, raw)
