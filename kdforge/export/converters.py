"""Pure converters, named source_to_target. Each writes one file atomically and checks it before returning."""

from __future__ import annotations

import inspect
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from kdforge import layout
from kdforge.errors import ExportError
from kdforge.fileio import atomic_path, file_hash
from kdforge.formats import INPUT_NAME, OUTPUT_NAME
from kdforge.optional import require


def torch_to_onnx(
    model: torch.nn.Module, input_size: int, path: Path, opset: int, metadata: dict[str, Any]
) -> Path:
    """Export an eval-mode model to one ONNX file: dynamic batch axis, `metadata` in metadata_props.

    Uses the TorchScript exporter (`dynamo=False`): on timm's CNNs and ViTs it exports in about a second at
    the requested opset with a single file, where the dynamo exporter took 10-16 s and emitted opset 18 with
    external data. The file is checked with onnx.checker and run once with ONNX Runtime before it is moved
    into place. Models built to be re-parameterized for inference (MobileOne, RepGhost, RepViT, FastViT: parallel
    branches trained, one convolution run) are fused first, on a copy, by timm's `reparameterize_model`
    (mobileone_s0 at 224, batch 1 on a 2-core Xeon: 9.1 ms unfused, 2.6 ms fused); verification then compares the
    fused file with the unfused PyTorch student.
    """
    onnx = require("onnx")
    from timm.utils.model import reparameterize_model

    model = reparameterize_model(model.eval())
    dummy = torch.zeros(1, 3, input_size, input_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                model, (dummy,), buffer, dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        except Exception as exc:  # the exporter raises many types for unsupported layers
            raise ExportError(f"ONNX export failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    return save_checked(onnx.load_from_string(buffer.getvalue()), path, metadata, input_size)


def save_checked(proto: Any, path: Path, metadata: dict[str, Any] | None, input_size: int,
                 full_check: bool = True) -> Path:
    """Write an ONNX model to `path` the safe way: `metadata` as its metadata_props (replacing any), checked with
    onnx.checker, saved beside `path`, run once on ONNX Runtime, then renamed into place."""
    onnx = require("onnx")

    del proto.metadata_props[:]
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto, full_check=full_check)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
        check_onnx_runs(tmp, input_size)
    return path


def qad_to_int8(source: Path, path: Path, metadata: dict[str, Any], input_size: int, fp16: bool = False) -> Path:
    """The QAD stage's ONNX (Model Optimizer's fake quantization, exported: FP32 weights behind Q/DQ) as the INT8
    artifact: weights stored as INT8 (`fold_weight_quantization`), the export's `metadata`; `fp16`: FP16 outside
    the Q/DQ pairs, for TensorRT (`int8_with_fp16`)."""
    onnx = require("onnx")
    proto = fold_weight_quantization(onnx.load(str(source)))
    return save_checked(int8_with_fp16(proto) if fp16 else proto, path, metadata, input_size, full_check=False)


def fold_weight_quantization(proto: Any) -> Any:
    """QuantizeLinear of a constant (a weight) is computed once here: its INT8 result becomes an initializer that
    the DequantizeLinear reads, as in ONNX Runtime's own QDQ files. The exporter writes FP32 weights and quantizes
    them at every inference (a file larger than the FP32 one, and 3.7x slower on ONNX Runtime CPU for the
    quickstart CNN). Same rounding as the operator: x / scale rounded half to even, plus the zero point, saturated."""
    import numpy as np
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def constant(name: str) -> Any:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = constant_nodes.get(name)
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node is not None else None
        return numpy_helper.to_array(value) if value is not None else None

    folded = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        x, scale, zero_point = (constant(name) for name in node.input[:3])
        if x is None or scale is None or zero_point is None:
            continue  # an activation: quantized at run time
        if scale.ndim == 1 and x.ndim > 1:  # per channel, along `axis`
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        limits = np.iinfo(zero_point.dtype)
        quantized = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zero_point.astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(
            np.clip(quantized, limits.min, limits.max).astype(zero_point.dtype), node.output[0]))
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    return proto


