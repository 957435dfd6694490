"""Converters for on-device runtimes, from the PyTorch student (not from the ONNX file): ExecuTorch programs
lowered to XNNPACK (FP32, and INT8 by PT2E quantization), LiteRT models (FP32, and full-integer INT8 by PT2E) and
NCNN models (by pnnx). Each writes its file(s) atomically and checks them before returning; the input spec and what
made the file go into its sidecar JSON (`layout.sidecar`), since none of these file kinds has room for metadata.
The INT8 ones share the PT2E steps (`pt2e_quantized`) and the accuracy-aware search that keeps sensitive layers in
float (`pt2e_sensitive_layers`).

    torch_to_executorch(model, 224, Path("student.pte"), meta)                          # FP32, XNNPACK
    torch_to_executorch(model, 224, Path("student.int8.pte"), meta, calibration.batches)  # INT8 (PT2E)
    torch_to_litert(model, 224, Path("student.tflite"), meta)                           # FP32
    torch_to_litert(model, 224, Path("student.int8.tflite"), meta, calibration.batches)   # INT8 (PT2E)
    torch_to_ncnn(model, 224, Path("student.ncnn.param"), meta)                         # + student.ncnn.bin

ExecuTorch: `torch.export` with a dynamic batch axis (a program is otherwise fixed to the batch it was exported
with; its memory plan bounds the batch, recorded as `max_batch`), `to_edge_transform_and_lower` with the XNNPACK
partitioner, `to_executorch`. INT8: ExecuTorch's `XNNPACKQuantizer` with its symmetric per-channel configuration
(INT8 weights per output channel, INT8 activations per tensor), `prepare_pt2e` -> calibration on the recipe's
calibration images -> `convert_pt2e`, then lowered the same way: XNNPACK runs the quantized operators in INT8.

LiteRT: `litert_torch.convert` at batch 1, the input kept NCHW as in PyTorch (the converter transposes inside).
LiteRT cannot convert timm's graphs with a dynamic batch axis, so the batch is found out instead: the check resizes
the input to 3 images and compares with 3 single-image calls; a model that passes takes any batch, one that does
not (a ViT's reshapes hold the batch of 1) runs one image per call (`batch_axis` in the sidecar). Where the
converter fails at batch 1 (a channels-last linear on a 1x1 map, as in a ConvNeXt at 32x32), it converts at 2.
INT8: litert-torch's `PT2EQuantizer` with its symmetric configuration (INT8 weights per output channel, INT8
activations per tensor), `prepare_pt2e` -> calibration -> `convert_pt2e`, then converted with the quantizer's
config: full-integer with INT8 input and output tensors (the converter folds the first quantize into the input);
their scale and zero point are in the file, and the session (kdforge/sessions.py) quantizes and dequantizes with
them, as an app on a device does.

NCNN: pnnx traces the model and writes `<name>.ncnn.param` (the graph) and `<name>.ncnn.bin` (weights stored in FP16,
pnnx's default); its input is `in0`, its output `out0`, one CHW image per call (kdforge/sessions.py).
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
                        calibration: Sequence[np.ndarray] | None = None,
                        float_layers: Sequence[str] = ()) -> dict[str, Any]:
    """An ExecuTorch program of the eval-mode `model`, XNNPACK-delegated; INT8 (PT2E) when `calibration` (float32
    batches prepared for the model) is given, but for the modules named in `float_layers`. Returns what
    metadata.json records about it."""
    require("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = model.eval()
    extra: dict[str, Any] = {"delegate": "xnnpack"}
    with torch.no_grad():
        try:
            if calibration is not None:
                model = pt2e_quantized(model, input_size, calibration, "executorch", float_layers)
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


def pt2e_quantizer(backend: str) -> Any:
    """The PT2E quantizer of `backend` (executorch: XNNPACKQuantizer; litert: litert-torch's PT2EQuantizer), both
    symmetric with INT8 weights per output channel and INT8 activations per tensor."""
    if backend == "executorch":
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

    return PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))


def quantizable_layers(model: torch.nn.Module) -> list[str]:
    """The modules PT2E quantizes that the accuracy-aware search may keep in float: convolutions and linears."""
    return [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))]


def pt2e_quantized(model: torch.nn.Module, input_size: int, calibration: Sequence[np.ndarray], backend: str,
                   float_layers: Sequence[str] = (), quantizer: Any = None) -> torch.nn.Module:
    """`model` quantized by PT2E for `backend` (`prepare_pt2e` -> calibration batches -> `convert_pt2e`), the modules
    named in `float_layers` left in float. The result runs in PyTorch (INT8 simulated by quantize/dequantize pairs),
    which is how the accuracy-aware search measures it, and is what the backend's converter lowers."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = quantizer or pt2e_quantizer(backend)
    for name in float_layers:  # both quantizers skip a module whose configuration is None (their setter refuses it)
        quantizer.module_name_config[name] = None
    prepared = prepare_pt2e(_exported(model, input_size).module(), quantizer)  # dynamic batch: calibration batches
    for batch in calibration:
        prepared(torch.from_numpy(np.ascontiguousarray(batch)))
    return convert_pt2e(prepared, fold_quantize=backend == "executorch")


def weight_error(module: torch.nn.Module) -> float:
    """Relative error of a layer's weights quantized as PT2E does (symmetric INT8, per output channel): a cheap
    estimate of how much INT8 hurts it (preparing a model for PT2E takes seconds, too long to measure each layer)."""
    w = module.weight.detach().flatten(1)
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return float((w - (w / scale).round().clamp(-127, 127) * scale).norm() / w.norm().clamp_min(1e-12))


def pt2e_sensitive_layers(model: torch.nn.Module, input_size: int, calibration: Sequence[np.ndarray], backend: str,
                          heldout: Sequence[np.ndarray], labels: np.ndarray, max_drop: float) -> Any:
    """Which layers stay in float so that PT2E INT8 is within `max_drop` top-1 points (upper one-standard-error
    bound, `export.quantize.heldout_drop`) of the FP32 model on the held-out batches, simulated in PyTorch. Layers
    are ordered by estimated sensitivity (the first and the last layer, then by `weight_error`) and kept in float
    1, 2, 4, ... at a time until the drop is within bounds or all are float: a few trials, each a PT2E preparation.
    Returns a SearchResult (export/quantize.py) whose `sensitivity` holds the weight errors."""
    from kdforge.export.quantize import SearchResult, heldout_drop

    modules = dict(model.named_modules())
    names = quantizable_layers(model)
    errors = {name: weight_error(modules[name]) for name in names}
    ends = list(dict.fromkeys([names[0], names[-1]]))
    order = ends + sorted((n for n in names if n not in ends), key=errors.get, reverse=True)

    def classes(net: torch.nn.Module) -> np.ndarray:
        return np.concatenate([net(torch.from_numpy(b)).argmax(1).numpy() for b in heldout])

    with torch.no_grad():
        fp32 = classes(model.eval())
        count, tried = 0, 0
        while True:
            kept = order[:count]
            drop = heldout_drop(fp32, classes(pt2e_quantized(model, input_size, calibration, backend, kept)), labels)
            tried += 1
            if drop <= max_drop or count == len(order):
                return SearchResult(kept, {n: round(e, 5) for n, e in errors.items()}, drop, tried)
            count = min(len(order), max(1, 2 * count))


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


def torch_to_litert(model: torch.nn.Module, input_size: int, path: Path, metadata: dict[str, Any],
                    calibration: Sequence[np.ndarray] | None = None,
                    float_layers: Sequence[str] = ()) -> dict[str, Any]:
    """A LiteRT model of the eval-mode `model`; full-integer INT8 (PT2E) when `calibration` (float32 batches prepared
    for the model) is given, but for the modules named in `float_layers`. Returns what metadata.json records."""
    require("litert_torch")
    require("ai_edge_litert")
    model = model.eval()
    extra: dict[str, Any] = {"input_layout": "NCHW"}
    with tempfile.TemporaryDirectory(prefix="kdforge-litert-") as tmp, torch.no_grad():
        log, made = Path(tmp) / "litert.log", Path(tmp) / "student.tflite"
        try:
            with native_output_to(log):  # litert-torch prints each conversion step, jax and absl their logs
                converted, extra["converted_batch"] = _litert_converted(model, input_size, calibration, float_layers)
                converted.export(str(made))
            if calibration is not None:
                extra.update(quantizer="litert-torch PT2EQuantizer (symmetric, per-channel weights)",
                             io="int8 (scale and zero point in the file)",
                             calibration_images=sum(len(b) for b in calibration))
        except Exception as exc:  # torch.export, jax and the converter raise many types; the first line says what
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ExportError(f"LiteRT cannot convert this model ({first[:300]}); its log ends: {_tail(log)}") from None
        extra["batch_axis"] = _check_litert(made, input_size)
        with atomic_path(path) as out:
            shutil.copyfile(made, out)
    write_json(layout.sidecar(path), {**metadata, **extra})
    return extra


def _litert_converted(model: torch.nn.Module, input_size: int, calibration: Sequence[np.ndarray] | None,
                      float_layers: Sequence[str]) -> tuple[Any, int]:
    """litert-torch's conversion (of the PT2E-quantized model when `calibration` is given) and the batch it was
    converted at: 1, or 2 where the converter fails at 1 (it mishandles a channels-last linear on a 1x1 map when the
    batch is 1 too, as in timm's ConvNeXt at 32x32)."""
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    options: dict[str, Any] = {}
    if calibration is not None:
        quantizer = pt2e_quantizer("litert")
        model = pt2e_quantized(model, input_size, calibration, "litert", float_layers, quantizer)
        options["quant_config"] = QuantConfig(pt2e_quantizer=quantizer)
    try:
        return litert_torch.convert(model, (torch.zeros(1, 3, input_size, input_size),), **options), 1
    except Exception:  # the converter's error types vary; the second attempt's error is the one reported
        return litert_torch.convert(model, (torch.zeros(2, 3, input_size, input_size),), **options), 2


def _check_litert(path: Path, input_size: int) -> bool:
    """Run the model at the batch it was converted at and on a batch of 3 resized; returns whether batches give the
    same answers (then sessions batch; otherwise they call it at its own batch, chunk by chunk)."""
    from kdforge.sessions import litert_session

    images = np.random.default_rng(0).standard_normal((3, 3, input_size, input_size)).astype(np.float32)
    single = litert_session(path, batch_axis=False).run
    one_by_one = single(images)
    if one_by_one.shape[0] != 3 or not np.isfinite(one_by_one).all():
        raise ExportError(f"the LiteRT model returned {one_by_one.shape} for 3 images, or non-finite logits")
    try:
        batched = litert_session(path, batch_axis=True).run
        return bool(np.allclose(batched(images), one_by_one, rtol=1e-4, atol=1e-4))
    except (ValueError, RuntimeError):  # XNNPACK cannot reshape the graph for another batch
        return False


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
            sys.stdout.flush()  # what Python code printed meanwhile goes to the log too
            sys.stderr.flush()
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
