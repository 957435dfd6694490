"""Runners for on-device runtimes, here on the CPU through their Python bindings: ExecuTorch programs (`.pte`, the
XNNPACK delegate), LiteRT models (`.tflite`) and NCNN models (`.ncnn.param` + `.ncnn.bin`; these two through the
torch-free sessions the server uses, kdforge/sessions.py). The input spec comes from the file's sidecar JSON
(`layout.sidecar`, written by export/edge.py).

    runner = open_runner(Path("exports/quickstart/student.int8.pte"), "executorch")
    logits = runner.predict(images)      # uint8 (N, 3, H, W) -> float32 (N, classes)
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import torch

from kdforge import layout
from kdforge.data.transforms import spec_from_metadata
from kdforge.errors import ExportError
from kdforge.fileio import read_json
from kdforge.optional import require
from kdforge.runners.session import SessionRunner
from kdforge.sessions import litert_session, ncnn_session


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


class EdgeRunner(SessionRunner):
    """LiteRT's interpreter or NCNN (kdforge/sessions.py) on a file whose input spec is in its sidecar JSON."""

    def __init__(self, path: Path, kind: str, threads: int | None = None) -> None:
        what = {"litert": "LiteRT model", "ncnn": "NCNN model"}[kind]
        meta = _sidecar(Path(path), what)
        if kind == "litert":
            run, name, _, _ = litert_session(Path(path), threads, batch_axis=bool(meta.get("batch_axis", False)))
        else:
            run, name, _, _ = ncnn_session(Path(path), threads)
        super().__init__(path, run, spec_from_metadata(meta), name)
        self.metadata = meta
