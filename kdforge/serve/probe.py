"""`python -m kdforge.serve.probe DIR`: time every exported file under DIR on the machine this runs on, without
torch, and write DIR/latency.json, a device profile `kdforge students --device-profile` ranks candidates by.

    docker run --rm -v $PWD/runs/quickstart/students/exports:/probe kdforge-serve python -m kdforge.serve.probe /probe

DIR is an export folder (it holds metadata.json) or a folder of them, as `kdforge students` leaves its candidates
in runs/<recipe>/students/exports/. Each servable file whose runtime is installed here is opened with the
server's own sessions (the same runtimes and preprocessing as `kdforge serve`), fed random normalized images at
`--batch`, and timed after warm-up: p50 and p95 per call. latency.json records this machine (CPU, architecture)
and the runtimes' versions; every file is identified by its sha256, so a profile is only applied to the files it
measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import datetime, timezone
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from kdforge.errors import KdforgeError
from kdforge.fileio import check_artifact, read_metadata, write_json
from kdforge.host import cpu_model
from kdforge.layout import METADATA
from kdforge.serve.model import SERVABLE, open_session, runtime_missing
from kdforge.timing import latency_ms

PROFILE = "latency.json"
RUNTIME_PACKAGES = ("onnxruntime", "openvino", "ai-edge-litert", "ncnn")


def export_folders(root: Path) -> list[Path]:
    """`root` when it is an export folder, else the export folders below it (sorted)."""
    if (root / METADATA).is_file():
        return [root]
    return sorted(path.parent for path in root.rglob(METADATA))


def this_machine(threads: int | None) -> dict[str, Any]:
    runtimes = {}
    for package in RUNTIME_PACKAGES:
        try:
            runtimes[package] = version(package)
        except PackageNotFoundError:
            pass
    return {"cpu": cpu_model(), "arch": platform.machine(), "platform": platform.platform(),
            "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "threads": threads, "runtimes": runtimes}


def probe(root: Path, batch: int = 1, repeats: int = 30, warmup: int = 5, threads: int | None = None,
          progress=None) -> dict[str, Any]:
    """Time every servable file of the export folders under `root`; the profile latency.json holds."""
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
            try:
                path = check_artifact(folder, entry)
                run, runtime = open_session(path, fmt, ("cpu",), None, entry, threads)
            except KdforgeError as exc:
                skipped[where] = str(exc)
                continue
            if progress:
                progress(f"{where} ({runtime})")
            p50, p95 = latency_ms(partial(run, batch_input), warmup, repeats)
            rows.append({"model": meta["model"], "format": fmt, "input_size": size, "batch": batch,
                         "file": str(path.relative_to(root)), "sha256": entry["sha256"], "bytes": entry["bytes"],
                         "runtime": runtime, "latency_p50_ms": round(p50, 3), "latency_p95_ms": round(p95, 3)})
    return {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": this_machine(threads),
            "settings": {"batch": batch, "repeats": repeats, "warmup": warmup, "threads": threads},
            "rows": rows, "skipped": skipped}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdforge.serve.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="an export folder, or a folder of them (kdforge students' exports)")
    parser.add_argument("--batch", type=int, default=1, help="images per timed call (default 1)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per file (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per runtime (default: its own)")
    parser.add_argument("--output", type=Path, default=None, help=f"where to write (default FOLDER/{PROFILE})")
    args = parser.parse_args(argv)
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--warmup must be 0 or more and --threads at least 1")
    if not args.folder.is_dir():
        sys.exit(f"error: {args.folder} is not a folder")
    try:
        profile = probe(args.folder, args.batch, args.repeats, args.warmup, args.threads,
                        lambda line: print(f"timing {line}", file=sys.stderr))
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


if __name__ == "__main__":
    main()
