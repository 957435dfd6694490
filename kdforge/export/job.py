"""One export in progress: what every format's builder reads (recipe, student, data, settings) and the records
it adds to (artifacts, metadata.json, verification reports, notes). `export_run` (artifacts.py) creates it and
runs each format's builder in turn; builders live in builders.py and int8.py. The job verifies each file with
what it holds (`check`: the data loaded once, the PyTorch student's logits computed once) through judge.py.

Everything the job says while it runs (phases, their times, the QAD stage's training) goes to its `consumers` as
events, the training loop's channel; `notes` are what the user should know afterwards (printed at the end).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from kdforge.data import DataSplits
from kdforge.data.transforms import InputSpec
from kdforge.fileio import file_hash, read_json, write_json
from kdforge.formats import FORMATS
from kdforge.judge import record_verification, resolve_verify_batch, verification_failed, verify_runner
from kdforge.layout import METADATA, VERIFY
from kdforge.models import load_stage_model
from kdforge.phases import Consumer, Phases
from kdforge.recipe import QuantizeConfig, Recipe, TensorRTConfig
from kdforge.runners import open_runner
from kdforge.runtime import runtime_scope


@dataclass
class ExportJob:
    recipe: Recipe  # the export settings that apply now (see artifacts.export_recipe)
    source: Path  # the finished stage folder exported
    export_dir: Path
    model: torch.nn.Module  # the student, exportable layers, final weights
    spec: InputSpec
    data: DataSplits
    opset: int
    qcfg: QuantizeConfig  # [quantize] with the command's overrides
    tcfg: TensorRTConfig
    common: dict[str, Any]  # metadata every format shares (model, recipe, input spec, checkpoint hash, versions)
    settings: dict[str, Any]  # the [export], [verify], [quantize] settings recorded in metadata.json
    phases: Phases  # announces and times each phase as note events to `consumers`
    consumers: list[Consumer] = field(default_factory=list)
    verify: bool = True
    device: str | None = None
    notes: list[str] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # metadata.json's entry per format
    reports: dict[str, Any] = field(default_factory=dict)  # verification reports per format
    failures: dict[str, str] = field(default_factory=dict)  # format -> why it failed verification
    previous: dict[str, Any] = field(default_factory=dict)  # formats an earlier export recorded
    references: dict = field(default_factory=dict)  # the PyTorch reference's logits, computed once for all formats
    quantization: Any = None  # QuantizeResult of the ONNX Runtime INT8 file
    calibration: Any = None  # CalibrationData, drawn once for the INT8 formats
    steps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # INT8 format -> each step and its numbers

    def path(self, name: str) -> Path:
        return self.export_dir / FORMATS.get(name).filename

    def source_of(self, name: str) -> Path:
        """The file format `name` is made from (its table entry's `source`, made earlier in this export)."""
        return self.artifacts[FORMATS.get(name).source]

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata written into format `name`'s file."""
        return {**self.common, "precision": FORMATS.get(name).precision, "format": name}

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def record(self, name: str, path: Path, extra: dict[str, Any]) -> None:
        """Record a made file in metadata.json (hash, size, what its builder reports)."""
        fmt = FORMATS.get(name)
        self.artifacts[name] = path
        self.files[name] = {"file": fmt.filename, "precision": fmt.precision, "sha256": file_hash(path),
                            "bytes": path.stat().st_size + extra.get("weights_bytes", 0),
                            "export_s": self.phases.seconds.get(f"export {name}"), **extra}
        write_json(self.export_dir / METADATA, {
            **self.common, "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": self.settings, "formats": {**self.previous, **self.files},
        })

    def check(self, name: str) -> None:
        """Verify format `name` against the PyTorch student (when the export verifies), on the data this job holds,
        and record the report in verify.json; a failure is recorded, not raised."""
        if not self.verify:
            return
        cfg = self.recipe.model_for(self.source.name)
        checks = self.recipe.verify
        with self.phases(f"verification {name}"), runtime_scope(self.recipe.runtime, self.device) as runtime:
            started = time.perf_counter()
            candidate = open_runner(self.artifacts[name], FORMATS.get(name).runner,
                                    str(runtime.device) if runtime.device.type == "cuda" else None, many_batches=True)
            report = verify_runner(
                candidate, lambda: load_stage_model(self.source, self.data.num_classes, recipe=self.recipe),
                self.data.test, checks, FORMATS.get(name).precision, runtime, self.references,
                resolve_verify_batch(checks.batch_size, cfg), what=f"{name} of {cfg.model}")
        record_verification(self.export_dir, name, self.files[name], report, started)
        self.reports[name] = report
        if report.passed:
            self.failures.pop(name, None)
        else:
            self.failures[name] = str(verification_failed(self.artifacts[name], report))

    def drop_verification(self, name: str) -> None:
        """An artifact about to change is no longer verified."""
        reports = read_json(self.export_dir / VERIFY)
        if name in reports:
            del reports[name]
            write_json(self.export_dir / VERIFY, reports)
