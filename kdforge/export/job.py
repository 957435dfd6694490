"""One export in progress: what every format's builder reads (recipe, student, data, settings) and the records
it adds to (artifacts, metadata.json, verification reports, notes). `export_run` (artifacts.py) creates it and
runs each format's builder in turn; builders live in builders.py and int8.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from kdforge.data import DataSplits
from kdforge.data.transforms import InputSpec
from kdforge.errors import VerificationError
from kdforge.fileio import file_hash, read_json, write_json
from kdforge.formats import FORMATS
from kdforge.layout import METADATA, VERIFY
from kdforge.phases import Phases
from kdforge.recipe import QuantizeConfig, Recipe, TensorRTConfig
from kdforge.verify import verify_export


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
    phases: Phases
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
    int8_steps: list[dict[str, Any]] = field(default_factory=list)

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
                            "bytes": path.stat().st_size + extra.get("weights_bytes", 0), **extra}
        write_json(self.export_dir / METADATA, {
            **self.common, "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": self.settings, "formats": {**self.previous, **self.files},
        })

    def check(self, name: str) -> None:
        """Verify format `name` against the PyTorch student (when the export verifies); a failure is recorded."""
        if not self.verify:
            return
        with self.phases(f"verification {name}"):
            try:
                self.reports[name] = verify_export(self.export_dir, name, device=self.device,
                                                   references=self.references, data=self.data)
                self.failures.pop(name, None)
            except VerificationError as exc:
                self.reports[name], self.failures[name] = exc.report, str(exc)

    def drop_verification(self, name: str) -> None:
        """An artifact about to change is no longer verified."""
        reports = read_json(self.export_dir / VERIFY)
        if name in reports:
            del reports[name]
            write_json(self.export_dir / VERIFY, reports)
