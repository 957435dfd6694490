"""The one place that decides device, precision (autocast, grad scaler), CPU threads and seeding.

    with runtime_scope(recipe.runtime) as rt:
        model.to(rt.device)
        with rt.autocast():
            logits = model(x)

Nothing else in kdforge calls `.cuda()` or picks a dtype. Process-wide settings (thread count) are set
inside the scope and restored when it ends.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kdforge.errors import KdforgeError
from kdforge.recipe import RuntimeConfig


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32

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


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdforgeError(f"device {requested!r} requested but CUDA is not available here; use device = \"cpu\"")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise KdforgeError(f"device {requested!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise KdforgeError(f"device {requested!r} requested but MPS is not available here")
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
    runtime = Runtime(device=resolved, amp_dtype=resolve_amp_dtype(cfg.precision, resolved))
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        yield runtime
    finally:
        torch.set_num_threads(previous_threads)
