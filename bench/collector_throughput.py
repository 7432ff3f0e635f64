"""How many requests per second the local collector sustains, SQLite on.

Usage::

    python bench/collector_throughput.py [--threads 2] [--requests 10000]

Starts the collector as ``produl-server collector`` runs it (SQLite in WAL
mode, rate limit off, requests not recorded) on a free loopback port. The
clients run in a separate process, as an application would: each of
``--threads`` threads POSTs its share of events over one kept-alive urllib3
connection. Prints the rate and checks every event was stored.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import urllib3

from produl_server._protocol import COLLECT_PATH, KEY_HEADER
from produl_server.collector import CollectorServer, SqliteStore

KEY = "sk_bench_0000000000000000"


def _client(url: str, count: int, worker: int, failures: list[int]) -> None:
    pool = urllib3.connection_from_url(url, maxsize=1, retries=False, timeout=30.0)
    headers = {KEY_HEADER: KEY, "Content-Type": "application/json"}
    try:
        for i in range(count):
            event = {"t": "ev", "n": "bench", "vi": f"w{worker}", "pr": {"i": i, "plan": "pro"}}
            body = json.dumps(event).encode()
            response = pool.request("POST", COLLECT_PATH, body=body, headers=headers)
            if response.status != 204:
                failures.append(response.status)
    finally:
        pool.close()


def run_clients(url: str, threads: int, per_thread: int) -> None:
    """The client process: send, then print elapsed seconds and failures as JSON."""
    failures: list[int] = []
    workers = [
        threading.Thread(target=_client, args=(url, per_thread, w, failures))
        for w in range(threads)
    ]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    print(json.dumps({"elapsed": elapsed, "failures": len(failures)}))


def main() -> None:
    """Run the benchmark and print the result."""
    parser = argparse.ArgumentParser(description="Measure the collector's requests/second.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=10_000, help="in total")
    parser.add_argument("--client-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    per_thread = args.requests // args.threads
    if args.client_of:
        run_clients(args.client_of, args.threads, per_thread)
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(os.path.join(tmp, "bench.sqlite3"))
        server = CollectorServer(store=store, server_key=KEY, rate_limit=None)
        server.start()
        try:
            command = [sys.executable, __file__, "--client-of", server.url]
            command += ["--threads", str(args.threads), "--requests", str(args.requests)]
            result = json.loads(subprocess.run(command, capture_output=True, check=True).stdout)
            stored = store.count()
        finally:
            server.stop()
            store.close()
    total = per_thread * args.threads
    print(
        f"{total} requests from {args.threads} client threads (separate process), "
        f"SQLite WAL store: {result['elapsed']:.2f} s = {total / result['elapsed']:,.0f} req/s "
        f"on {os.cpu_count()} CPUs; stored {stored}, non-204 answers {result['failures']}"
    )
    if stored != total or result["failures"]:
        raise SystemExit("some requests were not stored")


if __name__ == "__main__":
    main()
