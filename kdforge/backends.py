"""Runners with one interface: `predict(uint8 images (N, 3, H, W)) -> float32 logits (N, classes)` on the CPU.

Every runner prepares its input with the same `InputSpec.prepare` (resize to the model's size, normalize with
its mean/std), so a comparison between runners compares the models, not two preprocessing pipelines.

    runner = OnnxRunner(Path("exports/quickstart/student.onnx"))
    logits = runner.predict(images)           # runner.provider says where it ran
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch

from kdforge.data.transforms import InputSpec
from kdforge.errors import ExportError
from kdforge.export.converters import INPUT_NAME
from kdforge.optional import require
from kdforge.runtime import Runtime

# ONNX Runtime execution providers in order of preference; the first one installed wins
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class Runner(Protocol):
    name: str
    spec: InputSpec

    def predict(self, images: torch.Tensor) -> torch.Tensor: ...


class TorchRunner:
    """The PyTorch model in eval mode, fp32 (the reference every export is compared with)."""

    def __init__(self, model: torch.nn.Module, spec: InputSpec, runtime: Runtime) -> None:
        self.model = model.eval().to(runtime.device)
        self.spec = spec
        self.runtime = runtime
        self.name = f"pytorch ({runtime.device.type})"

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
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

    def __init__(self, path: Path, providers: list[str] | None = None) -> None:
        ort = require("onnxruntime")

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"ONNX file not found: {self.path}")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=choose_providers(providers))
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ExportError(
                f"{self.path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]}); "
                f"the file is truncated, tampered with or not an ONNX model: export it again"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.spec = InputSpec(int(meta["input_size"]), tuple(json.loads(meta["mean"])),
                                  tuple(json.loads(meta["std"])))
        except (KeyError, ValueError) as exc:
            raise ExportError(f"{self.path}: not a kdforge export (metadata lacks {exc})") from None
        self.metadata = meta
        self.provider = self.session.get_providers()[0]
        self.name = f"onnxruntime ({self.provider.removesuffix('ExecutionProvider')})"

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = self.spec.prepare(images.cpu()).numpy()
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: x})[0]).float()
