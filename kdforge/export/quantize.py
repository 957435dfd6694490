"""INT8 post-training quantization of an exported student: calibration data and the accuracy-aware search.

Calibration images come from the TRAINING split (never the test split), prepared exactly as at inference.
In accuracy-aware mode (`[quantize] max_top1_drop`), held-out images measure each quantized layer's sensitivity:
the validation split (`[data] val_fraction`, images the student never trained on), or without one a slice of the
training split disjoint from the calibration images; the most sensitive layers are kept in float,
one at a time, until the top-1 drop is within the tolerance or nothing is left to try. The drop is judged by its
upper one-standard-error bound (`heldout_drop`): a few hundred held-out images measure a top-1 change to about
+-2 points when INT8 changes a third of the answers, and the plain estimate let layers that changed many answers
stay quantized (the quickstart student then failed on the test split).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdforge.data import ImageDataset
from kdforge.data.calibration import draw_calibration
from kdforge.data.transforms import InputSpec
from kdforge.errors import ExportError
from kdforge.export.converters import onnx_to_int8, prepare_for_int8, quantizable_nodes
from kdforge.formats import INPUT_NAME
from kdforge.optional import require
from kdforge.phases import Phases
from kdforge.recipe import QuantizeConfig
from kdforge.rng import rng_stream


class PreparedBatches(Sequence):
    """Calibration batches, float32 prepared for the model when each is read: 512 images at 224 are 300 MB as
    float, held by nothing between reads (the uint8 images stay in memory, the decode cache or their files)."""

    def __init__(self, images, index_batches: list[torch.Tensor], spec: InputSpec) -> None:
        self.images, self.index_batches, self.spec = images, index_batches, spec

    def __len__(self) -> int:
        return len(self.index_batches)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.spec.prepare(self.images[self.index_batches[i]]).numpy()


@dataclass(frozen=True)
class CalibrationData:
    batches: Sequence[np.ndarray]  # float32, prepared for the model (when read)
    count: int
    heldout_images: torch.Tensor  # uint8, for the accuracy-aware search (disjoint from calibration)
    heldout_labels: torch.Tensor
    notes: list[str]  # adjustments made to the request, reported to the user
    heldout_source: str = "held-out training images"  # or "validation images"


def select_calibration(train: ImageDataset, spec: InputSpec, cfg: QuantizeConfig, seed: int,
                       val: ImageDataset | None = None) -> CalibrationData:
    """Calibration batches from the training split, and held-out images for the accuracy-aware checks: from the
    validation split when there is one (images the model never trained on), else a slice of the training split
    disjoint from the calibration images; adjustments are reported."""
    draw = draw_calibration(len(train), cfg, seed)
    batches = PreparedBatches(train.images, draw.batches, spec)
    if val is not None:
        heldout = torch.randperm(len(val), generator=rng_stream(seed, "calibration"))[:cfg.sensitivity_images]
        return CalibrationData(batches, draw.count, val.images[heldout], val.labels[heldout], draw.notes,
                               "validation images")
    return CalibrationData(batches, draw.count, train.images[draw.heldout], train.labels[draw.heldout], draw.notes)


@dataclass
class QuantizeResult:
    path: Path
    float_nodes: list[dict[str, Any]] = field(default_factory=list)  # kept in float, with their sensitivity
    heldout_fp32_top1: float | None = None
    heldout_int8_top1: float | None = None
    heldout_drop_bound: float | None = None  # the drop the search judged (points, with its standard error)
    tried: int = 1  # quantizations run
    notes: list[str] = field(default_factory=list)

    def to_metadata(self) -> dict[str, Any]:
        return {"float_nodes": self.float_nodes, "heldout_fp32_top1": self.heldout_fp32_top1,
                "heldout_int8_top1": self.heldout_int8_top1, "heldout_drop_bound_points": self.heldout_drop_bound,
                "quantizations_tried": self.tried,
                "notes": self.notes}


def predicted_classes(path: Path, batches: list[np.ndarray]) -> np.ndarray:
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {INPUT_NAME: b})[0].argmax(1) for b in batches])


def heldout_drop(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 drop in points from `reference` to `candidate` predictions, plus one standard error of that paired
    difference (sqrt(images lost + images gained) / N): a pessimistic estimate, so that a change measured on a
    small held-out set passes only when few answers changed."""
    lost = int(((reference == labels) & (candidate != labels)).sum())
    gained = int(((reference != labels) & (candidate == labels)).sum())
    return (lost - gained + math.sqrt(lost + gained)) / len(labels) * 100


@dataclass(frozen=True)
class SearchResult:
    kept: list[str]  # nodes kept in float, most sensitive first
    sensitivity: dict[str, float]  # top-1 drop (points) with only that node quantized
    final_drop: float
    tried: int  # drops measured


