"""A bounded load check of a running kdforge server, loopback only.

    kdforge serve exports/quickstart --port 8000 &
    .venv/bin/python benchmarks/load.py --url http://127.0.0.1:8000 --image some.png --clients 8 --seconds 15

N client threads post the same PNG to /predict for T seconds (each waits for its answer before sending the
next request); prints requests/s, p50/p99 latency and the number of errors (non-200 answers or failures).
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

MAX_CLIENTS, MAX_SECONDS = 64, 120


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    host = urlparse(args.url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        parser.error("the load check only targets loopback addresses (127.0.0.0/8, ::1, localhost)")
    if not (1 <= args.clients <= MAX_CLIENTS and 0 < args.seconds <= MAX_SECONDS):
        parser.error(f"--clients must be 1..{MAX_CLIENTS} and --seconds at most {MAX_SECONDS}")

    body = args.image.read_bytes()
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds

    def client() -> None:
        while time.monotonic() < deadline:
            request = urllib.request.Request(f"{args.url}/predict", data=body, headers={"Content-Type": "image/png"})
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    response.read()
                    failure = None if response.status == 200 else f"HTTP {response.status}"
            except (urllib.error.URLError, OSError) as exc:  # HTTPError (4xx/5xx) is a URLError
                failure = str(exc)
            elapsed = time.perf_counter() - started
            with lock:
                if failure is None:
                    latencies.append(elapsed)
                else:
                    errors.append(failure)

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    print(f"{args.clients} clients, {wall:.1f} s: {len(latencies)} ok, {len(errors)} errors, "
          f"{len(latencies) / wall:.1f} requests/s, p50 {statistics.median(latencies) * 1e3:.1f} ms, "
          f"p99 {p99 * 1e3:.1f} ms")
    if errors:
        print("first error:", errors[0])


if __name__ == "__main__":
    main()
