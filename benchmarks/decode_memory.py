"""Server memory under small-bytes / large-pixels requests (image bombs), loopback only.

    .venv/bin/python benchmarks/decode_memory.py exports/quickstart --clients 6 --rounds 3

Starts `python -m kdforge.serve EXPORT` on a free port (the kdforge on PYTHONPATH: point it at another checkout to
compare versions), then sends, from `--clients` threads at once, `--rounds` rounds of each request kind:
- "bomb": a 1-bit PNG of a few KB that declares 13000 x 13000 pixels (just under Pillow's own bomb limit),
- "budget": a 1-bit PNG declaring 4096 x 4096 pixels, the most the server decodes by default.
While they run, the server's resident memory (VmRSS from /proc) is sampled every 20 ms. Prints, per kind: the
answers' status codes, wall time, the server's RSS before, at peak and 3 s after the last answer.
`tests/test_battery.py` runs the same measurement, smaller, and asserts the bound.
"""

from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from pathlib import Path


def bilevel_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height white pixels, compressed to a few KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + b"\xff" * ((width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python -m kdforge.serve EXPORT` on a free loopback port, until stopped."""

    def __init__(self, export_dir: Path, extra: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kdforge.serve", str(export_dir), "--port", str(self.port), *(extra or [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start within 120 s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def post(url: str, body: bytes) -> int:
    request = urllib.request.Request(f"{url}/predict", data=body, headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return -1  # connection failed (the server died or refused)


def load(server: Server, body: bytes, clients: int, rounds: int, settle_s: float = 3.0) -> dict:
    """Send `rounds` x `clients` copies of `body` (clients at once); RSS before, at peak and after settling."""
    pid = server.process.pid
    before, peak, done = rss_mb(pid), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak[0] = max(peak[0], rss_mb(pid))
            except FileNotFoundError:
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    statuses: Counter = Counter()
    lock = threading.Lock()

    def client() -> None:
        for _ in range(rounds):
            status = post(server.url, body)
            with lock:
                statuses[status] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    time.sleep(settle_s)
    done.set()
    sampler.join()
    alive = server.process.poll() is None
    return {"statuses": dict(statuses), "seconds": round(wall, 2), "rss_before_mb": round(before),
            "rss_peak_mb": round(max(peak[0], before)), "rss_after_mb": round(rss_mb(pid)) if alive else None,
            "alive": alive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not 1 <= args.clients <= 32 or not 1 <= args.rounds <= 20:
        parser.error("--clients must be 1..32 and --rounds 1..20")
    kinds = {"bomb": bilevel_png(13000, 13000), "budget": bilevel_png(4096, 4096)}
    server = Server(args.export_dir)
    try:
        print(f"server pid {server.process.pid}, idle RSS {rss_mb(server.process.pid):.0f} MB")
        for name, body in kinds.items():
            result = load(server, body, args.clients, args.rounds)
            print(f"{name:6s} ({len(body) / 1e3:.1f} KB, {args.clients} clients x {args.rounds}): {result}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
