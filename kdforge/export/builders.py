"""How each export format is made: BUILDERS[name] turns the student (or the format it is made from) into the
format's file and returns what metadata.json records about it beyond the file's hash and size.

    extra = BUILDERS["fp16"].make(job, "fp16", job.path("fp16"), job.meta("fp16"))

`make` runs a converter (converters.py, tensorrt.py, int8.py) with this export's settings. `after`, when a
builder has one, runs once the file was verified (INT8's escalation and latency check). `export_run` calls them
in the order of `formats.with_sources`, so a format's source file exists before it is made. A new format is an
entry in `kdforge.formats`, a converter and one function here (test_layers.py checks the two tables agree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdforge import layout
from kdforge.export import int8
from kdforge.export.converters import onnx_to_fp16, onnx_to_openvino, onnx_to_triton, torch_to_onnx, weights_beside
from kdforge.export.job import ExportJob
from kdforge.fileio import file_hash, write_json
from kdforge.formats import FORMATS

Make = Callable[[ExportJob, str, Path, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Builder:
    make: Make  # (job, format name, file to write, the format's metadata) -> what metadata.json adds
    after: Callable[[ExportJob, str, Path, dict[str, Any], dict[str, Any]], None] | None = None  # after verification


def make_onnx(job: ExportJob, name: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    torch_to_onnx(job.model, job.spec.size, path, job.opset, meta)
    return {}


def make_fp16(job: ExportJob, name: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    onnx_to_fp16(job.source_of(name), path, meta)
    return {}


def make_triton(job: ExportJob, name: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    onnx_to_triton(job.source_of(name), job.export_dir / layout.TRITON, layout.TRITON_MODEL, job.spec.size,
                   list(job.data.train.classes))
    return {}


def make_openvino(job: ExportJob, name: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The OpenVINO IR, weights stored in FP16 (OpenVINO's default)."""
    onnx_to_openvino(job.source_of(name), path, meta)
    return weights_beside(path)


def make_executorch(job: ExportJob, name: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """An ExecuTorch program of the student, XNNPACK-delegated (its INT8: int8.make_pt2e_int8)."""
    from kdforge.export.edge import torch_to_executorch

    return torch_to_executorch(job.model, job.spec.size, path, meta)


def make_litert(job: ExportJob, name: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """A LiteRT model of the student (its full-integer INT8: int8.make_pt2e_int8)."""
    from kdforge.export.edge import torch_to_litert

    return torch_to_litert(job.model, job.spec.size, path, meta)


def make_ncnn(job: ExportJob, name: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    from kdforge.export.edge import torch_to_ncnn

    return torch_to_ncnn(job.model, job.spec.size, path, meta)


def make_tensorrt(job: ExportJob, name: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """A TensorRT engine built on this GPU from the format's source ONNX (its precision is the graph's)."""
    from kdforge.export.tensorrt import onnx_to_trt

    fmt, tcfg = FORMATS.get(name), job.tcfg
    info = onnx_to_trt(job.source_of(name), path, (tcfg.min_batch, tcfg.opt_batch, tcfg.max_batch),
                       tcfg.workspace_mb, Path(tcfg.timing_cache) if tcfg.timing_cache else None)
    if info["precision_built"] != fmt.precision:
        job.notes.append(f"{name}: TensorRT built {info['precision_built']} layers only "
                         f"({info['layer_precisions']}); the graph asked for {fmt.precision}")
    extra = {"tensorrt": info, "source_sha256": file_hash(job.source_of(name))}
    write_json(layout.sidecar(path), {**meta, **extra})  # an engine has no metadata_props
    return extra


BUILDERS: dict[str, Builder] = {
    "onnx": Builder(make_onnx),
    "int8": Builder(int8.make_int8, int8.finish_int8),
    "fp16": Builder(make_fp16),
    "triton": Builder(make_triton),
    "openvino": Builder(make_openvino),
    "openvino_int8": Builder(int8.make_openvino_int8, int8.escalate_and_record),
    "executorch": Builder(make_executorch),
    "executorch_int8": Builder(int8.make_pt2e_int8, int8.escalate_and_record),
    "litert": Builder(make_litert),
    "litert_int8": Builder(int8.make_pt2e_int8, int8.escalate_and_record),
    "ncnn": Builder(make_ncnn),
    "trt_fp16": Builder(make_tensorrt),
    "trt_int8": Builder(make_tensorrt),
}
