"""Timing a runner: `kdforge bench`'s measurement, also used by the INT8 latency check and the student search
(`time_calls` and `percentile` need no torch: the serving image's probe times with them too).

    p50_ms, p95_ms, images_per_s = measure(runner, size=224, batch_size=64, repeats=50, warmup=5)
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol


class Predicts(Protocol):  # a runner (kdforge.runners): what `measure` calls
    def predict(self, images: Any) -> Any: ...


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


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU threads set for a block. Timing another runtime (ONNX Runtime, OpenVINO, ExecuTorch, LiteRT,
    NCNN) needs torch at 1 thread around it: the runners prepare images in torch, and torch's idle threads spin-wait
    on the cores the runtime's own threads need (measured: 7.1 ms instead of 1.8 ms per call for a MobileNetV3 at
    224x224 with 2 + 2 threads on 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sustained_ms(fn: Callable[[], Any], seconds: float, windows: int = 6) -> list[dict[str, float]]:
    """Call `fn` back to back for `seconds` and report each of `windows` equal time windows: calls, p50 and p95 ms.
    What a fanless board or a phone does after a minute is not what it does in the first second (thermal
    throttling, boosts running out); the first and last windows say whether the speed held."""
    span = seconds / windows
    rows = []
    start = time.perf_counter()
    for index in range(windows):
        end, times = start + span * (index + 1), []
        while time.perf_counter() < end or not times:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        rows.append({"window": index + 1, "ends_at_s": round(time.perf_counter() - start, 2), "calls": len(times),
                     "p50_ms": round(percentile(times, 50) * 1e3, 3), "p95_ms": round(percentile(times, 95) * 1e3, 3)})
    return rows


def latency_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, float]:
    """(p50 ms, p95 ms) of `fn`'s calls, `repeats` timed after `warmup` untimed."""
    times = time_calls(fn, warmup, repeats)
    return percentile(times, 50) * 1e3, percentile(times, 95) * 1e3


def measure(runner: Predicts, size: int, batch_size: int, repeats: int, warmup: int) -> tuple[float, float, float]:
    """(p50 ms, p95 ms) at batch 1 and images/s at `batch_size` for one runner, on fixed random uint8 images."""
    import torch

    from kdforge.rng import rng_stream

    generator = rng_stream(0, "bench_images")
    one = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=generator)
    many = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
    single = time_calls(lambda: runner.predict(one), warmup, repeats)
    batched = time_calls(lambda: runner.predict(many), min(warmup, 3), max(5, repeats // 5))
    return percentile(single, 50) * 1e3, percentile(single, 95) * 1e3, batch_size / statistics.median(batched)
