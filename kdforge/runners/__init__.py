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

from kdforge.data.transforms import InputSpec, spec_from_metadata
from kdforge.errors import ExportError
from kdforge.fileio import check_artifact
from kdforge.formats import FORMATS, INPUT_NAME
from kdforge.layout import METADATA
from kdforge.optional import require
from kdforge.runtime import Runtime, exact_fp32

# ONNX Runtime execution providers in order of preference; the first one installed wins
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


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


def choose_providers(requested: list[str] | None = None) -> list[str]:
    ort = require("onnxruntime")

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ExportError(f"ONNX Runtime providers not installed: {missing}; available: {available}")
        return requested
    return [p for p in PREFERRED_PROVIDERS if p in available]


class OnnxRunner:
    """An ONNX file through ONNX Runtime. Input size and mean/std come from the file's own metadata."""

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None,
                 many_batches: bool = False) -> None:
        ort = require("onnxruntime")

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"ONNX file not found: {self.path}")
        options = ort.SessionOptions()
        if threads:  # default: ONNX Runtime's (one per physical core)
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        if many_batches:  # verification: ORT's memory pattern grew a session by ~1.1 GB over 50 batches at 224
            options.enable_mem_pattern = False
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=choose_providers(providers))
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ExportError(
                f"{self.path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]}); "
                f"the file is truncated, tampered with or not an ONNX model: export it again"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.spec = spec_from_metadata(meta)
        except (KeyError, ValueError) as exc:
            raise ExportError(f"{self.path}: not a kdforge export (metadata lacks {exc})") from None
        self.metadata = meta
        self.provider = self.session.get_providers()[0]
        self.name = f"onnxruntime ({self.provider.removesuffix('ExecutionProvider')})"

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = self.spec.prepare(images.cpu()).numpy()
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: x})[0]).float()


class OpenVinoRunner:
    """An OpenVINO IR (.xml + .bin) on OpenVINO's CPU plugin, in FP32 arithmetic (the FP16-stored weights are
    widened). Input size and mean/std come from the model's rt_info (written by `onnx_to_openvino`)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        ov = require("openvino")

        self.path = Path(path)
        if not self.path.is_file() or not self.path.with_suffix(".bin").is_file():
            raise ExportError(f"OpenVINO model not found: {self.path} and its .bin are needed")
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
            meta = {key: model.get_rt_info(["kdforge", key]).astype(str) for key in ("input_size", "mean", "std")}
            config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
            self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:  # OpenVINO reports parse and missing-key errors as RuntimeError
            raise ExportError(f"{self.path}: OpenVINO cannot load it ({str(exc).splitlines()[0][:200]}); export it "
                              f"again") from None
        self.spec = spec_from_metadata(meta)
        self.output = self.compiled.output(0)
        self.name = f"openvino {ov.__version__.split('-')[0]} (CPU)"

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = self.spec.prepare(images.cpu()).numpy()
        return torch.from_numpy(self.compiled(x)[self.output].copy()).float()


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
        from kdforge.runners.edge import ExecuTorchRunner, SessionRunner

        return ExecuTorchRunner(path) if kind == "executorch" else SessionRunner(path, kind, threads)
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
