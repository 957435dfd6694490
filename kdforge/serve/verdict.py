"""The verdict on the device: `python -m kdforge.serve.probe BUNDLE --verify` runs every file of a device bundle
(kdforge/device.py) whose runtime is installed here through the server's own session and preprocessing, judges its
logits against the PyTorch student's with the arithmetic `kdforge verify` uses (`parity.compare`, the bundle's
[verify] tolerances), names the images whose top-1 changed from the host's run of the same file, then times it
sustained and measures the memory it added. Torch-free: it runs in the serving image and on a board.

    report = verify_bundle(bundle, seconds=60, threads=None, precisions=("fp32",), name="pi5")
    report["rows"][0]["passed"], report["rows"][0]["latency_sustained_p95_ms"]

`precisions=("fp32", "default")` also judges and times each file with the runtime's own default settings on this
CPU (OpenVINO's BF16/FP16 inference precision, NCNN's FP16 arithmetic): rows with `setting: "default"`, so a user
can see whether the faster setting keeps the answers before shipping it. Only the "fp32" rows (kdforge's settings:
what is verified, served and timed) decide the exit code.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from datetime import datetime, timezone
from functools import partial
from typing import Any

import numpy as np

from kdforge import device
from kdforge.device import Bundle
from kdforge.errors import KdforgeError
from kdforge.fileio import check_artifact
from kdforge.formats import FORMATS
from kdforge.host import describe_device, peak_memory_mb, reset_peak_memory, resident_memory_mb, runtime_versions
from kdforge.images import normalize_batch
from kdforge.parity import compare
from kdforge.phases import Consumer, notify
from kdforge.serve.model import open_session, runtime_missing
from kdforge.timing import latency_ms, sustained_ms

# images per call while judging: one, as the server's /predict runs them (a runtime may answer a batch of one
# differently from a larger batch: OpenVINO 2025's INT8 CPU kernels did, measured on an AVX-512/AMX Xeon)
JUDGE_BATCH = 1
COLD_REPEATS, COLD_WARMUP = 30, 3
MAX_CHANGED = 50  # images listed per file whose top-1 changed from the host's run
# the runtimes whose default settings are kdforge's own: nothing more to judge with --precision default
SAME_DEFAULTS = {"onnxruntime": "ONNX Runtime's CPU defaults are the settings verified",
                 "litert": "LiteRT's XNNPACK defaults are the settings verified"}


def changed_from_host(bundle: Bundle, host: np.ndarray, here: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Where the device's run of a file differs from the host's run of the same file on the same inputs: the
    agreement of their top-1, the largest logit difference, and the images whose top-1 changed (bundle position,
    test-split index, label, the host's and the device's class)."""
    host_top, here_top = host.argmax(1), here.argmax(1)
    changed = np.flatnonzero(host_top != here_top)
    indices = bundle.array(device.INDICES)
    names = bundle.manifest["class_names"]
    return {"agreement": float(np.mean(host_top == here_top)), "max_abs_diff": float(np.abs(host - here).max()),
            "top1_changed": int(len(changed)),
            "images": [{"image": int(i), "test_index": int(indices[i]), "label": names[int(labels[i])],
                        "host": names[int(host_top[i])], "device": names[int(here_top[i])]}
                       for i in changed[:MAX_CHANGED]]}


