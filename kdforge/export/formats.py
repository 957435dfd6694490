"""The table of export formats: name -> file, precision, what it is made from, whether it needs a GPU, which
options it takes.

Options are checked against this table before any work starts; a format never silently changes what the
user asked for. A format made from another (`source`) brings that one along: asking for `trt_fp16` exports
and verifies `onnx`, then `fp16`, then builds the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdforge.recipe import QuantizeConfig, TensorRTConfig
from kdforge.registry import Registry


@dataclass(frozen=True)
class ExportFormat:
    name: str
    filename: str  # inside exports/<recipe>/
    precision: str  # fp32 | fp16 | int8: which [verify] tolerance applies
    needs_gpu: bool  # needs TensorRT and a CUDA GPU to be built and run
    options: frozenset[str]  # options this format accepts
    source: str | None = None  # the format this one is made from


QUANTIZE_OPTIONS = frozenset(QuantizeConfig.model_fields) - {"enabled"}
TENSORRT_OPTIONS = frozenset(TensorRTConfig.model_fields)

FORMATS: Registry[ExportFormat] = Registry("export format")
FORMATS.register("onnx")(ExportFormat("onnx", "student.onnx", "fp32", needs_gpu=False, options=frozenset({"opset"})))
# INT8 is quantized from the FP32 ONNX export; it takes the keys of [quantize] as options (target, calibration, ...)
FORMATS.register("int8")(ExportFormat(
    "int8", "student.int8.onnx", "int8", needs_gpu=False, options=frozenset({"opset"}) | QUANTIZE_OPTIONS,
    source="onnx",
))
# FP16 weights and activations, FP32 inputs/outputs, LayerNorm/Softmax/reductions kept FP32; verified on ONNX
# Runtime before TensorRT ever sees it
FORMATS.register("fp16")(ExportFormat(
    "fp16", "student.fp16.onnx", "fp16", needs_gpu=False, options=frozenset({"opset"}), source="onnx",
))
# A Triton Inference Server model repository around the FP32 ONNX export (config.pbtxt, labels, model.onnx)
FORMATS.register("triton")(ExportFormat(
    "triton", "triton/student/1/model.onnx", "fp32", needs_gpu=False, options=frozenset({"opset"}), source="onnx",
))
# OpenVINO IR (student.openvino.xml + .bin) converted from the FP32 ONNX, weights stored in FP16 (OpenVINO's
# default; its CPU plugin computes in FP32, or bf16 on AMX CPUs), batch axis dynamic; runs on OpenVINO's CPU plugin
FORMATS.register("openvino")(ExportFormat(
    "openvino", "student.openvino.xml", "fp16", needs_gpu=False, options=frozenset({"opset"}), source="onnx",
))
# OpenVINO INT8: NNCF post-training quantization of the FP32 ONNX's IR, calibrated on the same training-split images
# as the ONNX INT8 export ([quantize] calibration); with [quantize] max_top1_drop, NNCF's accuracy-controlled
# quantization on the same held-out training images as the ONNX accuracy-aware search
FORMATS.register("openvino_int8")(ExportFormat(
    "openvino_int8", "student.openvino.int8.xml", "int8", needs_gpu=False,
    options=frozenset({"opset", "calibration", "batch_size", "max_top1_drop", "sensitivity_images", "escalate"}),
    source="onnx",
))
# TensorRT engines, strongly typed: the precision is the source graph's (FP16 ONNX; symmetric Q/DQ INT8 ONNX)
FORMATS.register("trt_fp16")(ExportFormat(
    "trt_fp16", "student.fp16.engine", "fp16", needs_gpu=True, options=frozenset({"opset"}) | TENSORRT_OPTIONS,
    source="fp16",
))
FORMATS.register("trt_int8")(ExportFormat(
    "trt_int8", "student.int8.engine", "int8", needs_gpu=True,
    options=frozenset({"opset"}) | TENSORRT_OPTIONS | QUANTIZE_OPTIONS, source="int8",
))


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
