"""What a command's target means, found from files alone: the finished stage to export, the export folder (and
format) to verify or measure, the run folder to report. Torch-free, like layout.py: `kdforge report` and the
lookups of every command run without loading torch.

    source = resolve_export_source(Path("runs/quickstart"), Path("runs"))        # runs/quickstart/student
    export_dir, fmt = resolve_export_dir(Path("exports/quickstart/student.int8.onnx"), Path("exports"))
"""

from __future__ import annotations

from pathlib import Path

from kdforge import layout
from kdforge.errors import CheckpointError, ExportError
from kdforge.formats import FORMATS, format_of_file
from kdforge.layout import EXPORTED_STAGES, METADATA
from kdforge.recipe import load_recipe


def resolve_export_source(target: Path | None, runs_dir: Path) -> Path:
    """The finished stage folder to export: from a run folder, a stage folder, a recipe file, or the most
    recent run when `target` is None."""
    if target is None:
        finished = [p / layout.RESULT for stage in EXPORTED_STAGES for p in layout.finished_stages(runs_dir, stage)]
        if not finished:
            raise CheckpointError(f"no finished student in {runs_dir}/; train one with `kdforge distill RECIPE`")
        return _student_of(layout.newest(finished).parent.parent)
    if target.suffix == ".toml":
        return _student_of(runs_dir / load_recipe(target).name)
    if layout.is_finished(target):
        return target
    return _student_of(target)


def _student_of(run_dir: Path) -> Path:
    for stage in EXPORTED_STAGES:
        if layout.is_finished(run_dir / stage):
            return run_dir / stage
    if any(layout.has_started(run_dir / stage) for stage in EXPORTED_STAGES):
        raise CheckpointError(f"the student in {run_dir} has not finished training; finish it with --resume")
    raise CheckpointError(f"no trained student in {run_dir} (no finished checkpoint); run `kdforge distill` first")


def resolve_export_dir(target: Path | None, exports_dir: Path) -> tuple[Path, str | None]:
    """(export folder, format or None for all) from an artifact, an export folder, or the newest export."""
    if target is None:
        found = list(exports_dir.glob(f"*/{METADATA}"))
        if not found:
            raise ExportError(f"no exports in {exports_dir}/; run `kdforge export` first")
        return layout.newest(found).parent, None
    if target.is_file() or target.suffix:
        for folder in target.parents:  # the export folder is the nearest one holding metadata.json
            if (folder / METADATA).is_file():
                name = format_of_file(target.relative_to(folder).as_posix())
                if name is not None:
                    return folder, name
                break
        files = ", ".join(FORMATS.get(name).filename for name in FORMATS)
        raise ExportError(f"{target}: not a kdforge artifact (expected one of {files} in an export folder)")
    if (target / METADATA).is_file():
        return target, None
    raise ExportError(f"{target}: no {METADATA} here; pass an export folder or artifact (exports/<recipe>/)")


def export_dir_of_run(run_dir: Path) -> Path | None:
    """The export folder of a run (its recipe's <export.dir>/<name>), or None when it has not been exported."""
    for stage in EXPORTED_STAGES:
        recipe_file = run_dir / stage / layout.RECIPE
        if recipe_file.is_file():
            recipe = load_recipe(recipe_file)
            export_dir = layout.export_dir(recipe.export.dir, recipe.name)
            return export_dir if (export_dir / METADATA).is_file() else None
    return None


def resolve_run_dir(target: Path | None, runs_dir: Path) -> Path:
    """A run folder (runs/NAME) from a run folder or a recipe file; the most recently finished run when None."""
    if target is None:
        finished = [stage / layout.RESULT for stage in layout.finished_stages(runs_dir)]
        if not finished:
            raise CheckpointError(f"no finished run in {runs_dir}/; train one with `kdforge distill RECIPE`")
        return layout.newest(finished).parent.parent
    if target.suffix == ".toml":
        return runs_dir / load_recipe(target).name
    if not target.is_dir():
        raise CheckpointError(f"{target}: no such run folder (expected runs/NAME or a recipe file)")
    return target


def resolve_bench_dir(target: Path | None, exports_dir: Path) -> Path:
    """The export folder to measure: an export folder, a run folder's export, or the most recent export."""
    if target is not None and target.is_dir() and not (target / METADATA).is_file():
        export_dir = export_dir_of_run(target)
        if export_dir is None:
            raise ExportError(f"{target} has no export yet; run `kdforge export {target}` first")
        return export_dir
    return resolve_export_dir(target, exports_dir)[0]
