"""`kdforge bundle EXPORT_DIR` (and `kdforge export --bundle`): a self-contained, torch-free folder (and .tar) that
the probe verifies on a device: the export's servable files, N test-split images (stratified by class) as the
server holds them after decoding, their labels, the PyTorch student's FP32 logits on exactly those images, the host's
run of each file, and the recipe's [verify] tolerances. kdforge/device.py says what is in it and reads it.

    result = make_bundle(Path("exports/quickstart"), Path("bundles/quickstart"), images=1000)
    result.folder, result.tar, result.bytes

The images are resized to the student's input size with the server's own resize (`images.resize_rgb`) and stored
as uint8; the PyTorch student and every runtime read them through the same normalization (`InputSpec.prepare`,
`images.normalize_batch`: the same float32 arithmetic), so a verdict on the device compares kernels, not two
preprocessing pipelines.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdforge import device, layout
from kdforge.data import load_dataset
from kdforge.data.loader import read_batches
from kdforge.data.transforms import InputSpec
from kdforge.errors import KdforgeError
from kdforge.fileio import check_artifact, check_can_create, file_hash, folder_lock, read_json, write_json
from kdforge.formats import FORMATS, servable
from kdforge.host import describe_device
from kdforge.images import normalize_batch, resize_rgb
from kdforge.judge import resolve_verify_batch
from kdforge.models import load_stage_model
from kdforge.parity import compare
from kdforge.phases import Consumer, notify
from kdforge.runners import TorchRunner
from kdforge.runtime import runtime_scope
from kdforge.sessions import open_session
from kdforge.verify import read_export_source

DEFAULT_IMAGES = 1000
HOST_BATCH = 1  # images per call of the host's sessions: as the device's probe and the server's /predict run them


@dataclass(frozen=True)
class BundleResult:
    folder: Path
    tar: Path
    bytes: int  # the .tar's size
    images: int
    formats: list[str]
    skipped: dict[str, str]  # servable formats of the export left out, and why


def stratified(labels: np.ndarray, count: int) -> np.ndarray:
    """Positions of `count` images spread evenly over the classes (round robin over the classes, each in test-split
    order), sorted; every image when the split holds no more than `count`."""
    by_class = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    picked: list[int] = []
    for rank in range(max((len(positions) for positions in by_class), default=0)):
        picked += [int(positions[rank]) for positions in by_class if rank < len(positions)]
        if len(picked) >= count:
            break
    return np.sort(np.asarray(picked[:count], dtype=np.int64))


def bundle_formats(meta: dict[str, Any], verified: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The export's formats a device can run without torch (the servable ones) that passed verification here, and
    why the others are left out."""
    chosen, skipped = [], {}
    for name in meta["formats"]:
        if name not in servable():
            continue
        if not verified.get(name, {}).get("passed"):
            skipped[name] = "it has not passed verification on this machine (`kdforge verify` it first)"
        else:
            chosen.append(name)
    return chosen, skipped


