"""`python -m kdforge.serve.probe DIR`: time every exported file under DIR on the machine this runs on, without
torch, and write DIR/latency.json, a device profile `kdforge students --device-profile` ranks candidates by.
`python -m kdforge.serve.probe BUNDLE --verify`: judge and time a device bundle's files here (serve/verdict.py) and
write device-report.json; exit 1 naming each file that fails its tolerance on this device.

    docker run --rm -v $PWD/runs/quickstart/students/exports:/probe kdforge-serve python -m kdforge.serve.probe /probe
    python -m kdforge.serve.probe quickstart.tar --verify --seconds 60      # on the board, after copying the bundle

DIR is an export folder (it holds metadata.json) or a folder of them, as `kdforge students` leaves its candidates
in runs/<recipe>/students/exports/. Each servable file whose runtime is installed here is opened with the
server's own sessions (the same runtimes and preprocessing as `kdforge serve`), fed random normalized images at
`--batch`, and timed after warm-up: p50 and p95 per call. latency.json records this machine (CPU, architecture)
and the runtimes' versions; every file is identified by its sha256, so a profile is only applied to the files it
measured. With `--seconds S`, each file is also timed sustained for S seconds (p50/p95 per window) and the
peak memory its session added is recorded: what `[student.search] max_memory_mb` bounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from kdforge import device
from kdforge.errors import KdforgeError
from kdforge.fileio import check_artifact, read_metadata, write_json
from kdforge.host import cpu_model, peak_memory_mb, reset_peak_memory, resident_memory_mb, runtime_versions
from kdforge.layout import METADATA
from kdforge.phases import Consumer, notify, on_notes
from kdforge.serve.model import SERVABLE, open_session, runtime_missing
from kdforge.timing import latency_ms, sustained_ms

PROFILE = "latency.json"


def export_folders(root: Path) -> list[Path]:
    """`root` when it is an export folder, else the export folders below it (sorted)."""
    if (root / METADATA).is_file():
        return [root]
    return sorted(path.parent for path in root.rglob(METADATA))


def this_machine(threads: int | None) -> dict[str, Any]:
    return {"cpu": cpu_model(), "arch": platform.machine(), "platform": platform.platform(),
            "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "threads": threads, "runtimes": runtime_versions()}


def probe(root: Path, batch: int = 1, repeats: int = 30, warmup: int = 5, threads: int | None = None,
          consumers: Iterable[Consumer] = (), seconds: float = 0) -> dict[str, Any]:
    """Time every servable file of the export folders under `root` (and, for `seconds`, sustained): the profile
    latency.json holds."""
    folders = export_folders(root)
    if not folders:
        raise KdforgeError(f"{root}: no export folder (no {METADATA}) here or below")
    rows, skipped = [], {}
    for folder in folders:
        meta = read_metadata(folder)
        size = int(meta["input_size"])
        rng = np.random.default_rng(0)
        batch_input = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        for fmt, entry in meta["formats"].items():
            where = f"{folder.name}/{fmt}"
            if fmt not in SERVABLE:
                continue
            missing = runtime_missing(fmt)
            if missing:
                skipped[where] = missing
                continue
            reset_peak_memory()
            before = resident_memory_mb()
            try:
                path = check_artifact(folder, entry)
                run, runtime, _, settings = open_session(path, fmt, ("cpu",), None, entry, threads)
            except KdforgeError as exc:
                skipped[where] = str(exc)
                continue
            notify(consumers, f"{where} ({runtime})")
            p50, p95 = latency_ms(partial(run, batch_input), warmup, repeats)
            row = {"model": meta["model"], "format": fmt, "input_size": size, "batch": batch,
                   "file": str(path.relative_to(root)), "sha256": entry["sha256"], "bytes": entry["bytes"],
                   "runtime": runtime, "execution": settings, "latency_p50_ms": round(p50, 3),
                   "latency_p95_ms": round(p95, 3)}
            if seconds > 0:
                series = sustained_ms(partial(run, batch_input), seconds)
                row.update(latency_sustained_p50_ms=series[-1]["p50_ms"],
                           latency_sustained_p95_ms=series[-1]["p95_ms"], windows=series)
            rows.append({**row, "memory_mb": round(max(0.0, peak_memory_mb() - before), 1)})
    return {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": this_machine(threads),
            "settings": {"batch": batch, "repeats": repeats, "warmup": warmup, "threads": threads,
                         "seconds": seconds},
            "rows": rows, "skipped": skipped}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdforge.serve.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="an export folder, or a folder of them (kdforge students' exports); "
                        "with --verify: a device bundle (its folder or .tar, made by `kdforge bundle`)")
    parser.add_argument("--verify", action="store_true", help="judge the bundle's files on this device against the "
                        "PyTorch student, then time them: writes device-report.json, exit 1 if a file fails")
    parser.add_argument("--seconds", type=float, default=None, help="sustained timing per file, in seconds (default: "
                        "60 with --verify, none otherwise)")
    parser.add_argument("--precision", choices=("fp32", "default", "both"), default="fp32",
                        help="--verify: judge kdforge's verified settings (fp32), the runtimes' own defaults on this "
                        "CPU (default: e.g. OpenVINO's BF16), or both (default: fp32)")
    parser.add_argument("--device-name", default=None, help="--verify: how the report names this device (default: "
                        "the host name)")
    parser.add_argument("--batch", type=int, default=1, help="images per timed call (default 1)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per file (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per runtime (default: its own)")
    parser.add_argument("--output", type=Path, default=None, help=f"where to write (default FOLDER/{PROFILE}; with "
                        f"--verify, {device.DEVICE_REPORT} beside the bundle)")
    args = parser.parse_args(argv)
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--warmup must be 0 or more and --threads at least 1")
    if args.seconds is not None and args.seconds < 0:
        parser.error("--seconds must be 0 or more")
    if args.verify:
        verify_main(args)
        return
    if not args.folder.is_dir():
        sys.exit(f"error: {args.folder} is not a folder")
    try:
        profile = probe(args.folder, args.batch, args.repeats, args.warmup, args.threads,
                        [on_notes(lambda line: print(f"timing {line}", file=sys.stderr))], args.seconds or 0)
        output = args.output or args.folder / PROFILE
        write_json(output, profile)
    except (KdforgeError, OSError) as exc:
        sys.exit(f"error: {exc}")
    for row in sorted(profile["rows"], key=lambda row: row["latency_p50_ms"]):
        print(f"{row['model']:<32} {row['format']:<14} p50 {row['latency_p50_ms']:9.2f} ms   "
              f"p95 {row['latency_p95_ms']:9.2f} ms")
    for where, why in profile["skipped"].items():
        print(f"{where}: not timed: {why}")
    print(f"{len(profile['rows'])} files timed on {profile['machine']['cpu']} ({profile['machine']['arch']}): {output}")


def verify_main(args: argparse.Namespace) -> None:
    """`--verify`: the bundle judged and timed here, device-report.json written, one line per file; exit 1 naming
    the files that failed with kdforge's settings."""
    from kdforge.serve.verdict import verify_bundle

    precisions = ("fp32", "default") if args.precision == "both" else (args.precision,)
    seconds = 60.0 if args.seconds is None else args.seconds
    if seconds <= 0:
        sys.exit("error: --verify times each file sustained: --seconds must be more than 0")
    bundle_path = args.folder
    output = args.output or (bundle_path / device.DEVICE_REPORT if bundle_path.is_dir()
                             else bundle_path.parent / device.DEVICE_REPORT)
    try:
        with device.open_bundle(bundle_path) as bundle:
            report = verify_bundle(bundle, seconds, args.threads, precisions, args.device_name,
                                   consumers=[on_notes(lambda line: print(f"probe: {line}", file=sys.stderr,
                                                                          flush=True))])
        write_json(output, report)
    except (KdforgeError, OSError) as exc:
        sys.exit(f"error: {exc}")
    for line in verdict_lines(report):
        print(line)
    print(f"{len(report['rows'])} files judged on {report['device']['cpu']} ({report['device']['arch']}): {output}")
    failed = [row for row in device.shipped_rows(report) if not row["passed"]]
    if failed:
        for row in failed:
            print(f"error: {row['file']} ({row['format']}) FAILED on this device: {'; '.join(row['failures'])}",
                  file=sys.stderr)
        sys.exit(1)


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """One line per judged file: verdict, device vs host top-1, agreement with the PyTorch student, latency."""
    lines = []
    for row in report["rows"]:
        head = f"{row['format']:<14} {row['setting']:<8} {'PASS' if row['passed'] else 'FAILED':<7}"
        if "verdict" not in row:
            lines.append(f"{head} {'; '.join(row['failures'])}")
            continue
        verdict, host = row["verdict"], row["host"]
        lines.append(f"{head} top-1 {verdict['candidate_top1']:.2%} (host {row['host_verdict']['candidate_top1']:.2%}"
                     f", PyTorch {verdict['reference_top1']:.2%})  agreement {verdict['agreement']:.2%}  "
                     f"top-1 changed vs host: {host['top1_changed']}  p50 cold {row['latency_cold_p50_ms']:.2f} ms, "
                     f"sustained {row['latency_sustained_p50_ms']:.2f} ms (p95 {row['latency_sustained_p95_ms']:.2f})"
                     f"  +{row['memory_mb']:.0f} MB")
    lines += [f"{where}: not judged: {why}" for where, why in report["skipped"].items()]
    return lines


if __name__ == "__main__":
    main()