def judge_file(bundle: Bundle, name: str, entry: dict[str, Any], x: np.ndarray, setting: str,
               threads: int | None, seconds: float, windows: int) -> dict[str, Any]:
    """One file of the bundle, judged and timed here with `setting` ("fp32": kdforge's, "default": the
    runtime's). A file that changed on the way or does not load is a failed row, not an error."""
    row: dict[str, Any] = {"format": name, "file": entry["file"], "sha256": entry["sha256"], "bytes": entry["bytes"],
                           "precision": entry["precision"], "setting": setting, "model": bundle.manifest["model"],
                           "input_size": bundle.manifest["input_size"], "batch": 1}
    try:
        check_artifact(bundle.root, entry)
    except KdforgeError as exc:
        return {**row, "passed": False, "failures": [f"the file is not the one bundled: {exc}"]}
    labels, reference = bundle.array(device.LABELS), bundle.array(device.REFERENCE)
    reset_peak_memory()
    before = resident_memory_mb()
    try:
        opened = open_session(bundle.root / entry["file"], name, ("cpu",), None, entry, threads, setting)
        logits = np.concatenate([opened.run(x[i:i + JUDGE_BATCH]) for i in range(0, len(x), JUDGE_BATCH)])
    except (KdforgeError, RuntimeError, ValueError) as exc:  # runtimes raise their own errors on a bad graph
        return {**row, "passed": False, "failures": [f"it does not run here: {str(exc).splitlines()[0][:300]}"]}
    if logits.shape != reference.shape:
        return {**row, "runtime": opened.runtime, "passed": False,
                "failures": [f"it answers {logits.shape[1:]} per image, the PyTorch student {reference.shape[1:]}: "
                             f"not the file of this student"]}
    verdict = compare("pytorch (host, fp32)", opened.runtime, reference, logits, labels,
                      bundle.tolerance(entry["precision"]))
    host = changed_from_host(bundle, bundle.array(entry["host_logits"]), logits, labels)
    one = x[:1]
    cold_p50, cold_p95 = latency_ms(partial(opened.run, one), COLD_WARMUP, COLD_REPEATS)
    series = sustained_ms(partial(opened.run, one), seconds, windows)
    return {**row, "runtime": opened.runtime, "execution": opened.settings, "passed": verdict.passed,
            "failures": list(verdict.failures), "verdict": verdict.to_dict(), "host": host,
            "host_verdict": {key: entry["host_verdict"][key] for key in
                             ("candidate_top1", "candidate_top5", "agreement", "max_abs_diff", "passed")},
            "latency_cold_p50_ms": round(cold_p50, 3), "latency_cold_p95_ms": round(cold_p95, 3),
            "latency_p50_ms": series[-1]["p50_ms"], "latency_p95_ms": series[-1]["p95_ms"],
            "latency_sustained_p50_ms": series[-1]["p50_ms"], "latency_sustained_p95_ms": series[-1]["p95_ms"],
            "windows": series, "memory_mb": round(max(0.0, peak_memory_mb() - before), 1)}


def verify_bundle(bundle: Bundle, seconds: float = 60, threads: int | None = None,
                  precisions: tuple[str, ...] = ("fp32",), name: str | None = None, windows: int = 6,
                  consumers: Iterable[Consumer] = ()) -> dict[str, Any]:
    """Every file of `bundle` whose runtime is installed here, judged and timed (`seconds` of sustained calls at
    batch 1, in `windows` windows): the device report (kdforge/device.py)."""
    x = normalize_batch(bundle.array(device.IMAGES), bundle.manifest["mean"], bundle.manifest["std"])
    rows, skipped = [], {}
    for fmt, entry in bundle.formats.items():
        missing = runtime_missing(fmt)
        if missing:
            skipped[fmt] = missing
            continue
        for setting in precisions:
            runner = FORMATS.get(fmt).runner
            if setting == "default" and runner in SAME_DEFAULTS:
                skipped[f"{fmt} (default settings)"] = SAME_DEFAULTS[runner]
                continue
            notify(consumers, f"{fmt} ({setting} settings): judging {len(x)} images, then timing for {seconds:g} s")
            rows.append(judge_file(bundle, fmt, entry, x, setting, threads, seconds, windows))
    return {"kind": device.REPORT_KIND, "version": device.VERSION,
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": {"name": name or socket.gethostname(), **describe_device()},
            "runtimes": runtime_versions(),
            "bundle": {"model": bundle.manifest["model"], "recipe": bundle.manifest["recipe"],
                       "images": bundle.manifest["images"], "manifest": device.bundle_digest(bundle),
                       "host": bundle.manifest["host"]},
            "settings": {"batch": 1, "seconds": seconds, "windows": windows, "threads": threads,
                         "precisions": list(precisions)},
            "rows": rows, "skipped": skipped}

