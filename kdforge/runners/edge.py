"""Runners for on-device runtimes, here on the CPU through their Python bindings: ExecuTorch programs (`.pte`, the
XNNPACK delegate) and NCNN models (`.ncnn.param` + `.ncnn.bin`). The input spec comes from the file's sidecar JSON
(`layout.sidecar`, written by export/edge.py).

    runner = open_runner(Path("exports/quickstart/student.int8.pte"), "executorch")
    logits = runner.predict(images)      # uint8 (N, 3, H, W) -> float32 (N, classes)
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from kdforge import layout
from kdforge.data.transforms import spec_from_metadata
from kdforge.errors import ExportError
from kdforge.fileio import read_json
from kdforge.optional import require


def _sidecar(path: Path, what: str) -> dict:
    sidecar = layout.sidecar(path)
    if not path.is_file() or not sidecar.is_file():
        raise ExportError(f"{what} {path} or its sidecar {sidecar.name} is missing; export it again")
    return read_json(sidecar)


class ExecuTorchRunner:
    """An ExecuTorch program on ExecuTorch's runtime (its XNNPACK delegate on this CPU). A program takes batches of
    1 to the batch its memory plan was made for (the program's own metadata); larger batches are split."""

    def __init__(self, path: Path) -> None:
        require("executorch")
        from executorch.runtime import Runtime

        self.path = Path(path)
        meta = _sidecar(self.path, "ExecuTorch program")
        self.spec, self.metadata = spec_from_metadata(meta), meta
        try:
            self.method = Runtime.get().load_program(str(self.path)).load_method("forward")
            self.max_batch = int(self.method.metadata.input_tensor_meta(0).sizes()[0])
        except Exception as exc:  # the runtime raises its own error types
            raise ExportError(f"{self.path}: ExecuTorch cannot load it ({str(exc).splitlines()[0][:200]}); the file "
                              f"is truncated or not an ExecuTorch program: export it again") from None
        self.name = f"executorch {version('executorch')} (XNNPACK, CPU)"

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = self.spec.prepare(images.cpu()).contiguous()
        return torch.cat([self.method.execute([chunk.contiguous()])[0].float()
                          for chunk in x.split(self.max_batch)])


class NcnnRunner:
    """An NCNN model on NCNN's CPU runtime in FP32 arithmetic (its FP16 storage and arithmetic options off; the
    weights are stored in FP16 in the file). NCNN takes one CHW image per call: a batch is a loop."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        ncnn = require("ncnn")
        self.path = Path(path)
        meta = _sidecar(self.path, "NCNN model")
        weights = self.path.with_suffix(".bin")
        if not weights.is_file():
            raise ExportError(f"NCNN model {self.path} needs its weights {weights.name} beside it; export it again")
        self.spec, self.metadata = spec_from_metadata(meta), meta
        self.net = ncnn.Net()
        self.net.opt.use_fp16_packed = self.net.opt.use_fp16_storage = self.net.opt.use_fp16_arithmetic = False
        if threads:
            self.net.opt.num_threads = threads
        if self.net.load_param(str(self.path)) != 0 or self.net.load_model(str(weights)) != 0:
            raise ExportError(f"{self.path}: NCNN cannot load it (or its {weights.name}); export it again")
        self.ncnn = ncnn
        self.name = f"ncnn {version('ncnn')} (CPU)"

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = self.spec.prepare(images.cpu()).numpy()
        rows = []
        for image in x:
            extractor = self.net.create_extractor()
            extractor.input("in0", self.ncnn.Mat(np.ascontiguousarray(image)))
            status, out = extractor.extract("out0")
            if status != 0:
                raise ExportError(f"{self.path}: NCNN failed to run an image (status {status})")
            rows.append(np.array(out).reshape(-1))
        return torch.from_numpy(np.stack(rows)).float()
