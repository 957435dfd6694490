"""Export a trained student to deployable artifacts and verify them against the PyTorch student.

    result = export_run(Path("runs/quickstart/student"), formats=["onnx"])   # exports/quickstart/{student.onnx, ...}

`export_run` is a loop over the requested formats and their sources: each is made by its builder
(builders.py, int8.py), recorded, and verified (the job calls kdforge/judge.py). What a command's target means
(the finished stage to export, the export folder to verify) is kdforge/locate.py.

An export directory holds the artifacts, `metadata.json` (what they are and where they came from: class names,
input size, mean/std, recipe hash, checkpoint hash, versions, each file's sha256) and `verify.json` (one report
per format). Re-exporting a format drops its old verification; a failed verification is written as failed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kdforge import __version__, layout
from kdforge.card import write_model_card
from kdforge.checkpoint import final_weights
from kdforge.errors import ExportError, RecipeError
from kdforge.fileio import check_can_create, folder_lock, read_json, remove_leftovers
from kdforge.fileio import file_hash as sha256
from kdforge.formats import FORMATS, with_sources
from kdforge.layout import METADATA
from kdforge.locate import resolve_export_source
from kdforge.phases import Consumer, Phases, notify
from kdforge.plan import recipe_formats
from kdforge.recipe import (
    QuantizeConfig,
    Recipe,
    TensorRTConfig,
    format_validation_error,
    load_recipe,
    recipe_hash,
)

# ----------------------------------------------------------------------------------------------------------
# export


@dataclass(frozen=True)
class ExportResult:
    export_dir: Path
    source: Path  # the stage folder exported
    artifacts: dict[str, Path]
    seconds: dict[str, float]  # export time per format
    reports: dict[str, Any]  # verification reports per format (when verified)
    notes: list[str]  # what was adjusted or added, reported to the user
    quantization: Any = None  # QuantizeResult of the int8 format
    unavailable: dict[str, str] = field(default_factory=dict)  # format -> what this machine lacks to make it
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (export, int8 phases, verification)
    failures: dict[str, str] = field(default_factory=dict)  # format -> why it failed verification
    steps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # INT8 format -> each step tried, its numbers
    skipped: bool = False  # an earlier export with the same weights and settings, reused (`finished_export`)


SECTION_MODELS = {"quantize": QuantizeConfig, "tensorrt": TensorRTConfig}  # formats' option_sections


def accepted_options(name: str) -> frozenset[str]:
    """The `kdforge export` options format `name` takes: its own, and every key of its recipe sections."""
    fmt = FORMATS.get(name)
    sections = (set(SECTION_MODELS[section].model_fields) - {"enabled"} for section in fmt.option_sections)
    return fmt.options.union(*sections)


def check_options(formats: list[str], options: dict[str, Any]) -> None:
    """Before any work: some requested format takes each option."""
    for option in options:
        if not any(option in accepted_options(name) for name in formats):
            raise ExportError(f"option {option!r} applies to none of the formats {', '.join(formats)}")


def build_metadata(recipe: Recipe, stage_dir: Path, classes: tuple[str, ...], spec, opset: int) -> dict[str, Any]:
    import timm
    import torch

    cfg = recipe.model_for(stage_dir.name)
    return {
        "model": cfg.model, "stage": stage_dir.name, "recipe": recipe.name, "recipe_hash": recipe_hash(recipe),
        "input_size": spec.size, "mean": list(spec.mean), "std": list(spec.std),
        "class_names": list(classes), "num_classes": len(classes),
        "run": str(stage_dir), "checkpoint_sha256": sha256(final_weights(stage_dir)),
        "kdforge_version": __version__, "torch_version": torch.__version__, "timm_version": timm.__version__,
        "opset": opset,
    }


def unbuildable_here(formats: list[str]) -> dict[str, str]:
    """The formats this machine cannot make (TensorRT engines without TensorRT or a GPU, OpenVINO IR without
    OpenVINO: the table's `needs_gpu` and `requires`) -> why."""
    import importlib.util

    from kdforge.runners.tensorrt import tensorrt_missing

    no_tensorrt = tensorrt_missing() if any(FORMATS.get(name).needs_gpu for name in formats) else None
    unavailable = {}
    for name in formats:
        fmt = FORMATS.get(name)
        missing = [module for module in fmt.requires if importlib.util.find_spec(module) is None]
        if missing:
            unavailable[name] = f'{" and ".join(missing)} not installed: pip install "kdforge[{fmt.extra}]"'
        elif fmt.needs_gpu and no_tensorrt:
            unavailable[name] = no_tensorrt
    return unavailable


def requested_formats(formats: list[str] | None, fp16: bool = False, int8: bool = False,
                      trt: bool = False) -> list[str] | None:
    """The formats of `kdforge export`'s options: --fp16 / --int8 add the FP16 / INT8 ONNX; with --trt they
    name the TensorRT engine precisions instead (FP16 when neither is given). None: the recipe's formats."""
    names = list(formats or [])
    precisions = [p for p, asked in (("fp16", fp16), ("int8", int8)) if asked]
    if trt:
        names += [f"trt_{p}" for p in precisions or ["fp16"]]
    else:
        names += precisions
    return names or None


def _validated(model: type, base: Any, overrides: dict[str, Any], what: str) -> Any:
    try:  # overrides get the same checks as the recipe's section
        return model.model_validate({**base.model_dump(), **overrides})
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, what)) from None