def onnx_to_triton(onnx_path: Path, repository: Path, name: str, input_size: int, labels: list[str],
                   max_batch_size: int = 64) -> Path:
    """A Triton Inference Server model repository holding the ONNX model: <repository>/<name>/config.pbtxt,
    labels.txt and 1/model.onnx, with dynamic batching over the batch axis. Returns the model file."""
    import shutil

    model_dir = repository / name
    model_file = model_dir / layout.TRITON_VERSION / layout.TRITON_FILE
    model_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(model_file) as tmp:
        shutil.copyfile(onnx_path, tmp)
    (model_dir / layout.TRITON_LABELS).write_text("".join(f"{label}\n" for label in labels))
    config = f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ 3, {input_size}, {input_size} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {len(labels)} ]
    label_filename: "{layout.TRITON_LABELS}"
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 1000
}}
instance_group [
  {{
    kind: KIND_AUTO
    count: 1
  }}
]
"""
    (model_dir / layout.TRITON_CONFIG).write_text(config)
    return model_file


# Op types the FP16 graph keeps in FP32: LayerNorm, Softmax and reductions (their sums of squares and
# exponentials overflow or lose the small terms in FP16), plus the ops ONNX Runtime's converter never converts
FP32_OP_TYPES = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Exp")


def onnx_to_fp16(fp32_path: Path, path: Path, metadata: dict[str, Any] | None = None,
                 keep_fp32: tuple[str, ...] = FP32_OP_TYPES) -> Path:
    """FP16 weights and activations, FP32 inputs and outputs (callers and TensorRT I/O stay FP32), op types in
    `keep_fp32` computed in FP32 behind Cast nodes. Uses ONNX Runtime's float16 converter, then sorts the graph
    (the converter appends the input Casts at the end). Checked and run on ONNX Runtime CPU before it is moved
    into place; this graph is what a strongly typed TensorRT build turns into an FP16 engine."""
    onnx = require("onnx")
    require("onnxruntime")
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = onnx.load(str(fp32_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(proto, keep_io_types=True,
                                        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *keep_fp32])
    model = OnnxModel(half)
    model.topological_sort()
    input_size = model.model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    return save_checked(model.model, path, metadata, input_size)


# QuantizeLinear/DequantizeLinear take FP16 scales (and DequantizeLinear returns FP16) from opset 19 on
QDQ_FP16_OPSET = 19


def int8_with_fp16(proto: Any, keep_fp32: tuple[str, ...] = FP32_OP_TYPES) -> Any:
    """The INT8 graph TensorRT wants: its Q/DQ pairs (symmetric INT8) unchanged, every other float op computing in
    FP16 (op types in `keep_fp32` in FP32 behind Casts, as in the FP16 export), FP32 inputs and outputs. Without this,
    a strongly typed TensorRT build keeps everything between the Q/DQ pairs in FP32 and the INT8 engine can be slower
    than the FP16 one. The graph moves to opset 19, where Q/DQ scales can be FP16 (ONNX's version converter), then
    ONNX Runtime's float16 converter does the rest (the way NVIDIA's Model Optimizer writes its INT8 ONNX, with
    high_precision_dtype fp16)."""
    require("onnx")
    require("onnxruntime")
    from onnx import version_converter
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < QDQ_FP16_OPSET:
        proto = version_converter.convert_version(proto, QDQ_FP16_OPSET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(proto, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *keep_fp32])
    model = OnnxModel(half)
    model.topological_sort()
    return model.model


def check_onnx_runs(path: Path, input_size: int) -> None:
    """One ONNX Runtime inference at batch 2 (exercises the dynamic batch axis)."""
    import numpy as np

    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {INPUT_NAME: np.zeros((2, 3, input_size, input_size), np.float32)})[0]
    if out.shape[0] != 2 or not np.isfinite(out).all():
        raise ExportError(f"{path}: ONNX Runtime returned {out.shape} / non-finite logits for a batch of 2")


# ONNX Runtime's quantization settings per target. cpu: uint8 activations / int8 weights, the fast path of
# ONNX Runtime's x86 kernels (int8/int8 ran 4-5x slower than FP32 on a 2-core x86 CPU). tensorrt: symmetric
# int8 activations and weights (zero points 0), Q/DQ pairs on weights and one pair per consumer, which is
# what TensorRT's explicit-quantization (strongly typed) builds fuse, biases left float (TensorRT adds them in high
# precision; an int32 bias would carry a scale of input scale x weight scale, ~1e-6, which FP16 cannot hold), every
# other op in FP16 (`int8_with_fp16`, opset 19). For both, only MatMuls with a constant
# weight are quantized (see `quantizable_nodes`): activation-by-activation MatMuls (attention scores) stay float,
# so Softmax never sees int8 inputs.
INT8_TARGETS: dict[str, dict[str, Any]] = {
    "cpu": {"activation": "QUInt8", "extra": {"WeightSymmetric": True}},
    "tensorrt": {"activation": "QInt8", "extra": {
        "ActivationSymmetric": True, "WeightSymmetric": True, "AddQDQPairToWeight": True,
        "DedicatedQDQPair": True, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}, "QuantizeBias": False,
    }},
}
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def onnx_to_int8(
    fp32_path: Path,
    path: Path,
    calibration: list[Any],
    target: str = "cpu",
    method: str = "minmax",
    op_types: list[str] | tuple[str, ...] = ("Conv", "MatMul", "Gemm"),
    exclude: list[str] | tuple[str, ...] = (),
    metadata: dict[str, Any] | None = None,
    calibration_cache: Path | None = None,
    prepared: Path | None = None,
    progress: Any = None,
) -> Path:
    """Static QDQ INT8 with per-channel weights, calibrated on `calibration` (a list of float32 input batches).

    Only `op_types` are quantized (LayerNorm, Softmax, GELU and the like stay float); nodes named in `exclude`
    (names in the prepared graph, see `quantizable_nodes`) stay float too. `calibration_cache` (a JSON file)
    lets repeated quantizations of one model reuse the activation ranges instead of calibrating again;
    `prepared` (the output of `prepare_for_int8`) saves preparing the graph again. `progress(done, total)` is
    called as each calibration batch is read.
    """
    onnx = require("onnx")
    require("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not calibration:
        raise ExportError("INT8 calibration needs at least one batch of training images; got none")
    settings = INT8_TARGETS[target]

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)
            self.done = 0

        def get_next(self):
            batch = next(self.items, None)
            if batch is not None and progress:
                self.done += 1
                progress(self.done, len(calibration))
            return None if batch is None else {INPUT_NAME: batch}

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    own_prepared = prepared is None
    if own_prepared:
        prepared = path.with_name(f".{path.name}.pre-{os.getpid()}")
    try:
        if own_prepared:
            prepare_for_int8(fp32_path, prepared)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # newer ONNX Runtime releases can keep calibration ranges in a file; older ones calibrate every time
            reuse = calibration_cache and "calibration_cache_path" in inspect.signature(quantize_static).parameters
            kwargs = {"calibration_cache_path": calibration_cache} if reuse else {}
            quantize_static(
                str(prepared), str(tmp), Batches(), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(op_types), per_channel=True,
                nodes_to_quantize=[n for n in quantizable_nodes(prepared, op_types) if n not in exclude],
                reduce_range=False, activation_type=getattr(QuantType, settings["activation"]),
                weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                extra_options=dict(settings["extra"]), **kwargs,
            )
        proto = onnx.load(str(tmp))
        if target == "tensorrt":
            proto = int8_with_fp16(proto)
        save_checked(proto, path, metadata, int(calibration[0].shape[-1]), full_check=False)
    finally:
        tmp.unlink(missing_ok=True)
        if own_prepared:
            prepared.unlink(missing_ok=True)
    return path


def onnx_to_int8_bias_corrected(fp32_path: Path, path: Path, calibration: list[Any],
                                 exclude: list[str] | tuple[str, ...] = (),
                                 metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """INT8 without training that recovers what plain PTQ loses on small CNNs: NNCF's post-training quantization
    of the ONNX graph (`nncf.quantize` on the ModelProto; its MIXED preset: symmetric per-channel INT8 weights,
    asymmetric INT8 activations, QDQ pairs ONNX Runtime runs on CPU) with its fast bias correction: after
    quantizing, each layer's bias is shifted by the mean difference between its FP32 and quantized outputs on the
    calibration images, so the rounding stops moving every answer the same way. NNCF's own ImageNet data has
    timm's mobilenetv3_small_050 at 57.91 FP32, 42.22 by plain PTQ, 56.74 this way. `exclude`: node names kept in
    float where the graph has them. Returns what the quantizer did."""
    onnx = require("onnx")
    nncf = require("nncf")

    if not calibration:
        raise ExportError("INT8 calibration needs at least one batch of training images; got none")
    model = onnx.load(str(fp32_path))
    dataset = nncf.Dataset(calibration, lambda batch: {INPUT_NAME: batch})
    ignored = nncf.IgnoredScope(names=list(exclude), validate=False) if exclude else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=len(calibration),
                                  fast_bias_correction=True, **({"ignored_scope": ignored} if ignored else {}))
    pairs = sum(node.op_type == "QuantizeLinear" for node in quantized.graph.node)
    if pairs == 0:
        raise ExportError(f"NNCF placed no quantizer in {fp32_path.name} (every quantizable layer excluded?)")
    save_checked(quantized, path, metadata, int(calibration[0].shape[-1]), full_check=False)
    return {"quantizer": "nncf.quantize (fast bias correction)", "quantize_linear_ops": pairs}


def prepare_for_int8(fp32_path: Path, prepared: Path) -> Path:
    """ONNX Runtime's pre-processing for quantization: shape inference and graph optimization. The optimization
    matters: on a 2-core x86 CPU resnet18 INT8 ran 2x slower than FP32 without it and about 2x faster with it."""
    require("onnxruntime")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    return prepared


def quantizable_nodes(prepared: Path, op_types: list[str] | tuple[str, ...]) -> list[str]:
    """Names of the nodes INT8 quantization touches in a prepared model (the names `exclude` takes), in graph
    order: nodes of `op_types`, except MatMuls whose second input is not a constant weight (ONNX Runtime's
    MatMulConstBOnly option does this for QOperator models only, so QDQ models are filtered here)."""
    onnx = require("onnx")
    graph = onnx.load(str(prepared)).graph
    constants = {t.name for t in graph.initializer}
    return [node.name for node in graph.node if node.op_type in op_types
            and not (node.op_type == "MatMul" and node.input[1] not in constants)]


def weights_beside(model_path: Path) -> dict[str, Any]:
    """The .bin beside a model file (an OpenVINO IR's, an NCNN graph's) is recorded and hashed too: verification,
    benchmarks and serving check both files."""
    weights = model_path.with_suffix(".bin")
    return {"weights_file": weights.name, "weights_sha256": file_hash(weights), "weights_bytes": weights.stat().st_size}


def onnx_to_openvino(onnx_path: Path, xml_path: Path, metadata: dict[str, Any],
                     calibration: list[Any] | None = None, validation: list[tuple[Any, int]] | None = None,
                     max_drop: float | None = None) -> dict[str, Any]:
    """Convert an ONNX export to OpenVINO IR (`xml_path` + the .bin beside it) with `metadata` in its rt_info
    under "kdforge"; weights compressed to FP16 (`openvino.save_model`'s default). With `calibration` (batches of
    prepared float32 images), the model is quantized to INT8 first with NNCF: post-training quantization
    (`nncf.quantize`, its default symmetric preset), or, with `max_drop` (top-1 points) and `validation` (prepared
    single images with their labels), NNCF's accuracy-controlled quantization, which keeps the layers that cost
    most top-1 on `validation` in float until the drop is at most `max_drop`. Written into a temporary folder,
    loaded and run once on the CPU plugin, then moved into place (.bin first, so an .xml is never without it).
    Returns what the quantizer did (empty for FP32): its name and how many FakeQuantize ops it placed."""
    import shutil

    import numpy as np

    ov = require("openvino")
    model = ov.convert_model(str(onnx_path))
    info: dict[str, Any] = {}
    if calibration is not None:
        nncf = require("nncf")
        # NNCF counts dataset items, here whole batches: every calibration image is used
        dataset = nncf.Dataset(calibration)
        if max_drop is None:
            model = nncf.quantize(model, dataset, subset_size=len(calibration))
            info["quantizer"] = "nncf.quantize"
        else:
            if not validation:
                raise ExportError("accuracy-controlled INT8 needs held-out training images beyond the calibration "
                                  "set; lower [quantize] calibration")

            def top1(compiled: Any, items: Any) -> tuple[float, list[float]]:
                output = compiled.output(0)
                hits = [float(int(np.argmax(compiled(image)[output])) == label) for image, label in items]
                return float(np.mean(hits)), hits  # per image: NNCF ranks layers by the images they change

            model = nncf.quantize_with_accuracy_control(
                model, dataset, nncf.Dataset(validation), top1, max_drop=max_drop / 100,
                drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calibration))
            info.update(quantizer="nncf.quantize_with_accuracy_control", max_top1_drop=max_drop,
                        heldout_images=len(validation))
        info["fake_quantize_ops"] = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
    for key, value in metadata.items():
        model.set_rt_info(value if isinstance(value, str) else json.dumps(value), ["kdforge", key])
    tmp = xml_path.with_name(f".{xml_path.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        ov.save_model(model, str(tmp / xml_path.name), compress_to_fp16=True)
        compiled = ov.Core().compile_model(str(tmp / xml_path.name), "CPU")
        size = int(metadata["input_size"])
        compiled(np.zeros((1, 3, size, size), np.float32))
        (tmp / xml_path.name).with_suffix(".bin").replace(xml_path.with_suffix(".bin"))
        (tmp / xml_path.name).replace(xml_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info
