"""The one place that decides device, precision (autocast, grad scaler), memory format, compilation, CPU
threads, seeding and the distributed rank.

    with distributed_session():                     # torchrun: one process group for the whole command
        with runtime_scope(recipe.runtime) as rt:
            forward = rt.for_training(rt.place(model))   # channels_last, DDP, torch.compile as decided here
            with rt.autocast():
                logits = forward(rt.format_input(model, x))

Nothing else in kdforge calls `.cuda()`, picks a dtype or a memory format. Process-wide settings (thread
count) are set inside the scope and restored when it ends. On CPU, mixed precision, channels_last and
compilation are off unless the recipe asks for them.

Multi-process training: `torchrun --nproc-per-node N -m kdforge ...` (or `kdforge distill --nproc N`, which
launches it; `torchrun_command`) starts N processes; `distributed_session` joins them in one process group (NCCL on
GPUs, gloo on CPU) and every runtime then knows its rank and the world size. Several nodes: the same command on
each with `--nnodes M --rdzv-endpoint HOST:PORT` (a c10d rendezvous), the runs folder on a filesystem they share.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import platform
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdforge.errors import KdforgeError, OutOfMemoryError, UnavailableError
from kdforge.host import cpu_model
from kdforge.recipe import RuntimeConfig, check_device_name


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool | None = None  # None: for CNNs on CUDA
    compile: bool = False
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, checkpoints and exports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def uses_channels_last(self, model: torch.nn.Module) -> bool:
        if self.channels_last is not None:
            return self.channels_last
        return self.device.type == "cuda" and is_cnn(model)

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this runtime's device, in channels_last where that is decided."""
        model.to(self.device)
        if self.uses_channels_last(model):
            model.to(memory_format=torch.channels_last)
        return model

    def format_input(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.uses_channels_last(model) else x

    def for_training(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the training step calls: the model, wrapped in DistributedDataParallel across processes and
        compiled when asked. Weights are saved from `model` itself (no wrapper prefixes in checkpoints)."""
        forward = model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            if self.device.type == "cuda":  # batch statistics over the global batch, as in one process
                torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces BatchNorm children in place
            # (PyTorch's SyncBatchNorm runs on GPUs only: on CPU each process normalizes over its share)
            forward = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if self.compile:
            forward = torch.compile(forward)
        return forward

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums of `values` over all processes (the values themselves when alone)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is active only for fp16 (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def describe(self) -> str:
        if self.device.type == "cuda":
            return f"{torch.cuda.get_device_name(self.device)} ({self.device}), {self.precision}"
        threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
        return f"{self.device}, {self.precision}{threads}"


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """True FP32 inside the block: on Ampere/Hopper GPUs cuDNN convolutions use TF32 by default (and matmuls
    may), so a PyTorch reference on CUDA is not FP32 unless both are switched off. Restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the RuntimeErrors MPS and the CPU allocator raise when memory runs out."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("out of memory", "can't allocate memory", "not enough memory")
    )


@contextlib.contextmanager
def out_of_memory_as_error(what: str, advice: str) -> Iterator[None]:
    """Turn running out of device memory inside the block into one OutOfMemoryError naming `what` ran out
    (stage, model, batch size) and `advice` (what to change), instead of a traceback."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemoryError(f"out of memory {what}: {advice}") from None


def is_cnn(model: torch.nn.Module) -> bool:
    """More than one 2-D convolution: a CNN or a hybrid (a ViT has one, its patch embedding)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def resolve_device(requested: str) -> torch.device:
    """The torch device for `auto`, `cpu`, `cuda`, `cuda:N` or `mps` (from a recipe or `--device`). A device this
    machine lacks is UnavailableError (exit 3); a name that is no device at all is a KdforgeError."""
    try:
        check_device_name(requested)
    except ValueError as exc:
        raise KdforgeError(str(exc)) from None
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnavailableError(f"device {requested!r} requested but CUDA is not available here; "
                               f"use device = \"cpu\" (or --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UnavailableError(f"device {requested!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UnavailableError(f"device {requested!r} requested but MPS is not available here")
    return device


def resolve_amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def runtime_scope(cfg: RuntimeConfig, device: str | None = None) -> Iterator[Runtime]:
    """Resolve the runtime (the `device` argument overrides the recipe's) and apply its process settings."""
    resolved = resolve_device(device or cfg.device)
    rank, world_size = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if resolved.type == "cuda":  # one GPU per process
            resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(resolved)
    runtime = Runtime(device=resolved, amp_dtype=resolve_amp_dtype(cfg.precision, resolved),
                      channels_last=cfg.channels_last, compile=cfg.compile, rank=rank, world_size=world_size)
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    steady_heap()
    try:
        yield runtime
    finally:
        torch.set_num_threads(previous_threads)


MMAP_THRESHOLD = 32 << 20  # glibc's own maximum for its dynamic threshold


def steady_heap() -> None:
    """On glibc, fix malloc's mmap threshold at 32 MB (a process-wide setting, made once; nothing else changes). By
    default glibc raises the threshold each time a large buffer is freed, and the trim threshold with it, and then
    keeps the freed heap: batches of 224x224 images (12-20 MB each) verified through ONNX Runtime after PyTorch grew
    a process by 0.7-1.1 GB that it never gave back, run to run at random. Fixed at glibc's maximum, training
    speed is unchanged (a fixed 1 MB threshold cost a third of it on CPU)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        pass


def torchrun_command(args: list[str], nproc: int = 1, nnodes: int = 1, rdzv_endpoint: str | None = None,
                     rdzv_id: str = "kdforge") -> list[str]:
    """The torchrun command that runs `kdforge ARGS` as `nproc` processes on this node: alone (`--standalone`), or
    as one of `nnodes` nodes that meet at the c10d rendezvous `rdzv_endpoint` (HOST:PORT of one of them, the same
    on every node, like `rdzv_id`). The rendezvous assigns the ranks; global rank 0 alone writes files."""
    if nnodes < 1 or nproc < 1:
        raise KdforgeError(f"--nnodes and --nproc count nodes and processes: got {nnodes} and {nproc}")
    if nnodes == 1:
        where = ["--standalone"]
    else:
        host, _, port = (rdzv_endpoint or "").rpartition(":")
        if not host or not port.isdigit():
            raise KdforgeError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the address of one of the nodes "
                               f"(the same on every node), got {rdzv_endpoint!r}")
        where = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                 f"--rdzv-id={rdzv_id}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}", "-m", "kdforge",
            *args]


def current_rank() -> int:
    """This process's rank in the torchrun process group (0 when alone)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def sync() -> None:
    """Wait for every process of the group (nothing to wait for when alone)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _wire() -> torch.device:
    """Where collective tensors live: the GPU for NCCL, the CPU for gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_json(value: Any) -> list[Any]:
    """Every process's `value` (JSON-able), in rank order: JSON bytes over the process group, never pickle."""
    if not torch.distributed.is_initialized():
        return [value]
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8).to(_wire())
    size = torch.tensor([len(data)], dtype=torch.int64, device=data.device)
    sizes = [torch.zeros_like(size) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=data.device)
    padded[:len(data)] = data
    parts = [torch.zeros_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded)
    return [json.loads(bytes(part[:int(n.item())].cpu().numpy())) for part, n in zip(parts, sizes, strict=True)]


def broadcast_bytes(data: bytes | None, src: int) -> bytes:
    """`data` of process `src`, on every process (`data` is ignored elsewhere)."""
    if not torch.distributed.is_initialized():
        return data or b""
    mine = torch.distributed.get_rank() == src
    size = torch.tensor([len(data) if mine else 0], dtype=torch.int64, device=_wire())
    torch.distributed.broadcast(size, src)
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(_wire()) if mine and size.item() else \
        torch.zeros(int(size.item()), dtype=torch.uint8, device=_wire())
    if size.item():
        torch.distributed.broadcast(buffer, src)
    return bytes(buffer.cpu().numpy())


@contextlib.contextmanager
def distributed_session() -> Iterator[int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment) for the duration of a
    command, and leave it at the end; yields the world size (1 outside torchrun: nothing to do)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or torch.distributed.is_initialized():
        yield world_size
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    try:
        yield world_size
    finally:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# the machine a number was measured on


def machine(device: torch.device | None = None) -> dict[str, object]:
    """What a timing or a published number was measured on (results differ across CPU kinds, e.g. AVX2 vs
    AVX-512, and timings far more): the one description summary.json, the estimate and bench.json record.
    `device`: where the measured work ran (its GPU is named), else the first visible GPU, if any."""
    on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if on_gpu else None,
        "device": str(device) if device is not None else ("cuda" if on_gpu else "cpu"),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def describe_machine(info: dict[str, object]) -> str:
    """"AMD EPYC (AVX2), 2 threads" or "NVIDIA H100 80GB HBM3"."""
    if info.get("gpu"):
        return str(info["gpu"])
    return f"{info['cpu']} ({info['cpu_capability']}), {info['threads']} threads"