def keep_sensitive_in_float(nodes: list[str], drop_of, max_drop: float) -> SearchResult:
    """Greedy accuracy-aware search. `drop_of(excluded_nodes)` quantizes all but `excluded_nodes` and returns the
    top-1 drop in points. If quantizing everything drops too much, each node's sensitivity is its drop when it
    alone is quantized; the most sensitive nodes are then kept in float one by one until the drop is within
    `max_drop` or every node is float."""
    current, tried = drop_of([]), 1
    if current <= max_drop:
        return SearchResult([], {}, current, tried)
    sensitivity = {}
    for node in nodes:
        sensitivity[node] = drop_of([n for n in nodes if n != node])
        tried += 1
    kept: list[str] = []
    for node in sorted(nodes, key=lambda n: sensitivity[n], reverse=True):
        kept.append(node)
        current = drop_of(kept)
        tried += 1
        if current <= max_drop:
            break
    return SearchResult(kept, sensitivity, current, tried)


def quantize_student(
    fp32_path: Path, path: Path, calib: CalibrationData, spec: InputSpec, cfg: QuantizeConfig,
    metadata: dict[str, Any], phases: Phases | None = None,
) -> QuantizeResult:
    """Quantize the FP32 ONNX student to INT8; with cfg.max_top1_drop, keep sensitive layers in float.

    Each phase (graph preparation, calibration with a progress line, sensitivity search, final quantization) is
    announced and timed through `phases`."""
    phases = phases or Phases()
    meta = {**metadata, "precision": "int8", "target": cfg.target, "calibration_method": cfg.method,
            "calibration_images": calib.count, "calibration_split": "train"}
    reported = [0]

    def calibration_progress(done: int, total: int) -> None:
        if done * 4 // total > reported[0] or done == total:  # a line at each quarter
            reported[0] = done * 4 // total
            phases.report(f"int8: calibration batch {done}/{total} ({calib.count} training images)")

    with tempfile.TemporaryDirectory(prefix="kdforge-int8-") as tmp:
        cache = Path(tmp) / "calibration.json"
        with phases("int8: graph preparation"):
            prepared = prepare_for_int8(fp32_path, Path(tmp) / "prepared.onnx")

        def quantize(exclude: list[str], out: Path, progress=None) -> Path:
            return onnx_to_int8(fp32_path, out, calib.batches, cfg.target, cfg.method, cfg.op_types,
                                [*cfg.exclude, *exclude], meta, calibration_cache=cache, prepared=prepared,
                                progress=progress)

        if cfg.max_top1_drop is None:
            meta["notes"] = list(calib.notes)
            with phases("int8: calibration and quantization"):
                quantize([], path, calibration_progress)
            return QuantizeResult(path, notes=list(calib.notes))

        if len(calib.heldout_labels) == 0:
            raise ExportError("accuracy-aware INT8 needs held-out training images beyond the calibration set; "
                              "lower quantize.calibration or turn off quantize.max_top1_drop")
        heldout = [spec.prepare(images).numpy() for images in calib.heldout_images.split(cfg.batch_size)]
        labels = calib.heldout_labels.numpy()
        trial = Path(tmp) / "trial.onnx"
        with phases("int8: calibration and quantization"):
            quantize([], trial, calibration_progress)  # fills the calibration cache the search reuses
        fp32_classes = predicted_classes(fp32_path, heldout)
        fp32_top1 = float((fp32_classes == labels).mean())

        def drop(exclude: list[str]) -> float:
            return heldout_drop(fp32_classes, predicted_classes(quantize(exclude, trial), heldout), labels)

        nodes = [n for n in quantizable_nodes(prepared, cfg.op_types) if n not in cfg.exclude]
        with phases("int8: sensitivity search"):
            search = keep_sensitive_in_float(nodes, drop, cfg.max_top1_drop)
        phases.report(f"int8: sensitivity search measured {search.tried} configurations of {len(nodes)} layers")
        kept_info = [{"node": n, "sensitivity_points": round(search.sensitivity[n], 3),
                      "why": "among the most sensitive layers: keeping it in float reduced the top-1 drop"}
                     for n in search.kept]
        notes = list(calib.notes)
        if search.final_drop > cfg.max_top1_drop:
            notes.append(f"top-1 drop {search.final_drop:.2f} points (upper bound) on {calib.heldout_source} is "
                         f"still above max_top1_drop {cfg.max_top1_drop} with every quantized layer tried in float")
        int8_top1 = float((predicted_classes(quantize(search.kept, trial), heldout) == labels).mean())
        result = QuantizeResult(path, kept_info, fp32_top1, int8_top1, round(search.final_drop, 3), search.tried,
                                notes)
        meta.update(result.to_metadata())
        with phases("int8: final quantization"):
            quantize(search.kept, path)  # the chosen configuration, with the final metadata
        return result
