"""The served model: an exported student (ONNX, INT8 ONNX, FP16 ONNX, OpenVINO IR, LiteRT or NCNN) with its
preprocessing, without torch.

    model = ServedModel.load(Path("exports/quickstart"))
    model.predict([png_bytes], top_k=5)   # [[{"label": "red_disk", "index": 0, "probability": 0.93}, ...]]

Images (PNG, JPEG, WebP, BMP, GIF, TIFF, within a pixel budget) are decoded by `kdforge.images.decode_rgb`, the
same function ImageFolder datasets use, and normalized with the mean/std recorded at export.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from kdforge import device, sessions
from kdforge.errors import KdforgeError, ServingError
from kdforge.fileio import check_artifact, read_json, read_metadata
from kdforge.formats import FORMATS, servable
from kdforge.images import MAX_PIXELS, ImageError, decode_rgb, normalize
from kdforge.layout import BENCH, VERIFY
from kdforge.sessions import Opened

# export formats a server can load (the formats table's `serve_rank`). "auto" serves the fastest verified one
# that `kdforge bench` measured (`choose_format`); without a bench.json, in this order of preference: INT8
# (smaller, usually faster on CPU), FP32, then FP16 (for GPUs: ONNX Runtime's CPU kernels compute it in FP32
# behind casts), then the OpenVINO IRs, the LiteRT models and the NCNN model, each where its runtime is installed
# (SERVING_RUNTIMES); only an artifact that passed verification is chosen automatically
SERVABLE = {name: FORMATS.get(name).filename for name in servable()}
# the module each kind of served file needs, and the extra that installs it beside `serve` (numpy only, no torch)
SERVING_RUNTIMES = {"onnxruntime": ("onnxruntime", "serve"), "openvino": ("openvino", "serve-openvino"),
                    "litert": ("ai_edge_litert", "serve-litert"), "ncnn": ("ncnn", "serve-ncnn")}


def runtime_missing(fmt: str) -> str | None:
    """Why this server cannot run format `fmt` (its runtime is not installed, and what installs it), or None."""
    module, extra = SERVING_RUNTIMES[FORMATS.get(fmt).runner]
    if find_spec(module) is not None:
        return None
    return (f"its runtime ({module}) is not installed: pip install \"kdforge[{extra}]\" (the serving image: docker "
            f"build --build-arg EXTRAS=serve,{extra} ...)")


DEFAULT_PROVIDERS = ("cuda", "cpu")  # ONNX Runtime's (kdforge.sessions.ORT_PROVIDERS); TensorRT when asked for
# what /metadata says about how an image reaches the model, and how that relates to what verification measured
PREPROCESSING = ("decoded, resized to {size}x{size} with Pillow (bilinear, antialiased when reducing), normalized "
                 "with the export's mean/std: the arithmetic verification used on the test split, exactly for "
                 "{size}x{size} images; a resized image is within one uint8 step of verification's (torch) resize")


def choose_format(export_dir: Path, verified: dict[str, Any], bench: dict[str, Any],
                  on_device: dict[str, str] | None = None) -> tuple[str, str]:
    """The format `--format auto` serves, and why: the fastest format that passed verification as `kdforge bench`
    measured it on this export (batch-1 p50 latency), else a verified INT8, else the verified FP32 ONNX. With
    `on_device` (format -> why not, for the formats a device report did not pass: `device_refusals`), only the
    formats that passed on that device are candidates."""
    candidates = [f for f in SERVABLE if (export_dir / SERVABLE[f]).is_file() and runtime_missing(f) is None]
    if not candidates:
        raise ServingError(f"{export_dir} holds no {' or '.join(SERVABLE.values())}")
    if on_device is not None:
        candidates = [f for f in candidates if f not in on_device]
        if not candidates:
            raise ServingError("no format of this export passed on the device report's device: " + "; ".join(
                f"{name}: {why}" for name, why in on_device.items()))
    passed = [f for f in candidates if verified.get(f, {}).get("passed")]
    measured = {row["format"]: row["latency_p50_ms"] for row in bench.get("rows", []) if row["format"] in passed}
    if measured:
        fastest = min(measured, key=measured.get)
        timings = ", ".join(f"{name} {ms:.2f} ms" for name, ms in sorted(measured.items(), key=lambda kv: kv[1]))
        measured_on = bench.get("machine", {})  # "processor": how an older bench.json named the CPU
        machine = measured_on.get("cpu", measured_on.get("processor", "this machine"))
        return fastest, f"the fastest verified format in bench.json (batch-1 p50 on {machine}: {timings})"
    if passed:
        return passed[0], (f"verified; no bench.json to compare speeds, so {' before '.join(SERVABLE)} "
                           f"is the order of preference")
    if on_device is not None:  # passed on the device, though not verified on this host
        return candidates[0], "passed on the device report's device (not verified on this host)"
    fallback = "onnx" if "onnx" in candidates else candidates[0]  # FP32 is exact by construction
    return fallback, f"no format passed verification: serving {fallback} unverified"


def device_refusals(meta: dict[str, Any], report: dict[str, Any]) -> dict[str, str]:
    """format -> why it may not be served under a device report: it failed there, or that device never judged
    this very file (its sha256). The formats not named passed on the report's device."""
    passed, failed = device.passed_on_device(report), device.failed_on_device(report)
    where = device.device_name(report)
    refusals = {}
    for name in SERVABLE:
        entry = meta["formats"].get(name)
        if entry is None or entry["sha256"] in passed:
            continue
        if entry["sha256"] in failed:
            refusals[name] = f"FAILED on {where}: {'; '.join(failed[entry['sha256']].get('failures', []))}"
        else:
            refusals[name] = f"not judged on {where} (the report holds no verdict on this file)"
    return refusals


