"""Heavy optional dependencies are imported lazily, with one clear message when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from kdforge.errors import KdforgeError

EXTRAS = {"onnx": "export", "onnxruntime": "export", "openvino": "openvino", "nncf": "openvino", "modelopt": "qad",
          "webdataset": "data", "executorch": "executorch", "pnnx": "ncnn", "ncnn": "ncnn", "litert_torch": "litert",
          "ai_edge_litert": "litert", "s3fs": "data"}


def require(module: str) -> ModuleType:
    """Import `module`, or fail saying which kdforge extra installs it (nothing is installed at run time)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module.split(".")[0], module)
        raise KdforgeError(f"{module} is not installed; install it with: pip install \"kdforge[{extra}]\"") from None
