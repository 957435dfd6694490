"""Benchmark every format of an export side by side: file size, latency at batch 1, throughput at a larger batch,
joined with the test top-1 each format reached in verification.

    result = bench_export(Path("exports/quickstart"), BenchSettings(threads=2))   # writes bench.json there

The PyTorch student (eager, FP32) is the first row: the reference every exported format is compared with. Every
runner gets the same uint8 images at the model's input size through its own `predict` (the call a user makes),
after warm-up, with a fixed thread count for PyTorch and ONNX Runtime. TensorRT engines are measured where
TensorRT and a GPU are present and listed as skipped elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kdforge.card import CARD, write_model_card
from kdforge.checkpoint import final_weights
from kdforge.errors import ExportError, KdforgeError
from kdforge.fileio import read_json, read_metadata, record_or_note, write_json
from kdforge.formats import FORMATS
from kdforge.layout import BENCH, RECIPE, VERIFY
from kdforge.phases import Consumer, notify
from kdforge.timing import measure, torch_threads

PYTORCH = "pytorch"


@dataclass(frozen=True)
class BenchSettings:
    batch_size: int = 64  # the throughput batch; latency is measured at batch 1
    repeats: int = 50  # timed batch-1 calls (p50/p95 come from these)
    warmup: int = 5  # untimed calls before timing
    threads: int = 2  # CPU threads for PyTorch and ONNX Runtime
    formats: tuple[str, ...] | None = None  # default: pytorch and every format in the export
    device: str | None = None  # PyTorch's device; default: the recipe's

    def __post_init__(self) -> None:
        for name, value in (("batch_size", self.batch_size), ("repeats", self.repeats), ("threads", self.threads)):
            if value < 1:
                raise KdforgeError(f"bench {name} must be at least 1, got {value}")
        if self.warmup < 0:
            raise KdforgeError(f"bench warmup must be 0 or more, got {self.warmup}")


@dataclass(frozen=True)
class BenchRow:
    format: str
    runtime: str  # what ran it: "pytorch (cpu)", "onnxruntime (CPU)", "tensorrt 10.3 (...)"
    precision: str
    bytes: int  # weights file (PyTorch) or artifact size
    latency_p50_ms: float  # batch 1
    latency_p95_ms: float
    throughput: float  # images per second at settings.batch_size
    top1: float | None  # test top-1 from verification (PyTorch: the reference's)
    agreement: float | None  # top-1 agreement with PyTorch
    verified: bool | None


@dataclass(frozen=True)
class BenchResult:
    export_dir: Path
    rows: list[BenchRow]
    skipped: dict[str, str] = field(default_factory=dict)  # format -> why it was not measured
    settings: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        measured_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return {"export_dir": str(self.export_dir), "measured_at": measured_at,
                "machine": self.machine, "settings": self.settings, "rows": [asdict(r) for r in self.rows],
                "skipped": self.skipped}


def bench_export(export_dir: Path, settings: BenchSettings = BenchSettings(),
                 consumers: Iterable[Consumer] = (), notes: list[str] | None = None) -> BenchResult:
    """Measure the PyTorch student and every format of `export_dir` (a note names each as it starts); write
    `bench.json` there (with `notes`, a list: on a read-only export folder a note says it was not updated, see
    `fileio.record_or_note`)."""
    from kdforge.data.transforms import spec_from_metadata
    from kdforge.models import load_stage_model
    from kdforge.recipe import load_recipe
    from kdforge.runners import TorchRunner, open_export
    from kdforge.runners.tensorrt import tensorrt_missing
    from kdforge.runtime import machine, runtime_scope

    meta = read_metadata(export_dir)
    verified = read_json(export_dir / VERIFY)
    available = [PYTORCH, *meta.get("formats", {})]
    wanted = list(settings.formats or available)
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise ExportError(f"{export_dir} has no {', '.join(unknown)} export; it has: {', '.join(available)}")
    spec = spec_from_metadata(meta)

    rows, skipped = [], {}
    stage_dir = Path(meta["run"])
    recipe = load_recipe(stage_dir / RECIPE)
    with runtime_scope(recipe.runtime.model_copy(update={"threads": settings.threads}), settings.device) as rt:
        for name in wanted:
            if name != PYTORCH and FORMATS.get(name).bench_skip:
                skipped[name] = FORMATS.get(name).bench_skip
                continue
            if name != PYTORCH and FORMATS.get(name).needs_gpu and tensorrt_missing():
                skipped[name] = tensorrt_missing()
                continue
            notify(consumers, name)
            if name == PYTORCH:
                weights = final_weights(stage_dir)
                if not weights.is_file():
                    raise ExportError(f"the PyTorch student {weights} is missing; the export's run was moved")
                model = load_stage_model(stage_dir, int(meta["num_classes"]), recipe=recipe)
                runner, precision, size = TorchRunner(model, spec, rt), "fp32", weights.stat().st_size
                report = next(iter(verified.values()), {})
                top1, agreement, passed = report.get("reference_top1"), 1.0, None
            else:
                runner, entry = open_export(export_dir, name, meta,
                                            str(rt.device) if rt.device.type == "cuda" else None, settings.threads)
                precision, size = entry["precision"], entry["bytes"]
                report = verified.get(name, {})
                top1, agreement, passed = report.get("candidate_top1"), report.get("agreement"), report.get("passed")
            # another runtime is timed with torch at 1 thread (it only prepares the images): torch's idle threads
            # would spin on the cores that runtime's threads need (timing.torch_threads)
            with torch_threads(1) if name != PYTORCH else contextlib.nullcontext():
                p50, p95, throughput = measure(runner, spec.size, settings.batch_size, settings.repeats,
                                               settings.warmup)
            rows.append(BenchRow(name, runner.name, precision, size, round(p50, 3), round(p95, 3),
                                 round(throughput, 1), top1, agreement, passed))
        measured_on = machine(rt.device)
    settings_record = {**asdict(settings), "input_size": spec.size}
    rows = _merged(read_json(export_dir / BENCH), rows, settings_record, measured_on)
    result = BenchResult(export_dir, rows, skipped, settings_record, measured_on)
    record_or_note(lambda: write_json(export_dir / BENCH, result.to_dict()), export_dir / BENCH, notes)
    record_or_note(lambda: write_model_card(export_dir), export_dir / CARD, notes)  # its latency table
    return result


def _merged(previous: dict[str, Any], rows: list[BenchRow], settings: dict[str, Any],
            machine: dict[str, Any]) -> list[BenchRow]:
    """Rows of an earlier bench.json for formats not measured now are kept when they were measured the same way
    (batch size, threads, device, machine), so measuring a subset adds to bench.json instead of replacing it."""
    same = ("batch_size", "threads", "input_size")
    if not previous or any(previous.get("settings", {}).get(k) != settings[k] for k in same) \
            or previous.get("machine") != machine:
        return rows
    measured = {row.format for row in rows}
    kept = [BenchRow(**row) for row in previous.get("rows", []) if row["format"] not in measured]
    return [*rows, *kept]