def open_session(path: Path, fmt: str, providers: tuple[str, ...], engine_cache: Path | None,
                 entry: dict[str, Any] | None = None, threads: int | None = None,
                 precision: str = "fp32") -> Opened:
    """The session verification opened (kdforge/sessions.py: a function from a float32 batch to logits, the
    runtime computing it, the settings it uses): ONNX Runtime on the first installed of `providers`, OpenVINO's CPU
    plugin in FP32 arithmetic, LiteRT or NCNN (`entry`: the format's metadata.json entry, e.g. LiteRT's batch_axis;
    `threads`: the runtime's CPU threads, default: its own; `precision`: "fp32", the verified arithmetic, or
    "default", the runtime's own choice on this CPU)."""
    missing = runtime_missing(fmt)
    if missing:
        raise ServingError(f"{path.name} cannot be served here: {missing}")
    try:
        return sessions.open_session(path, FORMATS.get(fmt).runner, providers, threads, precision,
                                     batch_axis=bool((entry or {}).get("batch_axis", False)),
                                     engine_cache=engine_cache)
    except KdforgeError as exc:
        raise ServingError(str(exc)) from None


@dataclass
class ServedModel:
    run: Callable[[np.ndarray], np.ndarray]  # float32 (N, 3, size, size) -> logits (N, classes)
    size: int
    mean: np.ndarray
    std: np.ndarray
    labels: list[str]
    info: dict[str, Any]  # what /metadata reports
    max_pixels: int = MAX_PIXELS  # decode budget per image (kdforge.images)

    @classmethod
    def load(cls, export_dir: Path, fmt: str = "auto", providers: tuple[str, ...] = DEFAULT_PROVIDERS,
             engine_cache: Path | None = None, max_pixels: int = MAX_PIXELS,
             device_report: Path | None = None) -> ServedModel:
        """The export's `fmt` ("auto": `choose_format`); with `device_report` (a probe's device-report.json), only
        a format that passed on that device (`device_refusals`)."""
        try:
            meta = read_metadata(export_dir)
            verified = read_json(export_dir / VERIFY)
            judged = device.read_device_report(device_report) if device_report else None
        except KdforgeError as exc:  # missing, damaged or incomplete
            raise ServingError(str(exc)) from None
        refusals = device_refusals(meta, judged) if judged else None
        why = "asked for with --format"
        if fmt == "auto":
            try:
                bench, damaged = read_json(export_dir / BENCH), ""
            except KdforgeError:  # speeds are a preference, not a requirement: choose without them
                bench, damaged = {}, " (bench.json is damaged: ignored; `kdforge bench` writes it again)"
            fmt, why = choose_format(export_dir, verified, bench, refusals)
            why += damaged
        if fmt not in SERVABLE:
            raise ServingError(f"unknown format {fmt!r}: serve auto, {', '.join(SERVABLE)}")
        if refusals and fmt in refusals:
            raise ServingError(f"{fmt} is not served under {device_report}: {refusals[fmt]}")
        if fmt not in meta["formats"] or not (export_dir / SERVABLE[fmt]).is_file():
            raise ServingError(f"{export_dir} holds no {fmt} export ({SERVABLE[fmt]}); export it, or serve another "
                               f"--format")
        try:
            check_artifact(export_dir, meta["formats"][fmt])  # the very file that was exported (sha256)
        except KdforgeError as exc:
            raise ServingError(str(exc)) from None
        digest = meta["formats"][fmt]["sha256"]
        run, runtime, _, _ = open_session(export_dir / SERVABLE[fmt], fmt, providers, engine_cache,
                                          meta["formats"][fmt])
        size = int(meta["input_size"])
        # one inference before the server says it is healthy: the TensorRT provider builds its engine here
        run(np.zeros((1, 3, size, size), np.float32))
        report = verified.get(fmt, {})
        if report.get("artifact_sha256") != digest:  # a verification of another file does not count
            report = {}
        info = {
            "model": meta["model"], "recipe": meta["recipe"], "format": fmt, "file": SERVABLE[fmt],
            "input_size": meta["input_size"], "num_classes": meta["num_classes"],
            "provider": runtime, "chosen_because": why, "sha256": digest,
            "verified": bool(report.get("passed")),
            "test_top1": report.get("candidate_top1"), "pytorch_test_top1": report.get("reference_top1"),
            "preprocessing": PREPROCESSING.format(size=size),
        }
        if judged:
            info["device"] = {"name": device.device_name(judged), "passed": True,
                              "report_measured_at": judged.get("measured_at")}
        if not info["verified"]:
            # what /metadata tells any client: no path of this host (the start-up line adds the folder)
            info["warning"] = (f"{SERVABLE[fmt]} has not passed verification against the PyTorch student: its "
                               f"answers may differ; run `kdforge verify` on its export folder")
        return cls(run, size,
                   np.asarray(meta["mean"], np.float32).reshape(3, 1, 1),
                   np.asarray(meta["std"], np.float32).reshape(3, 1, 1), list(meta["class_names"]), info,
                   max_pixels)

    def preprocess(self, data: bytes) -> np.ndarray:
        """Image bytes -> normalized float32 (3, size, size): decoded and resized as `kdforge.images.decode_rgb`
        says, normalized by `kdforge.images.normalize` (the contract test_serve_parity.py holds verification to)."""
        return normalize(decode_rgb(data, self.size, self.max_pixels), self.mean, self.std)

    def prepare(self, images: list[bytes]) -> np.ndarray:
        """Encoded images -> the model's float32 batch (N, 3, size, size); a bad image is named by its number."""
        prepared = []
        for number, data in enumerate(images, 1):
            try:
                prepared.append(self.preprocess(data))
            except ImageError as exc:
                if len(images) == 1:
                    raise
                raise type(exc)(f"image {number} of {len(images)}: {exc}") from None
        return np.stack(prepared).astype(np.float32)

    def logits(self, images: list[bytes]) -> np.ndarray:
        """The model's float32 logits (N, classes) for encoded images (what the Open Inference Protocol returns)."""
        return self.run(self.prepare(images))

    def predict(self, images: list[bytes], top_k: int = 5) -> list[list[dict[str, Any]]]:
        logits = self.logits(images).astype(np.float64)
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        k = min(top_k, probabilities.shape[1])
        results = []
        for row in probabilities:
            top = np.argsort(-row, kind="stable")[:k]
            results.append([{"label": self.labels[i], "index": int(i), "probability": round(float(row[i]), 6)}
                            for i in top])
        return results


def predict_files(served: ServedModel, paths: list[Path], top_k: int = 5):
    """(path, top-k predictions) for each image file, in order (`kdforge predict`); an unreadable file is an
    ImageError naming it."""
    for path in paths:
        if not path.is_file():
            raise ImageError(f"{path}: no such file")
        try:
            yield path, served.predict([path.read_bytes()], top_k)[0]
        except ImageError as exc:
            raise ImageError(f"{path}: {exc}") from None
