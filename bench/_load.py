"""A small HTTP load client, used by P6 when ``wrk`` is not installed.

``python -m bench._load URL SECONDS CONNECTIONS`` keeps CONNECTIONS threads
sending GETs for SECONDS and prints one JSON line: requests, errors, seconds.
It runs in its own process; a Python client is slower than ``wrk`` and
shares the machine's cores, so P6 says which one it used.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from urllib.parse import urlsplit


def load(url: str, seconds: float, connections: int) -> dict[str, float]:
    """GET *url* from *connections* threads for *seconds*."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    counts = {"requests": 0, "errors": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        done = errors = 0
        conn = http.client.HTTPConnection(host, port, timeout=10)
        while time.monotonic() < deadline:
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    done += 1
                else:
                    errors += 1
                if response.will_close:
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=10)
            except OSError:
                errors += 1
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.close()
        with lock:
            counts["requests"] += done
            counts["errors"] += errors

    started = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    return {**counts, "seconds": time.monotonic() - started}


if __name__ == "__main__":
    print(json.dumps(load(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))))
