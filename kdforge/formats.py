"""The table of export formats: for each, its file, precision, what it is made from, what opens it, whether it
is served and benchmarked, which options it takes and what it needs installed.

    fmt = FORMATS.get("int8")   # ExportFormat(name="int8", filename="student.int8.onnx", runner="onnxruntime", ...)

How a format is MADE is `kdforge.export.builders.BUILDERS[name]` (a converter with this format's metadata);
how it is OPENED is its `runner`: `kdforge.runners.open_runner` for verification and benchmarks (torch),
`kdforge.serve.model.open_session` for serving (numpy only). This module imports neither torch nor the recipe,
so the recipe validates format names against it and the serving image reads it. Adding a format: one entry
here, one converter (export/converters.py) and one builder (export/builders.py); a runner only for a new kind
of file.

Options are checked against this table before any work starts; a format never silently changes what the user
asked for. A format made from another (`source`) brings that one along: asking for `trt_fp16` exports and
verifies `onnx`, then `fp16`, then builds the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdforge import layout
from kdforge.registry import Registry

RUNNERS = ("onnxruntime", "openvino", "tensorrt", "executorch", "litert", "ncnn")  # the kinds of file a runner opens
# the graph's input and output names in every exported file (ONNX, and the TensorRT engines built from it)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ExportFormat:
    name: str
    filename: str  # inside exports/<recipe>/
    precision: str  # fp32 | fp16 | int8: which [verify] tolerance applies
    runner: str  # one of RUNNERS: what opens the file for verification, benchmarks and serving
    source: str | None = None  # the format this one is made from
    needs_gpu: bool = False  # needs TensorRT and a CUDA GPU to be built and run
    options: frozenset[str] = frozenset({"opset"})  # `kdforge export` options this format takes
    option_sections: tuple[str, ...] = ()  # recipe sections whose every key it also takes ("quantize", "tensorrt")
    requires: tuple[str, ...] = ()  # Python modules it needs to be made (beyond the `export` extra)
    extra: str = ""  # the pip extra that installs them
    serve_rank: int | None = None  # servable: its place in `serve --format auto`'s order without a bench.json
    bench_skip: str | None = None  # why `kdforge bench` does not measure it (None: measured)


FORMATS: Registry[ExportFormat] = Registry("export format")


def _add(fmt: ExportFormat) -> None:
    FORMATS.register(fmt.name)(fmt)


_add(ExportFormat("onnx", "student.onnx", "fp32", "onnxruntime", serve_rank=1))
# INT8 is quantized from the FP32 ONNX export; it takes the keys of [quantize] as options (target, calibration, ...)
_add(ExportFormat("int8", "student.int8.onnx", "int8", "onnxruntime", source="onnx", option_sections=("quantize",),
                  serve_rank=0))
# FP16 weights and activations, FP32 inputs/outputs, LayerNorm/Softmax/reductions kept FP32; verified on ONNX
# Runtime before TensorRT ever sees it
_add(ExportFormat("fp16", "student.fp16.onnx", "fp16", "onnxruntime", source="onnx", serve_rank=2))
# A Triton Inference Server model repository around the FP32 ONNX export (config.pbtxt, labels, model.onnx)
_add(ExportFormat("triton", f"{layout.TRITON}/{layout.TRITON_MODEL}/{layout.TRITON_VERSION}/{layout.TRITON_FILE}",
                  "fp32", "onnxruntime", source="onnx",
                  bench_skip="the same model file as onnx, for Triton's server"))
# OpenVINO IR (student.openvino.xml + .bin) converted from the FP32 ONNX, weights stored in FP16 (OpenVINO's
# default; its CPU plugin computes in FP32, or bf16 on AMX CPUs), batch axis dynamic; runs on OpenVINO's CPU plugin
_add(ExportFormat("openvino", "student.openvino.xml", "fp16", "openvino", source="onnx", requires=("openvino",),
                  extra="openvino", serve_rank=4))
# OpenVINO INT8: NNCF post-training quantization of the FP32 ONNX's IR, calibrated on the same training-split images
# as the ONNX INT8 export ([quantize] calibration); with [quantize] max_top1_drop, NNCF's accuracy-controlled
# quantization on the same held-out images as the ONNX accuracy-aware search
_add(ExportFormat("openvino_int8", "student.openvino.int8.xml", "int8", "openvino", source="onnx",
                  options=frozenset({"opset", "calibration", "batch_size", "max_top1_drop", "sensitivity_images",
                                     "escalate"}),
                  requires=("openvino", "nncf"), extra="openvino", serve_rank=3))
# On-device runtimes, made from the PyTorch student (export/edge.py), each file's input spec in its sidecar JSON.
# ExecuTorch (PyTorch's on-device runtime): a .pte program lowered to the XNNPACK delegate, batch axis dynamic (1-256)
_add(ExportFormat("executorch", "student.pte", "fp32", "executorch", options=frozenset(), requires=("executorch",),
                  extra="executorch"))
# ExecuTorch INT8: PT2E quantization with ExecuTorch's XNNPACKQuantizer (symmetric; weights per channel), calibrated
# on the same training-split images as the other INT8 formats ([quantize] calibration, batch_size); with
# max_top1_drop (or when it fails and `escalate` allows accuracy_aware), sensitive layers stay in float
PT2E_OPTIONS = frozenset({"calibration", "batch_size", "max_top1_drop", "sensitivity_images", "escalate"})
_add(ExportFormat("executorch_int8", "student.int8.pte", "int8", "executorch", options=PT2E_OPTIONS,
                  requires=("executorch",), extra="executorch"))
# LiteRT (the former TensorFlow Lite; Android, Arm boards, MCUs): litert-torch's conversion, NCHW input as in PyTorch
_add(ExportFormat("litert", "student.tflite", "fp32", "litert", options=frozenset(), requires=("litert_torch",),
                  extra="litert", serve_rank=6))
# LiteRT INT8: full-integer (INT8 weights, activations, input and output tensors) by PT2E with litert-torch's
# quantizer, calibrated and escalated as ExecuTorch's INT8; the runner and the server quantize the input and
# dequantize the logits with the file's scales
_add(ExportFormat("litert_int8", "student.int8.tflite", "int8", "litert", options=PT2E_OPTIONS,
                  requires=("litert_torch",), extra="litert", serve_rank=5))
# NCNN (Android, Raspberry Pi): pnnx's conversion, student.ncnn.param + student.ncnn.bin, weights stored in FP16
# (pnnx's default, what NCNN apps ship; computed in FP32 here), so the fp16 tolerance applies
_add(ExportFormat("ncnn", "student.ncnn.param", "fp16", "ncnn", options=frozenset(), requires=("pnnx", "ncnn"),
                  extra="ncnn", serve_rank=7))
# TensorRT engines, strongly typed: the precision is the source graph's (FP16 ONNX; symmetric Q/DQ INT8 ONNX)
_add(ExportFormat("trt_fp16", "student.fp16.engine", "fp16", "tensorrt", source="fp16", needs_gpu=True,
                  option_sections=("tensorrt",)))
_add(ExportFormat("trt_int8", "student.int8.engine", "int8", "tensorrt", source="int8", needs_gpu=True,
                  option_sections=("tensorrt", "quantize")))


def servable() -> list[str]:
    """The formats a server can load, in `--format auto`'s order of preference without a bench.json: INT8
    (smaller, usually faster on CPU), FP32, FP16 (for GPUs), then the OpenVINO IRs, LiteRT and NCNN models (each
    where its runtime is installed)."""
    ranked = [fmt for fmt in map(FORMATS.get, FORMATS) if fmt.serve_rank is not None]
    return [fmt.name for fmt in sorted(ranked, key=lambda fmt: fmt.serve_rank)]


def format_of_file(relative: str) -> str | None:
    """The format whose file is `relative` (a path inside an export folder), or None."""
    return next((name for name in FORMATS if FORMATS.get(name).filename == relative), None)


def with_sources(names: list[str]) -> list[str]:
    """`names` plus every format they are made from, each after its source, in a stable order."""
    ordered: list[str] = []

    def add(name: str) -> None:
        source = FORMATS.get(name).source
        if source:
            add(source)
        if name not in ordered:
            ordered.append(name)

    for name in names:
        add(name)
    return ordered
