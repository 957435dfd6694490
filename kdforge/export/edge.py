"""Converters for on-device runtimes, from the PyTorch student (not from the ONNX file): ExecuTorch programs
lowered to XNNPACK (FP32, and INT8 by PT2E quantization) and NCNN models (by pnnx). Each writes its file(s)
atomically and checks them before returning; the input spec and what made the file go into its sidecar JSON
(`layout.sidecar`), since neither file kind has room for metadata.

    torch_to_executorch(model, 224, Path("student.pte"), meta)                          # FP32, XNNPACK
    torch_to_executorch(model, 224, Path("student.int8.pte"), meta, calibration.batches)  # INT8 (PT2E)
    torch_to_ncnn(model, 224, Path("student.ncnn.param"), meta)                         # + student.ncnn.bin

ExecuTorch: `torch.export` with a dynamic batch axis (a program is otherwise fixed to the batch it was exported
with; its memory plan bounds the batch, recorded as `max_batch`), `to_edge_transform_and_lower` with the XNNPACK
partitioner, `to_executorch`. INT8: ExecuTorch's `XNNPACKQuantizer` with its symmetric per-channel configuration
(INT8 weights per output channel, INT8 activations per tensor), `prepare_pt2e` -> calibration on the recipe's
calibration images -> `convert_pt2e`, then lowered the same way: XNNPACK runs the quantized operators in INT8.

NCNN: pnnx traces the model and writes `<name>.ncnn.param` (the graph) and `<name>.ncnn.bin` (weights stored in FP16,
pnnx's default); its input
is `in0`, its output `out0`, one CHW image per call (`runners/edge.py`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdforge import layout
from kdforge.errors import ExportError
from kdforge.export.converters import weights_beside
from kdforge.fileio import atomic_path, write_json
from kdforge.optional import require

MAX_BATCH = 256  # the batch bound asked of torch.export; the program's own bound (its memory plan) may be lower


def _exported(model: torch.nn.Module, input_size: int) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = torch.zeros(2, 3, input_size, input_size)  # 2, not 1: torch.export specializes a size-1 axis
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def torch_to_executorch(model: torch.nn.Module, input_size: int, path: Path, metadata: dict[str, Any],
                        calibration: Sequence[np.ndarray] | None = None) -> dict[str, Any]:
    """An ExecuTorch program of the eval-mode `model`, XNNPACK-delegated; INT8 (PT2E) when `calibration` (float32
    batches prepared for the model) is given. Returns what metadata.json records about it."""
    require("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = model.eval()
    extra: dict[str, Any] = {"delegate": "xnnpack"}
    with torch.no_grad():
        try:
            if calibration is not None:
                model = _quantized(model, input_size, calibration)
                extra.update(quantizer="XNNPACKQuantizer (PT2E, symmetric, per-channel weights)",
                             calibration_images=sum(len(b) for b in calibration))
            program = to_edge_transform_and_lower(_exported(model, input_size),
                                                  partitioner=[XnnpackPartitioner()]).to_executorch()
        except Exception as exc:  # torch.export and ExecuTorch raise many types; the first line says what failed
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ExportError(f"ExecuTorch cannot lower this model ({first[:300]}); a timm ViT built with "
                              f"dynamic_img_size resamples its position embedding with an operator ExecuTorch lacks: "
                              f"set model_kwargs = {{dynamic_img_size = false}} for an ExecuTorch export") from None
    with atomic_path(path) as tmp:
        tmp.write_bytes(program.buffer)
        extra["max_batch"] = _check_executorch(tmp, input_size)
    write_json(layout.sidecar(path), {**metadata, **extra})
    return extra


def _quantized(model: torch.nn.Module, input_size: int, calibration: Sequence[np.ndarray]) -> torch.nn.Module:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(_exported(model, input_size).module(), quantizer)
    for batch in calibration:
        prepared(torch.from_numpy(np.ascontiguousarray(batch)))
    return convert_pt2e(prepared)


def _check_executorch(path: Path, input_size: int) -> int:
    """Run the program once; returns the largest batch its memory plan takes (ExecuTorch plans every tensor at its
    upper bound, and its lowering may set a lower bound than the export's: 15 images for a small ConvNeXt at 32x32)."""
    from executorch.runtime import Runtime

    try:
        method = Runtime.get().load_program(str(path)).load_method("forward")
        max_batch = int(method.metadata.input_tensor_meta(0).sizes()[0])
        out = method.execute([torch.zeros(min(2, max_batch), 3, input_size, input_size)])[0]
    except Exception as exc:  # the runtime raises its own error types
        raise ExportError(f"the ExecuTorch program does not run ({str(exc).splitlines()[0][:200]})") from None
    if out.shape[0] != min(2, max_batch) or not bool(torch.isfinite(out).all()):
        raise ExportError(f"the ExecuTorch program returned {tuple(out.shape)} for a batch of {min(2, max_batch)}, "
                          f"or non-finite logits")
    return max_batch


def _check_ncnn(param: Path, weights: Path, input_size: int) -> None:
    """Refuse a graph with layers pnnx left in PyTorch's terms (`Tensor.reshape`, `torch.unbind`: NCNN has no such
    layer; typically a tensor of more than 4 dimensions, which NCNN cannot hold, as in timm's attention), then load
    it and run one image."""
    import ncnn

    rows = [line.split() for line in param.read_text().splitlines()[2:] if line.strip()]
    foreign = sorted({row[0] for row in rows if "." in row[0]})
    if foreign:
        raise ExportError(f"NCNN cannot run this model: pnnx left {', '.join(foreign)} unconverted (NCNN tensors have "
                          f"at most 4 dimensions; attention that reshapes to 5, as timm's ViTs do, cannot be "
                          f"expressed); export a CNN student, or use executorch / onnx for this one")
    net = ncnn.Net()
    if net.load_param(str(param)) != 0 or net.load_model(str(weights)) != 0:
        raise ExportError("NCNN cannot load the model pnnx wrote")
    extractor = net.create_extractor()
    extractor.input("in0", ncnn.Mat(np.zeros((3, input_size, input_size), np.float32)))
    status, _ = extractor.extract("out0")
    if status != 0:
        raise ExportError(f"NCNN failed to run the model pnnx wrote (status {status})")


@contextlib.contextmanager
def native_output_to(log: Path) -> Iterator[None]:
    """Send what native code prints to stdout and stderr (file descriptors 1 and 2) to `log` while the block runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with log.open("wb") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _tail(log: Path, lines: int = 3) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return " | ".join(text[-lines:])[-400:] or "(nothing)"


def torch_to_ncnn(model: torch.nn.Module, input_size: int, path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """An NCNN model (`path` = <name>.ncnn.param, and <name>.ncnn.bin beside it) of the eval-mode `model`, by pnnx.
    Returns what metadata.json records about it (the weights file and its hash, as for OpenVINO's .bin)."""
    pnnx = require("pnnx")
    weights = path.with_suffix(".bin")
    with tempfile.TemporaryDirectory(prefix="kdforge-pnnx-") as tmp, torch.no_grad():
        traced, log = Path(tmp) / "student.pt", Path(tmp) / "pnnx.log"
        try:
            with native_output_to(log):  # pnnx prints every pass it runs from C++
                pnnx.export(model.eval(), str(traced), (torch.zeros(1, 3, input_size, input_size),))
        except Exception as exc:  # pnnx reports conversion failures with its own types
            raise ExportError(f"pnnx could not convert the model to NCNN ({str(exc).splitlines()[0][:200]}); "
                              f"its log ends: {_tail(log)}") from None
        made = {".param": Path(tmp) / "student.ncnn.param", ".bin": Path(tmp) / "student.ncnn.bin"}
        if not all(p.is_file() for p in made.values()):
            raise ExportError(f"pnnx wrote no NCNN model (student.ncnn.param / .bin); its log ends: {_tail(log)}")
        _check_ncnn(made[".param"], made[".bin"], input_size)
        for target, source in ((weights, made[".bin"]), (path, made[".param"])):  # the graph last: it names the set
            with atomic_path(target) as out:
                shutil.copyfile(source, out)
    write_json(layout.sidecar(path), metadata)
    return {**weights_beside(path), "batching": "one image per call (the runner loops over a batch)"}