def make_bundle(export_dir: Path, out: Path, images: int = DEFAULT_IMAGES, formats: list[str] | None = None,
                consumers: list[Consumer] | None = None) -> BundleResult:
    """Write the device bundle of `export_dir` to folder `out` and `out`.tar (both replaced when they hold an
    earlier bundle). Every input is checked before anything is written."""
    consumers = consumers or []
    if images < 1:
        raise KdforgeError("--bundle-images must be at least 1")
    source = read_export_source(export_dir)  # the student's weights checked against the export's record
    meta = source.meta
    verified = read_json(export_dir / layout.VERIFY)
    names, skipped = bundle_formats(meta, verified)
    if formats:
        unknown = [name for name in formats if name not in names]
        if unknown:
            why = "; ".join(f"{name}: {skipped.get(name, 'not a servable format of this export')}" for name in unknown)
            raise KdforgeError(f"{export_dir}: cannot bundle {', '.join(unknown)} ({why})")
        names = list(formats)
    if not names:
        raise KdforgeError(f"{export_dir}: no verified file a device can run without torch (ONNX, OpenVINO, LiteRT, "
                           f"NCNN); export one (kdforge export --format onnx) first")
    entries = {name: meta["formats"][name] for name in names}
    for entry in entries.values():
        check_artifact(export_dir, entry)
    if out.exists() and not (out / device.MANIFEST).is_file():
        raise KdforgeError(f"{out} exists and is not a bundle: pass another --out")
    check_can_create(out.parent, "bundle folder")

    size, mean, std = int(meta["input_size"]), meta["mean"], meta["std"]
    data = load_dataset(source.recipe.data, source.recipe.seed).test
    labels_all = data.labels.numpy()
    positions = stratified(labels_all, images)
    notify(consumers, f"bundle: {len(positions)} test images of {len(np.unique(labels_all[positions]))} classes at "
                      f"{size}x{size}, formats {', '.join(names)}")
    pixels = bundle_images(data, positions, size)
    reference = reference_logits(source, pixels, meta)

    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    with folder_lock(out.parent / f".{out.name}", "bundle folder"):
        try:
            (building / device.HOST).mkdir(parents=True)
            np.save(building / device.IMAGES, pixels)
            np.save(building / device.LABELS, labels_all[positions].astype(np.int64))
            np.save(building / device.INDICES, positions)
            np.save(building / device.REFERENCE, reference)
            formats_record = {}
            x = normalize_batch(pixels, mean, std)
            for name, entry in entries.items():
                notify(consumers, f"bundle: {name} on this machine")
                try:
                    formats_record[name] = host_run(export_dir, building, name, entry, x, reference,
                                                    labels_all[positions], source.checks)
                except KdforgeError as exc:  # its runtime is not installed here: the host's run cannot be recorded
                    skipped[name] = str(exc)
            if not formats_record:
                raise KdforgeError(f"{export_dir}: no file could run here: " + "; ".join(skipped.values()))
            names = list(formats_record)
            files = {str(path.relative_to(building)): file_hash(path) for path in sorted(building.rglob("*"))
                     if path.is_file()}
            write_json(building / device.MANIFEST, {
                "kind": device.BUNDLE_KIND, "version": device.VERSION,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model": meta["model"], "recipe": meta["recipe"], "export": str(export_dir),
                "checkpoint_sha256": meta["checkpoint_sha256"],
                "input_size": size, "mean": mean, "std": std, "class_names": meta["class_names"],
                "num_classes": meta["num_classes"], "images": len(positions), "image_layout": "NHWC uint8",
                "tolerances": {p: dict(getattr(source.checks, p)) for p in ("fp32", "fp16", "int8")},
                "formats": formats_record, "host": describe_device(), "files": files})
            shutil.rmtree(out, ignore_errors=True)
            building.rename(out)
        finally:
            shutil.rmtree(building, ignore_errors=True)
        tar = out.with_suffix(".tar")
        packing = tar.with_name(f".{tar.name}.tmp-{os.getpid()}")
        with tarfile.open(packing, "w") as archive:
            archive.add(out, arcname=out.name)
        packing.replace(tar)
    return BundleResult(out, tar, tar.stat().st_size, len(positions), names, skipped)


def bundle_images(data, positions: np.ndarray, size: int) -> np.ndarray:
    """The test images at `positions` as uint8 (N, size, size, 3), resized as the server resizes."""
    batch = next(iter(read_batches(data.images, [torch.from_numpy(positions)])))  # uint8 (N, 3, H, W)
    return np.stack([resize_rgb(image.permute(1, 2, 0).numpy(), size) for image in batch])


def reference_logits(source, pixels: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """The PyTorch student's FP32 logits on the bundle's images (on the CPU, true FP32, as verification runs it)."""
    cfg = source.recipe.model_for(source.stage_dir.name)
    spec = InputSpec(int(meta["input_size"]), tuple(meta["mean"]), tuple(meta["std"]))
    batch = resolve_verify_batch(source.checks.batch_size, cfg)
    with runtime_scope(source.recipe.runtime, "cpu") as runtime:
        model = load_stage_model(source.stage_dir, int(meta["num_classes"]), recipe=source.recipe)
        runner = TorchRunner(model, spec, runtime)
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        return torch.cat([runner.predict(images[i:i + batch]) for i in range(0, len(images), batch)]).numpy()


def host_run(export_dir: Path, building: Path, name: str, entry: dict[str, Any], x: np.ndarray,
             reference: np.ndarray, labels: np.ndarray, checks) -> dict[str, Any]:
    """Copy format `name`'s files into the bundle and run them here through the device's session (the server's):
    the host's logits (host/<name>.npy) and verdict, what the device's run is compared with."""
    opened = open_session(export_dir / entry["file"], FORMATS.get(name).runner,
                          batch_axis=bool(entry.get("batch_axis", False)))
    for key in ("file", "weights_file"):
        if key in entry:
            shutil.copy2(export_dir / entry[key], building / entry[key])
    logits = np.concatenate([opened.run(x[i:i + HOST_BATCH]) for i in range(0, len(x), HOST_BATCH)])
    np.save(building / device.HOST / f"{name}.npy", logits.astype(np.float32))
    verdict = compare("pytorch (cpu, fp32)", opened.runtime, reference, logits, labels, getattr(checks,
                                                                                              entry["precision"]))
    kept = {key: entry[key] for key in ("file", "sha256", "bytes", "precision", "weights_file", "weights_sha256",
                                        "weights_bytes", "batch_axis") if key in entry}
    return {**kept, "host_logits": f"{device.HOST}/{name}.npy", "host_runtime": opened.runtime,
            "host_settings": opened.settings, "host_verdict": verdict.to_dict()}
