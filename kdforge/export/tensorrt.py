"""TensorRT engines: build one from an ONNX file (`onnx_to_trt`).

Strongly typed networks only, the one path TensorRT 10 and 11 share: the precision comes from the ONNX graph
(an FP16 graph for FP16, symmetric int8 Q/DQ nodes for INT8); no FP16/INT8 builder flags, no calibrators, no
explicit-batch flag. TensorRT 10 needs the STRONGLY_TYPED network flag; TensorRT 11 accepts and ignores it
(strong typing is always on there).

    info = onnx_to_trt(Path("student.fp16.onnx"), Path("student.fp16.engine"), profile=(1, 32, 256))

An engine is valid only for the TensorRT version and GPU architecture it was built with: the sidecar
`<engine>.json` records both (`this_gpu`); where it may run, and running it, is `kdforge.runners.tensorrt`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from kdforge.errors import ExportError
from kdforge.fileio import atomic_path
from kdforge.runners.tensorrt import load_tensorrt, this_gpu


def onnx_to_trt(
    onnx_path: Path,
    path: Path,
    profile: tuple[int, int, int],
    workspace_mb: int | None = None,
    timing_cache: Path | None = None,
    input_name: str = "input",
) -> dict[str, Any]:
    """Build a strongly typed engine from `onnx_path` with one optimization profile over the batch axis
    (min, opt, max); write it atomically to `path`. Returns what the engine is tied to and how it was built
    (TensorRT version, GPU, compute capability, precisions of the built layers, profile, build time)."""
    trt = load_tensorrt()
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 1 << int(strongly_typed) if strongly_typed is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors[:500]}")

    config = builder.create_builder_config()
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # lets the inspector report layer precisions
    shape = tuple(network.get_input(0).shape)[1:]
    batch_profile = builder.create_optimization_profile()
    batch_profile.set_shape(input_name, *[(b, *shape) for b in profile])
    config.add_optimization_profile(batch_profile)
    cache = None
    if timing_cache:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, False)  # False: refuse a cache from another device

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(serialized))
    if cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))

    layers = layer_precisions(trt, logger, path)
    return {
        **this_gpu(),
        "precision_built": "int8" if layers.get("int8") else "fp16" if layers.get("fp16") else "fp32",
        "layer_precisions": layers,
        "strongly_typed": True,
        "profile": {"min_batch": profile[0], "opt_batch": profile[1], "max_batch": profile[2]},
        "workspace_mb": workspace_mb,
        "timing_cache": str(timing_cache) if timing_cache else None,
        "build_s": round(time.perf_counter() - started, 1),
    }


def layer_precisions(trt, logger, path: Path) -> dict[str, int]:
    """How many layer outputs of the built engine are Float / Half / Int8, from the engine inspector's JSON
    (TensorRT 10 writes "Format/Datatype", TensorRT 11 a separate "DataType" field; both are counted)."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ExportError(f"TensorRT cannot load the engine it just built: {path}")
    text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return count_precisions(json.loads(text))


# data type words in the inspector's output descriptions ("Row major linear FP32", "Half", "Int8", ...)
_PRECISION_WORDS = {"fp32": "fp32", "float": "fp32", "fp16": "fp16", "half": "fp16", "int8": "int8",
                    "bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8", "int32": "int32", "int64": "int64"}


def count_precisions(info: dict[str, Any]) -> dict[str, int]:
    """Layer outputs per precision (fp32, fp16, int8, ...) in an engine inspector's JSON document."""
    counts: dict[str, int] = {}
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):  # layer names only: the engine was built without detailed verbosity
            continue
        for output in layer.get("Outputs", []):
            described = " ".join(str(v) for k, v in output.items() if "format" in k.lower() or "type" in k.lower())
            words = re.findall(r"[a-z0-9]+", described.lower())
            kind = next((_PRECISION_WORDS[w] for w in words if w in _PRECISION_WORDS), None)
            if kind:
                counts[kind] = counts.get(kind, 0) + 1
    return counts
