"""Runners with one interface: `predict(uint8 images (N, 3, H, W)) -> float32 logits (N, classes)` on the CPU.

Every runner prepares its input with the same `InputSpec.prepare` (resize to the model's size, normalize with
its mean/std), so a comparison between runners compares the models, not two preprocessing pipelines. A runner
reads the input spec from its own file (spec_from_metadata); this package imports nothing from kdforge.export:
it opens files, it does not make them.

    runner = OnnxRunner(Path("exports/quickstart/student.onnx"))
    logits = runner.predict(images)           # runner.name says what ran it
    runner, entry = open_export(Path("exports/quickstart"), "int8", read_metadata(Path("exports/quickstart")))

TensorRT's runner and its run-time checks are `runners/tensorrt.py`, the on-device runtimes' (ExecuTorch, NCNN)
`runners/edge.py`; timing a runner is `kdforge.timing`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from kdforge.data.transforms import InputSpec
from kdforge.errors import ExportError
from kdforge.fileio import check_artifact
from kdforge.formats import FORMATS
from kdforge.layout import METADATA
from kdforge.runners.session import SessionRunner, spec_of
from kdforge.runtime import Runtime, exact_fp32
from kdforge.sessions import onnxruntime_session, openvino_session


class Runner(Protocol):
    name: str
    spec: InputSpec

    def predict(self, images: torch.Tensor) -> torch.Tensor: ...


class TorchRunner:
    """The PyTorch model in eval mode, true FP32 (the reference every export is compared with): no autocast, and
    on CUDA with TF32 off for cuDNN and matmuls while it runs (Ampere/Hopper default to TF32 convolutions)."""

    def __init__(self, model: torch.nn.Module, spec: InputSpec, runtime: Runtime) -> None:
        self.model = model.eval().to(runtime.device)
        self.spec = spec
        self.runtime = runtime
        tf32 = ", TF32 off" if runtime.device.type == "cuda" else ""
        self.name = f"pytorch ({runtime.device.type}, fp32{tf32})"

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        with exact_fp32():
            return self.model(self.spec.prepare(images.to(self.runtime.device))).float().cpu()


class OnnxRunner(SessionRunner):
    """An ONNX file through ONNX Runtime (`sessions.onnxruntime_session`, on the first installed of TensorRT, CUDA
    and the CPU). Input size and mean/std come from the file's own metadata."""

    def __init__(self, path: Path, threads: int | None = None, many_batches: bool = False) -> None:
        run, self.provider, self.metadata, _ = onnxruntime_session(path, threads=threads,
                                                                      many_batches=many_batches)
        super().__init__(path, run, spec_of(path, self.metadata),
                         f"onnxruntime ({self.provider.removesuffix('ExecutionProvider')})")


class OpenVinoRunner(SessionRunner):
    """An OpenVINO IR (.xml + .bin) on OpenVINO's CPU plugin in FP32 arithmetic (`sessions.openvino_session`).
    Input size and mean/std come from the model's rt_info (written by `onnx_to_openvino`)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        run, name, metadata, _ = openvino_session(path, threads)
        super().__init__(path, run, spec_of(path, metadata), name)


def open_runner(path: Path, kind: str, device: str | None = None, threads: int | None = None,
                many_batches: bool = False) -> Runner:
    """The runner for an exported artifact of runner `kind` (a format's `runner` in kdforge.formats): ONNX
    Runtime, OpenVINO, TensorRT, ExecuTorch, LiteRT or NCNN (`device`: its CUDA device; `threads`: CPU threads
    for the CPU runtimes that take a number; default: theirs). `many_batches`: memory stays flat over a whole split
    (verification) rather than the last bit of latency (`kdforge bench` times with the runtimes' defaults)."""
    if kind == "tensorrt":
        from kdforge.runners.tensorrt import TrtRunner

        return TrtRunner(path, device)
    if kind == "openvino":
        return OpenVinoRunner(path, threads)
    if kind in ("executorch", "litert", "ncnn"):
        from kdforge.runners.edge import EdgeRunner, ExecuTorchRunner

        return ExecuTorchRunner(path) if kind == "executorch" else EdgeRunner(path, kind, threads)
    return OnnxRunner(path, threads=threads, many_batches=many_batches)


def open_export(export_dir: Path, name: str, meta: dict[str, Any], device: str | None = None,
                threads: int | None = None, many_batches: bool = False) -> tuple[Runner, dict[str, Any]]:
    """The runner of format `name` of the export folder `export_dir` (`meta`: its metadata.json), after checking
    that the file is the one recorded (sha256), and metadata.json's entry for it. What `kdforge verify`
    and `kdforge bench` open."""
    if name not in meta.get("formats", {}):
        raise ExportError(f"{export_dir}: no {name} export recorded in {METADATA}; run `kdforge export` first")
    entry = meta["formats"][name]
    artifact = check_artifact(export_dir, entry)
    return open_runner(artifact, FORMATS.get(name).runner, device, threads, many_batches), entry
