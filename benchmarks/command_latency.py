"""How long the commands a user touches first take to answer: `kdforge --help`, `kdforge verify --help`,
`kdforge recipe check`, `kdforge report RUN` (to the end) and `kdforge distill` (to its first line), each the
median of N runs as a fresh process, with the peak memory of the process (max RSS).

    .venv/bin/python benchmarks/command_latency.py --run runs/quickstart [--src OTHER_CHECKOUT] [--repeats 5]

`--run`: a finished run folder to report on (`make demo` leaves runs/quickstart). `--src` runs another checkout's
kdforge instead (e.g. `git worktree add /tmp/before HEAD~5`), to compare versions on the same machine. Run it on
an otherwise idle machine; the index of timm's model names is written by the first check (not timed: a first run
before the timed ones).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BOOTSTRAP = "import sys; sys.path.insert(0, {src!r}); sys.argv[0] = 'kdforge'; from kdforge.cli import app; app()"


def command(src: str | None, args: list[str]) -> list[str]:
    return [sys.executable, "-c", BOOTSTRAP.format(src=str(Path(src or Path(__file__).parents[1]).resolve())), *args]


def run_to_end(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one run of `cmd` to its end (the rusage of that one child, from wait4)."""
    started = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(cmd[3:])} failed (exit {process.returncode})")
    return wall, usage.ru_maxrss / 1024


def run_to_first_line(cmd: list[str]) -> tuple[float, float]:
    """(seconds until `cmd` printed its first line, nan); the process is stopped there."""
    started = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    process.stdout.readline()
    wall = time.perf_counter() - started
    process.kill()
    process.wait()
    return wall, float("nan")


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else "no AVX2"
    return f"{model}, {flags}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/quickstart", help="a finished run folder for `kdforge report`")
    parser.add_argument("--recipe", default="recipes/quickstart.toml")
    parser.add_argument("--src", help="another checkout whose kdforge runs the commands")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as runs:
        cases = {
            "kdforge --help": (run_to_end, ["--help"]),
            "kdforge verify --help": (run_to_end, ["verify", "--help"]),
            "kdforge recipe check": (run_to_end, ["recipe", "check", args.recipe]),
            "kdforge report RUN": (run_to_end, ["report", args.run]),
            "kdforge distill (first line)": (run_to_first_line, ["distill", args.recipe, "--runs-dir", runs]),
        }
        run_to_end(command(args.src, ["recipe", "check", args.recipe]))  # the name index, written once
        print(f"{'kdforge of ' + args.src if args.src else 'this checkout'}; median of {args.repeats}; {cpu()}")
        print("| command | seconds | peak RSS (MB) |\n|---|---|---|")
        for name, (measure, cli_args) in cases.items():
            times, peaks = zip(*(measure(command(args.src, cli_args)) for _ in range(args.repeats)), strict=True)
            print(f"| `{name}` | {statistics.median(times):.2f} | {max(peaks):.0f} |")


if __name__ == "__main__":
    main()