EXPORT_SECTIONS = ("export", "quantize", "verify")  # the recipe sections an export follows (not training)


def export_recipe(source: Path, settings: Recipe | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The recipe an export of the finished stage `source` follows: what the student was trained with (its
    stage's recipe.toml), with the export settings that apply NOW: the [export], [quantize] and [verify] sections
    of `settings` (the recipe as `kdforge distill` has it today, even when the training stages were reused) and
    then `overrides` (`kdforge export --set`), which may only name keys of those sections."""
    for override in overrides:
        if override.split("=", 1)[0].strip().split(".", 1)[0] not in EXPORT_SECTIONS:
            raise RecipeError(f"--set {override!r}: an export only takes [{'], ['.join(EXPORT_SECTIONS)}] keys; "
                              f"training settings change with `kdforge distill --set ...`")
    recipe = load_recipe(source / layout.RECIPE)
    if settings is not None:
        recipe = recipe.model_copy(update={name: getattr(settings, name) for name in EXPORT_SECTIONS})
    if overrides:
        from kdforge.recipe import apply_override, recipe_to_dict, validate_recipe

        raw = recipe_to_dict(recipe)
        for override in overrides:
            apply_override(raw, override)
        recipe = validate_recipe(raw, source=f"{source / layout.RECIPE} with --set")
    return recipe


@dataclass(frozen=True)
class ExportPlan:
    """What an export will make, decided before anything is written."""

    formats: list[str]  # the requested formats and their sources, each after its source
    qcfg: QuantizeConfig  # [quantize] with the command's overrides
    tcfg: TensorRTConfig
    opset: int
    notes: list[str]  # what was added or adjusted, told to the user
    unavailable: dict[str, str]  # formats this machine cannot make -> why


def plan_export(recipe: Recipe, formats: list[str] | None = None, opset: int | None = None,
                quantize: dict[str, Any] | None = None, tensorrt: dict[str, Any] | None = None) -> ExportPlan:
    """The formats to make (the recipe's when `formats` is None, else onnx) with their sources, and the settings
    with the command's overrides (`quantize`, `tensorrt`: keys of those sections), every option checked against
    the formats that take it."""
    requested = list(dict.fromkeys(formats or recipe_formats(recipe) or ["onnx"]))
    quantize = {k: v for k, v in (quantize or {}).items() if v is not None}
    tensorrt = {k: v for k, v in (tensorrt or {}).items() if v is not None}
    check_options(requested, {**({"opset": opset} if opset else {}), **quantize, **tensorrt})
    formats = with_sources(requested)
    notes = []
    for added in (name for name in formats if name not in requested):
        users = [name for name in formats if FORMATS.get(name).source == added]
        notes.append(f"{', '.join(users)} {'is' if len(users) == 1 else 'are'} made from the "
                     f"{FORMATS.get(added).precision.upper()} ONNX export: exporting and verifying {added} too")
    if "trt_int8" in formats:  # TensorRT builds INT8 from symmetric Q/DQ only
        if quantize.get("target") == "cpu":
            raise ExportError("trt_int8 is built from the tensorrt-target INT8 ONNX (symmetric int8); "
                              "--target cpu cannot make it: drop --target or export the cpu INT8 separately")
        if recipe.quantize.target != "tensorrt" and "target" not in quantize:
            notes.append("int8 uses the tensorrt target (symmetric int8 Q/DQ), which the TensorRT INT8 engine needs")
        quantize["target"] = "tensorrt"
    return ExportPlan(formats, _validated(QuantizeConfig, recipe.quantize, quantize, "quantize options"),
                      _validated(TensorRTConfig, recipe.export.tensorrt, tensorrt, "tensorrt options"),
                      opset or recipe.export.opset, notes, unbuildable_here(formats))


def export_run(source: Path, formats: list[str] | None = None, opset: int | None = None,
               exports_dir: Path | None = None, verify: bool = True, device: str | None = None,
               quantize: dict[str, Any] | None = None, tensorrt: dict[str, Any] | None = None,
               consumers: list[Consumer] | None = None, recipe: Recipe | None = None,
               reuse: bool = False) -> ExportResult:
    """Export the finished stage `source` (runs/<recipe>/student) to every format and verify each after it is made.

    `recipe` gives the export settings ([export], [quantize], [verify]; default: those the stage was trained
    with, see `export_recipe`); `plan_export` resolves the formats and options. TensorRT formats this machine
    cannot build (no TensorRT or no GPU) are skipped after their ONNX sources are made and verified, and listed
    in `unavailable`. A failed verification is recorded in `failures` (and verify.json), never raised: every
    format is still made and the caller decides. A format's builder may follow its verification (INT8: the
    remedies `quantize.escalate` allows, tried in order while it fails). Each phase is announced, with its time,
    as a note event to `consumers` (a QAD stage reports its training there too). With `reuse` (a chain run
    again), an export folder that already holds exactly what this export would make is kept as it is
    (`finished_export`) and nothing is written."""
    from kdforge.data import load_dataset
    from kdforge.export.builders import BUILDERS
    from kdforge.export.job import ExportJob
    from kdforge.models import load_stage_model, resolve_input_spec
    from kdforge.runtime import resolve_device

    consumers = [] if consumers is None else consumers
    recipe = export_recipe(source, recipe)
    plan = plan_export(recipe, formats, opset, quantize, tensorrt)
    export_dir = layout.export_dir(exports_dir or recipe.export.dir, recipe.name)
    # every input is checked before the export folder changes: a failure here leaves an earlier export as it was
    check_can_create(export_dir, "export folder")
    with folder_lock(export_dir, "export folder"):  # one kdforge process at a time on an export folder
        if verify:
            resolve_device(device or recipe.runtime.device)
        data = load_dataset(recipe.data, recipe.seed)
        if data.val is not None and not read_json(source / layout.RESULT).get("val_images"):
            # trained before the validation split existed (on all training images): its "validation" images were
            # training images for it, so the held-out checks fall back to a slice disjoint from calibration
            data = replace(data, val=None)
        spec = resolve_input_spec(recipe.model_for(source.name))
        common = build_metadata(recipe, source, data.train.classes, spec, plan.opset)
        settings = {"export": recipe.export.model_dump(mode="json"), "verify": recipe.verify.model_dump(mode="json"),
                    "quantize": plan.qcfg.model_dump(mode="json")}
        wanted = [f for f in plan.formats if f not in plan.unavailable]
        earlier = finished_export(export_dir, wanted, common, settings, verify) if reuse else None
        if earlier is not None:
            return replace(earlier, unavailable=plan.unavailable)
        model = load_stage_model(source, data.num_classes, exportable=True, recipe=recipe)
        export_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(export_dir)  # half-written files of an export that was killed
        job = ExportJob(
            recipe=recipe, source=source, export_dir=export_dir, model=model, spec=spec, data=data, opset=plan.opset,
            qcfg=plan.qcfg, tcfg=plan.tcfg, common=common, settings=settings,
            phases=Phases(lambda line: notify(consumers, line)), consumers=consumers, verify=verify, device=device,
            notes=list(plan.notes),
            previous=read_json(export_dir / METADATA).get("formats", {}),
        )
        seconds: dict[str, float] = {}
        for name in wanted:
            builder = BUILDERS[name]
            job.drop_verification(name)  # an artifact about to change is no longer verified
            job.phases.report(f"export {name} ...")
            started = time.perf_counter()
            path, meta = job.path(name), job.meta(name)
            extra = builder.make(job, name, path, meta)
            seconds[name] = job.phases.seconds[f"export {name}"] = round(time.perf_counter() - started, 3)
            job.phases.report(f"export {name}: {seconds[name]:.1f} s")
            job.record(name, path, extra)
            job.check(name)
            if builder.after is not None and verify:
                builder.after(job, name, path, meta, extra)
        write_model_card(export_dir)  # README.md: what passed verification, in the Hugging Face card format
        return ExportResult(export_dir, source, job.artifacts, seconds, job.reports, job.notes, job.quantization,
                            plan.unavailable, job.phases.seconds, job.failures, job.steps)


def finished_export(export_dir: Path, formats: list[str], common: dict[str, Any], settings: dict[str, Any],
                    verify: bool) -> ExportResult | None:
    """The export already in `export_dir` when it is exactly what exporting again would make: the same student
    weights (sha256), recipe, versions and export settings, each of `formats` there and intact (sha256) and, when
    the export verifies, its verification recorded as passed for that very file. None otherwise. A chain run
    again then reuses it, as it reuses its finished training stages (and writes nothing: a finished run can be run
    again on a read-only folder)."""
    from kdforge.errors import KdforgeError
    from kdforge.fileio import check_artifact
    from kdforge.parity import VerifyReport

    meta = read_json(export_dir / METADATA)
    wanted = json.loads(json.dumps({**common, "settings": settings}))  # as JSON holds it (tuples become lists)
    if not meta or {key: meta.get(key) for key in wanted} != wanted:
        return None
    verified = read_json(export_dir / layout.VERIFY)
    artifacts, reports, steps = {}, {}, {}
    for name in formats:
        entry = meta.get("formats", {}).get(name)
        if entry is None:
            return None
        try:
            artifacts[name] = check_artifact(export_dir, entry)
        except KdforgeError:
            return None
        if verify:
            record = verified.get(name, {})
            if record.get("artifact_sha256") != entry["sha256"] or not record.get("passed"):
                return None
            reports[name] = VerifyReport(**{key: record[key] for key in VerifyReport.__dataclass_fields__})
        if entry.get("steps"):
            steps[name] = entry["steps"]
    seconds = {name: meta["formats"][name].get("export_s") or 0.0 for name in artifacts}
    return ExportResult(export_dir, Path(common["run"]), artifacts, seconds, reports, [], steps=steps, skipped=True)


def export_target(target: Path | None, runs_dir: Path, formats: list[str] | None = None,
                  overrides: list[str] | tuple[str, ...] = (), consumers: list[Consumer] | None = None,
                  **options: Any) -> ExportResult:
    """`kdforge export`: the finished student `target` means (a run, a stage folder, a recipe; the most recent
    run when None), exported with its recipe's export settings and `overrides` (`--set`). `options` are
    `export_run`'s."""
    source = resolve_export_source(target, runs_dir)
    settings = export_recipe(source, overrides=overrides)
    if target is None:
        notify(consumers or [], f"exporting the most recent run: {source}")
    return export_run(source, formats, recipe=settings, consumers=consumers, **options)
