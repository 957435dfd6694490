"""The table of export formats: name -> file, precision, whether it needs a GPU, which options it takes.

Options are checked against this table before any work starts; a format never silently changes what the
user asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdforge.recipe import QuantizeConfig
from kdforge.registry import Registry


@dataclass(frozen=True)
class ExportFormat:
    name: str
    filename: str  # inside exports/<recipe>/
    precision: str  # fp32 | fp16 | int8: which [verify] tolerance applies
    needs_gpu: bool
    options: frozenset[str]  # options this format accepts


FORMATS: Registry[ExportFormat] = Registry("export format")
FORMATS.register("onnx")(ExportFormat("onnx", "student.onnx", "fp32", needs_gpu=False, options=frozenset({"opset"})))
# INT8 is quantized from the FP32 ONNX export, which is produced (and verified) first; it takes the keys of
# [quantize] as options (target, calibration, method, ...)
FORMATS.register("int8")(ExportFormat(
    "int8", "student.int8.onnx", "int8", needs_gpu=False,
    options=frozenset({"opset", *QuantizeConfig.model_fields} - {"enabled"}),
))
# A Triton Inference Server model repository around the FP32 ONNX export (config.pbtxt, labels, model.onnx)
FORMATS.register("triton")(ExportFormat(
    "triton", "triton/student/1/model.onnx", "fp32", needs_gpu=False, options=frozenset({"opset"}),
))
