"""`SessionRunner`: a torch-free session of kdforge/sessions.py (ONNX Runtime, OpenVINO, LiteRT, NCNN) behind the
runners' interface, `predict(uint8 images) -> logits`, with the input prepared by `InputSpec.prepare`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdforge.data.transforms import InputSpec, spec_from_metadata
from kdforge.errors import ExportError
from kdforge.sessions import Session


class SessionRunner:
    """A torch-free session (kdforge/sessions.py: ONNX Runtime, OpenVINO, LiteRT, NCNN: what the server opens too)
    wrapped for verification and benchmarks: uint8 images -> `InputSpec.prepare` -> the session -> logits."""

    def __init__(self, path: Path, run: Session, spec: InputSpec, name: str) -> None:
        self.path, self.run, self.spec, self.name = Path(path), run, spec, name

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(self.spec.prepare(images.cpu()).numpy(), np.float32)
        return torch.from_numpy(np.asarray(self.run(x))).float()


def spec_of(path: Path, metadata: dict[str, str]) -> InputSpec:
    """The input spec a file's own metadata records, or an ExportError saying the file is not a kdforge export."""
    try:
        return spec_from_metadata(metadata)
    except (KeyError, ValueError) as exc:
        raise ExportError(f"{path}: not a kdforge export (metadata lacks {exc})") from None
