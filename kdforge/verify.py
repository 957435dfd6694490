"""`kdforge verify`: verify the artifacts of an export folder again, on their own, against the PyTorch student they
came from. The export job verifies each file as it makes it (export/job.py); this re-checks one later, after a
copy, a move or an edit, reading what the job held from the folder: metadata.json, the stage's recipe, the data.

    report = verify_export(Path("exports/quickstart"), "onnx")   # writes verify.json, raises if it fails
    reports = verify_formats(Path("exports/quickstart"))         # every format: the data loaded, the student's
                                                                 # weights hashed and its logits computed once

The judging itself is `judge.verify_runner`, the same call the export job makes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdforge.card import CARD, write_model_card
from kdforge.checkpoint import final_weights
from kdforge.data import DataSplits, load_dataset
from kdforge.errors import CheckpointError, ExportError
from kdforge.fileio import file_hash, read_metadata, record_or_note
from kdforge.judge import record_verification, resolve_verify_batch, verification_failed, verify_runner
from kdforge.layout import METADATA, RECIPE, VERIFY
from kdforge.models import load_stage_model
from kdforge.parity import VerifyReport
from kdforge.recipe import Recipe, VerifyConfig, load_recipe
from kdforge.runners import open_export
from kdforge.runtime import runtime_scope


@dataclass(frozen=True)
class ExportSource:
    """What every artifact of one export is verified against, read once: metadata.json, the stage the student
    came from (its weights checked against the recorded sha256), its recipe and the [verify] checks of the export."""

    meta: dict[str, Any]
    stage_dir: Path
    recipe: Recipe
    checks: VerifyConfig


def read_export_source(export_dir: Path) -> ExportSource:
    meta = read_metadata(export_dir)
    stage_dir = Path(meta["run"])
    weights = final_weights(stage_dir)
    if not weights.is_file() or file_hash(weights) != meta["checkpoint_sha256"]:
        raise CheckpointError(f"the PyTorch student {weights} is missing or changed since export; export again")
    recipe = load_recipe(stage_dir / RECIPE)
    checks = VerifyConfig.model_validate(meta["settings"]["verify"]) if "settings" in meta else recipe.verify
    return ExportSource(meta, stage_dir, recipe, checks)


def verify_export(export_dir: Path, fmt_name: str, device: str | None = None,
                  references: dict | None = None, data: DataSplits | None = None,
                  notes: list[str] | None = None, source: ExportSource | None = None) -> VerifyReport:
    """Verify one artifact of an export against the PyTorch student it came from; writes verify.json either way
    and raises VerificationError (saying by how much) when it fails.

    `references` (a dict the caller keeps between calls of one export) holds the PyTorch student's logits once
    computed; `data` is a dataset the caller already holds, read from the recipe when None; `source` what
    `read_export_source` read, read here when None. With `notes` (a list), an export folder this process may not
    write (read-only) is verified all the same and a note says verify.json was not updated."""
    source = source or read_export_source(export_dir)
    meta, stage_dir, recipe, checks = source.meta, source.stage_dir, source.recipe, source.checks
    cfg = recipe.model_for(stage_dir.name)
    references = {} if references is None else references
    started = time.perf_counter()
    with runtime_scope(recipe.runtime, device) as runtime:
        candidate, entry = open_export(export_dir, fmt_name, meta,
                                       str(runtime.device) if runtime.device.type == "cuda" else None,
                                       many_batches=True)
        data = data if data is not None else load_dataset(recipe.data, recipe.seed)
        report = verify_runner(candidate, lambda: load_stage_model(stage_dir, data.num_classes, recipe=recipe),
                               data.test, checks, entry["precision"], runtime, references,
                               resolve_verify_batch(checks.batch_size, cfg), f"{fmt_name} of {cfg.model}")
    record_or_note(lambda: record_verification(export_dir, fmt_name, entry, report, started), export_dir / VERIFY,
                   notes)
    record_or_note(lambda: write_model_card(export_dir), export_dir / CARD, notes)  # its verified files changed
    if not report.passed:
        raise verification_failed(export_dir / entry["file"], report)
    return report


def verify_formats(export_dir: Path, names: list[str] | None = None, device: str | None = None,
                   notes: list[str] | None = None) -> dict[str, VerifyReport]:
    """Verify `names` (default: every format the export recorded): the export's source read and the student's
    weights hashed once, the dataset loaded once, the PyTorch reference computed once; raises at the first failure,
    after writing its report. `notes`: see `verify_export`."""
    source = read_export_source(export_dir)
    names = names or list(source.meta["formats"])
    unknown = [name for name in names if name not in source.meta["formats"]]
    if unknown:  # before the data is read (open_export says the same, later)
        raise ExportError(f"{export_dir}: no {unknown[0]} export recorded in {METADATA}; run `kdforge export` first")
    references: dict = {}
    data = load_dataset(source.recipe.data, source.recipe.seed) if names else None
    return {name: verify_export(export_dir, name, device=device, references=references, data=data, notes=notes,
                                source=source)
            for name in names}
