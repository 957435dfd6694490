"""Runners with one interface: `predict(uint8 images (N, 3, H, W)) -> float32 logits (N, classes)` on the CPU.

Every runner prepares its input with the same `InputSpec.prepare` (resize to the model's size, normalize with
its mean/std), so a comparison between runners compares the models, not two preprocessing pipelines.

    runner = OnnxRunner(Path("exports/quickstart/student.onnx"))
    logits = runner.predict(images)           # runner.provider says where it ran
    runner = open_runner(Path("exports/quickstart/student.fp16.engine"), FORMATS.get("trt_fp16").runner)
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from kdforge.data.transforms import InputSpec
from kdforge.errors import ExportError
from kdforge.export.converters import INPUT_NAME, OUTPUT_NAME
from kdforge.fileio import read_json
from kdforge.optional import require
from kdforge.rng import rng_stream
from kdforge.runtime import Runtime, exact_fp32

# ONNX Runtime execution providers in order of preference; the first one installed wins
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class Runner(Protocol):
    name: str
    spec: InputSpec

    def predict(self, images: torch.Tensor) -> torch.Tensor: ...


class TorchRunner:
    """The PyTorch model in eval mode, true FP32 (the reference every export is compared with): no autocast, and
    on CUDA with TF32 off for cuDNN and matmuls while it runs (Ampere/Hopper default to TF32 convolutions)."""

    def __init__(self, model: torch.nn.Module, spec: InputSpec, runtime: Runtime) -> None:
        self.model = model.eval().to(runtime.device)
        self.spec = spec
        self.runtime = runtime
        tf32 = ", TF32 off" if runtime.device.type == "cuda" else ""
        self.name = f"pytorch ({runtime.device.type}, fp32{tf32})"

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        with exact_fp32():
            return self.model(self.spec.prepare(images.to(self.runtime.device))).float().cpu()


def choose_providers(requested: list[str] | None = None) -> list[str]:
    ort = require("onnxruntime")

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ExportError(f"ONNX Runtime providers not installed: {missing}; available: {available}")
        return requested
    return [p for p in PREFERRED_PROVIDERS if p in available]


class OnnxRunner:
    """An ONNX file through ONNX Runtime. Input size and mean/std come from the file's own metadata."""

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None,
                 many_batches: bool = False) -> None:
        ort = require("onnxruntime")

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"ONNX file not found: {self.path}")
        options = ort.SessionOptions()
        if threads:  # default: ONNX Runtime's (one per physical core)
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        if many_batches:  # verification: ORT's memory pattern grew a session by ~1.1 GB over 50 batches at 224
            options.enable_mem_pattern = False
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=choose_providers(providers))
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ExportError(
                f"{self.path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]}); "
                f"the file is truncated, tampered with or not an ONNX model: export it again"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.spec = InputSpec(int(meta["input_size"]), tuple(json.loads(meta["mean"])),
                                  tuple(json.loads(meta["std"])))
        except (KeyError, ValueError) as exc:
            raise ExportError(f"{self.path}: not a kdforge export (metadata lacks {exc})") from None
        self.metadata = meta
        self.provider = self.session.get_providers()[0]
        self.name = f"onnxruntime ({self.provider.removesuffix('ExecutionProvider')})"

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = self.spec.prepare(images.cpu()).numpy()
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: x})[0]).float()


class TrtRunner:
    """A TensorRT engine on a CUDA device, with torch CUDA tensors as its I/O buffers.

    Input size and mean/std come from the engine's sidecar `<engine>.json`, which also records the TensorRT
    version and GPU the engine was built for: an engine from another TensorRT version or GPU architecture is
    refused. Batches larger than the engine's profile are split; smaller than its minimum, padded."""

    def __init__(self, path: Path, device: str | None = None) -> None:
        from kdforge.export.tensorrt import check_engine_runs_here, load_tensorrt, this_gpu

        trt = load_tensorrt()
        self.path = Path(path)
        sidecar = self.path.with_name(self.path.name + ".json")
        if not self.path.is_file() or not sidecar.is_file():
            raise ExportError(f"{self.path} or its sidecar {sidecar.name} is missing; "
                              f"build it with `kdforge export --trt`")
        meta = read_json(sidecar)
        self.device = torch.device(device or "cuda")
        torch.cuda.set_device(self.device)
        here = this_gpu()
        self.notes = check_engine_runs_here(self.path, meta["tensorrt"], here)
        self.spec = InputSpec(int(meta["input_size"]), tuple(meta["mean"]), tuple(meta["std"]))
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
        from kdforge.export.tensorrt import split_batches

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


class OpenVinoRunner:
    """An OpenVINO IR (.xml + .bin) on OpenVINO's CPU plugin, in FP32 arithmetic (the FP16-stored weights are
    widened). Input size and mean/std come from the model's rt_info (written by `onnx_to_openvino`)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        ov = require("openvino")

        self.path = Path(path)
        if not self.path.is_file() or not self.path.with_suffix(".bin").is_file():
            raise ExportError(f"OpenVINO model not found: {self.path} and its .bin are needed")
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
            meta = {key: model.get_rt_info(["kdforge", key]).astype(str) for key in ("input_size", "mean", "std")}
            config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
            self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:  # OpenVINO reports parse and missing-key errors as RuntimeError
            raise ExportError(f"{self.path}: OpenVINO cannot load it ({str(exc).splitlines()[0][:200]}); export it "
                              f"again") from None
        self.spec = InputSpec(int(meta["input_size"]), tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"])))
        self.output = self.compiled.output(0)
        self.name = f"openvino {ov.__version__.split('-')[0]} (CPU)"

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = self.spec.prepare(images.cpu()).numpy()
        return torch.from_numpy(self.compiled(x)[self.output].copy()).float()


def open_runner(path: Path, kind: str, device: str | None = None, threads: int | None = None,
                many_batches: bool = False) -> OnnxRunner | TrtRunner | OpenVinoRunner:
    """The runner for an exported artifact of runner `kind` (a format's `runner` in kdforge.formats): ONNX
    Runtime, OpenVINO or TensorRT (`device`: its CUDA device; `threads`: CPU threads for the CPU runtimes;
    default: theirs). `many_batches`: memory stays flat over a whole split (verification) rather than the last
    bit of latency (`kdforge bench` times with the runtimes' defaults)."""
    if kind == "tensorrt":
        return TrtRunner(path, device)
    if kind == "openvino":
        return OpenVinoRunner(path, threads)
    return OnnxRunner(path, threads=threads, many_batches=many_batches)


# ----------------------------------------------------------------------------------------------------------
# timing a runner (`kdforge bench` and the INT8 latency check)


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Seconds per call of `fn`, `repeats` times after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, like numpy's default."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure(runner: Runner, size: int, batch_size: int, repeats: int, warmup: int) -> tuple[float, float, float]:
    """(p50 ms, p95 ms) at batch 1 and images/s at `batch_size` for one runner, on fixed random uint8 images."""
    generator = rng_stream(0, "bench_images")
    one = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=generator)
    many = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
    single = time_calls(lambda: runner.predict(one), warmup, repeats)
    batched = time_calls(lambda: runner.predict(many), min(warmup, 3), max(5, repeats // 5))
    return percentile(single, 50) * 1e3, percentile(single, 95) * 1e3, batch_size / statistics.median(batched)
