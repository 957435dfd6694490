"""TensorRT at run time: the engine runner and what decides where an engine may run.

An engine is valid only for the TensorRT version and GPU architecture it was built with: the sidecar
`<engine>.json` (written by `export/tensorrt.py`, which builds engines) records both, and
`check_engine_runs_here` refuses an engine built elsewhere. `tensorrt` is imported lazily;
`tensorrt_missing()` says, in one line, what this machine lacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdforge import layout
from kdforge.data.transforms import spec_from_metadata
from kdforge.errors import ExportError, UnavailableError
from kdforge.fileio import read_json
from kdforge.formats import INPUT_NAME, OUTPUT_NAME

INSTALL_HINT = ('install TensorRT on a machine with an NVIDIA GPU (pip install "kdforge[trt]"), or use the GPU '
                "image (Dockerfile.gpu), which builds the engine on its GPU at start")


def tensorrt_missing() -> str | None:
    """None when engines can be built and run here; otherwise what is missing, as one sentence."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"TensorRT is not installed: {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return f"TensorRT engines need a CUDA GPU and none is visible here: {INSTALL_HINT}"
    return None


def load_tensorrt():
    """The tensorrt module, or UnavailableError saying what to install."""
    missing = tensorrt_missing()
    if missing:
        raise UnavailableError(missing)
    import tensorrt

    return tensorrt


def this_gpu() -> dict[str, Any]:
    """What an engine is tied to: TensorRT version, GPU name and compute capability of the current device."""
    import tensorrt

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt_version": tensorrt.__version__, "gpu": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}"}


def check_engine_runs_here(path: Path, built: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """Refuse (ExportError) an engine built with another TensorRT version or for another GPU architecture;
    return notes for differences TensorRT tolerates (another GPU model of the same architecture)."""
    if built.get("tensorrt_version") != here["tensorrt_version"]:
        raise ExportError(f"{path} was built with TensorRT {built.get('tensorrt_version')}; this machine has "
                          f"TensorRT {here['tensorrt_version']}: engines only run on the version that built them. "
                          f"Rebuild it here with `kdforge export --trt`")
    if built.get("compute_capability") != here["compute_capability"]:
        raise ExportError(f"{path} was built for {built.get('gpu')} (compute capability "
                          f"{built.get('compute_capability')}); this GPU is {here['gpu']} (compute capability "
                          f"{here['compute_capability']}). Rebuild it here with `kdforge export --trt`")
    if built.get("gpu") != here["gpu"]:
        return [f"{path.name} was built on {built.get('gpu')} and runs on {here['gpu']} (same architecture): "
                f"it works, but its kernels were timed on the other model"]
    return []


def split_batches(n: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """(start, stop, run size) chunks covering n images within an engine's batch profile: chunks of at most
    `max_batch`; a chunk smaller than `min_batch` runs padded to `min_batch` (the padding's outputs are dropped)."""
    chunks = []
    for start in range(0, n, max_batch):
        stop = min(n, start + max_batch)
        chunks.append((start, stop, max(stop - start, min_batch)))
    return chunks


class TrtRunner:
    """A TensorRT engine on a CUDA device, with torch CUDA tensors as its I/O buffers.

    Input size and mean/std come from the engine's sidecar `<engine>.json`, which also records the TensorRT
    version and GPU the engine was built for: an engine from another TensorRT version or GPU architecture is
    refused. Batches larger than the engine's profile are split; smaller than its minimum, padded."""

    def __init__(self, path: Path, device: str | None = None) -> None:
        trt = load_tensorrt()
        self.path = Path(path)
        sidecar = layout.sidecar(self.path)
        if not self.path.is_file() or not sidecar.is_file():
            raise ExportError(f"{self.path} or its sidecar {sidecar.name} is missing; "
                              f"build it with `kdforge export --trt`")
        meta = read_json(sidecar)
        self.device = torch.device(device or "cuda")
        torch.cuda.set_device(self.device)
        here = this_gpu()
        self.notes = check_engine_runs_here(self.path, meta["tensorrt"], here)
        self.spec = spec_from_metadata(meta)
        self.metadata = meta
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ExportError(f"{self.path}: TensorRT cannot load it (truncated or tampered with); build it again")
        self.context = self.engine.create_execution_context()
        min_shape, _, max_shape = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.min_batch, self.max_batch = int(min_shape[0]), int(max_shape[0])
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        self.input_dtype = dtypes[self.engine.get_tensor_dtype(INPUT_NAME)]
        self.output_dtype = dtypes[self.engine.get_tensor_dtype(OUTPUT_NAME)]
        self.provider = "TensorRT"
        self.name = f"tensorrt {here['tensorrt_version']} ({here['gpu']})"

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = self.spec.prepare(images.to(self.device)).to(self.input_dtype)
        stream = torch.cuda.current_stream(self.device)
        outputs = []
        for start, stop, size in split_batches(len(x), self.min_batch, self.max_batch):
            chunk = x[start:stop]
            if size > len(chunk):
                chunk = torch.cat([chunk, chunk.new_zeros((size - len(chunk), *chunk.shape[1:]))])
            chunk = chunk.contiguous()
            self.context.set_input_shape(INPUT_NAME, tuple(chunk.shape))
            out = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT_NAME)), dtype=self.output_dtype,
                              device=self.device)
            self.context.set_tensor_address(INPUT_NAME, chunk.data_ptr())
            self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
            # enqueued on torch's current stream, so the buffers' lifetimes follow torch's stream order
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise ExportError(f"{self.path}: TensorRT failed to run a batch of {size}")
            outputs.append(out[: stop - start])
        stream.synchronize()
        return torch.cat(outputs).float().cpu()
