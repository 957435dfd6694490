"""Export a trained student to deployable artifacts and verify them against the PyTorch student.

    result = export_run(Path("runs/quickstart"), formats=["onnx"])   # exports/quickstart/{student.onnx, ...}
    report = verify_export(Path("exports/quickstart"), "onnx")        # writes verify.json, raises if it fails

An export directory holds the artifacts, `metadata.json` (what they are and where they came from: class names,
input size, mean/std, recipe hash, checkpoint hash, versions, each file's sha256) and `verify.json` (one report
per format). Re-exporting a format drops its old verification; a failed verification is written as failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kdforge import __version__
from kdforge.errors import CheckpointError, ExportError, RecipeError, VerificationError
from kdforge.export.formats import FORMATS, with_sources
from kdforge.fileio import check_artifact, check_can_create, read_json, read_metadata, remove_leftovers, write_json
from kdforge.fileio import file_hash as sha256
from kdforge.phases import Phases
from kdforge.recipe import (
    QuantizeConfig,
    Recipe,
    TensorRTConfig,
    VerifyConfig,
    format_validation_error,
    load_recipe,
    recipe_hash,
)
from kdforge.train.checkpoint import WEIGHTS

METADATA = "metadata.json"
VERIFY = "verify.json"
EXPORTED_STAGES = ("student", "baseline")  # the distilled student, else the baseline student
QAD_CPU_NOTE = ("int8 by QAD is symmetric INT8 Q/DQ (Model Optimizer's placement, TensorRT's format) whatever "
                "quantize.target says; ONNX Runtime runs it on CPU")


# ----------------------------------------------------------------------------------------------------------
# what to export / verify


def resolve_export_source(target: Path | None, runs_dir: Path) -> Path:
    """The finished stage folder to export: from a run folder, a stage folder, a recipe file, or the most
    recent run when `target` is None."""
    if target is None:
        finished = [p for stage in EXPORTED_STAGES for p in runs_dir.glob(f"*/{stage}/result.json")]
        if not finished:
            raise CheckpointError(f"no finished student in {runs_dir}/; train one with `kdforge distill RECIPE`")
        newest = max(finished, key=lambda p: p.stat().st_mtime).parent
        return _student_of(newest.parent)
    if target.suffix == ".toml":
        return _student_of(runs_dir / load_recipe(target).name)
    if (target / "result.json").is_file():
        return target
    return _student_of(target)


def _student_of(run_dir: Path) -> Path:
    for stage in EXPORTED_STAGES:
        if (run_dir / stage / "result.json").is_file():
            return run_dir / stage
    if any((run_dir / stage / "last").exists() for stage in EXPORTED_STAGES):
        raise CheckpointError(f"the student in {run_dir} has not finished training; finish it with --resume")
    raise CheckpointError(f"no trained student in {run_dir} (no finished checkpoint); run `kdforge distill` first")


def resolve_export_dir(target: Path | None, exports_dir: Path) -> tuple[Path, str | None]:
    """(export folder, format or None for all) from an artifact, an export folder, or the newest export."""
    if target is None:
        found = list(exports_dir.glob(f"*/{METADATA}"))
        if not found:
            raise ExportError(f"no exports in {exports_dir}/; run `kdforge export` first")
        return max(found, key=lambda p: p.stat().st_mtime).parent, None
    if target.is_file() or target.suffix:
        by_file = {fmt.filename: fmt.name for fmt in map(FORMATS.get, FORMATS)}
        for folder in target.parents:  # the export folder is the nearest one holding metadata.json
            if (folder / METADATA).is_file():
                relative = target.relative_to(folder).as_posix()
                if relative in by_file:
                    return folder, by_file[relative]
                break
        raise ExportError(f"{target}: not a kdforge artifact (expected one of {', '.join(by_file)} "
                          f"in an export folder)")
    if (target / METADATA).is_file():
        return target, None
    raise ExportError(f"{target}: no {METADATA} here; pass an export folder or artifact (exports/<recipe>/)")


def export_dir_of_run(run_dir: Path) -> Path | None:
    """The export folder of a run (its recipe's <export.dir>/<name>), or None when it has not been exported."""
    for stage in EXPORTED_STAGES:
        recipe_file = run_dir / stage / "recipe.toml"
        if recipe_file.is_file():
            recipe = load_recipe(recipe_file)
            export_dir = Path(recipe.export.dir) / recipe.name
            return export_dir if (export_dir / METADATA).is_file() else None
    return None


def resolve_run_dir(target: Path | None, runs_dir: Path) -> Path:
    """A run folder (runs/NAME) from a run folder or a recipe file; the most recently finished run when None."""
    if target is None:
        finished = list(runs_dir.glob("*/*/result.json"))
        if not finished:
            raise CheckpointError(f"no finished run in {runs_dir}/; train one with `kdforge distill RECIPE`")
        return max(finished, key=lambda p: p.stat().st_mtime).parent.parent
    if target.suffix == ".toml":
        return runs_dir / load_recipe(target).name
    if not target.is_dir():
        raise CheckpointError(f"{target}: no such run folder (expected runs/NAME or a recipe file)")
    return target


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
    int8_steps: list[dict[str, Any]] = field(default_factory=list)  # each INT8 step tried and what it measured


def check_options(formats: list[str], options: dict[str, Any]) -> None:
    """Before any work: some requested format takes each option."""
    for option in options:
        if not any(option in FORMATS.get(name).options for name in formats):
            raise ExportError(f"option {option!r} applies to none of the formats {', '.join(formats)}")


def build_metadata(recipe: Recipe, stage_dir: Path, classes: tuple[str, ...], spec, opset: int) -> dict[str, Any]:
    import timm
    import torch

    cfg = recipe.model_for(stage_dir.name)
    return {
        "model": cfg.model, "stage": stage_dir.name, "recipe": recipe.name, "recipe_hash": recipe_hash(recipe),
        "input_size": spec.size, "mean": list(spec.mean), "std": list(spec.std),
        "class_names": list(classes), "num_classes": len(classes),
        "run": str(stage_dir), "checkpoint_sha256": sha256(stage_dir / "last" / WEIGHTS),
        "kdforge_version": __version__, "torch_version": torch.__version__, "timm_version": timm.__version__,
        "opset": opset,
    }


def recipe_formats(recipe: Recipe) -> list[str]:
    """The formats a recipe asks for: [export] formats, plus int8 when [quantize] is enabled."""
    formats = list(recipe.export.formats)
    if recipe.quantize.enabled and "int8" not in formats:
        formats.append("int8")
    return formats


def unbuildable_here(formats: list[str]) -> dict[str, str]:
    """The formats this machine cannot make (TensorRT engines without TensorRT or a GPU, OpenVINO IR without
    OpenVINO) -> why."""
    import importlib.util

    from kdforge.export.tensorrt import tensorrt_missing

    gpu_formats = [name for name in formats if FORMATS.get(name).needs_gpu]
    missing = tensorrt_missing() if gpu_formats else None
    unavailable = {name: missing for name in gpu_formats} if missing else {}
    for name, modules in (("openvino", ("openvino",)), ("openvino_int8", ("openvino", "nncf"))):
        missing = [module for module in modules if importlib.util.find_spec(module) is None]
        if name in formats and missing:
            unavailable[name] = f'{" and ".join(missing)} not installed: pip install "kdforge[openvino]"'
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
    recipe = load_recipe(source / "recipe.toml")
    if settings is not None:
        recipe = recipe.model_copy(update={name: getattr(settings, name) for name in EXPORT_SECTIONS})
    if overrides:
        from kdforge.recipe import apply_override, recipe_to_dict, validate_recipe

        raw = recipe_to_dict(recipe)
        for override in overrides:
            apply_override(raw, override)
        recipe = validate_recipe(raw, source=f"{source / 'recipe.toml'} with --set")
    return recipe


def export_run(
    source: Path,
    formats: list[str] | None = None,
    opset: int | None = None,
    exports_dir: Path | None = None,
    verify: bool = True,
    device: str | None = None,
    quantize: dict[str, Any] | None = None,
    tensorrt: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    recipe: Recipe | None = None,
) -> ExportResult:
    """Export the finished stage `source` (runs/<recipe>/student) to every format and verify each after it is made.

    `recipe` gives the export settings ([export], [quantize], [verify]; default: those the stage was trained
    with, see `export_recipe`); formats default to ["onnx"] when it names none. `quantize` and `tensorrt`
    override keys of those sections. Formats made from another bring it along (trt_fp16 -> fp16 -> onnx).
    TensorRT formats this machine cannot build (no TensorRT or no GPU) are skipped after their ONNX sources are
    made and verified, and listed in `unavailable`. A failed verification is recorded in `failures` (and
    verify.json), never raised: every format is still made and the caller decides. When the INT8 file fails,
    the remedies `quantize.escalate` allows are tried in order and the first that passes is shipped; the
    metadata records every step. Each phase is announced through `progress` with its time."""
    from kdforge.data import load_dataset
    from kdforge.export.converters import onnx_to_fp16, onnx_to_openvino, onnx_to_triton, qad_to_int8, torch_to_onnx
    from kdforge.export.qad import qad_student
    from kdforge.export.quantize import quantize_student, select_calibration
    from kdforge.export.tensorrt import onnx_to_trt
    from kdforge.models import create_model, resolve_input_spec
    from kdforge.runtime import resolve_device
    from kdforge.train.checkpoint import load_weights

    recipe = export_recipe(source, recipe)
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
    qcfg = _validated(QuantizeConfig, recipe.quantize, quantize, "quantize options")
    tcfg = _validated(TensorRTConfig, recipe.export.tensorrt, tensorrt, "tensorrt options")
    opset = opset or recipe.export.opset
    unavailable = unbuildable_here(formats)

    cfg = recipe.model_for(source.name)
    export_dir = (exports_dir or Path(recipe.export.dir)) / recipe.name
    # every input is checked before the export folder changes: a failure here leaves an earlier export as it was
    check_can_create(export_dir, "export folder")
    if verify:
        resolve_device(device or recipe.runtime.device)
    data = load_dataset(recipe.data, recipe.seed)
    if data.val is not None and not read_json(source / "result.json").get("val_images"):
        # trained before the validation split existed (on all training images): its "validation" images were
        # training images for it, so the held-out checks fall back to a slice disjoint from calibration
        data = replace(data, val=None)
    spec = resolve_input_spec(cfg)
    model = create_model(cfg.model_copy(update={"pretrained": False, "weights": None}), data.num_classes,
                         exportable=True)
    load_weights(model, source / "last")
    export_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(export_dir)  # half-written files of an export that was killed
    common = build_metadata(recipe, source, data.train.classes, spec, opset)
    settings = {"export": recipe.export.model_dump(mode="json"), "verify": recipe.verify.model_dump(mode="json"),
                "quantize": qcfg.model_dump(mode="json")}

    phases = Phases(progress)
    artifacts, seconds, files, reports, failures = {}, {}, {}, {}, {}
    references: dict = {}  # the PyTorch reference runs once for all formats
    previous = read_json(export_dir / METADATA).get("formats", {})
    quantization, calibration, steps = None, None, []

    def record(name: str, path: Path, extra: dict[str, Any]) -> None:
        fmt = FORMATS.get(name)
        artifacts[name] = path
        files[name] = {"file": fmt.filename, "precision": fmt.precision, "sha256": sha256(path),
                       "bytes": path.stat().st_size + extra.get("weights_bytes", 0), **extra}
        write_json(export_dir / METADATA, {
            **common, "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": settings, "formats": {**previous, **files},
        })

    def check(name: str) -> None:
        if not verify:
            return
        with phases(f"verification {name}"):
            try:
                reports[name] = verify_export(export_dir, name, device=device, references=references)
                failures.pop(name, None)
            except VerificationError as exc:
                reports[name], failures[name] = exc.report, str(exc)

    def make_int8(step_cfg: QuantizeConfig, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        nonlocal quantization, calibration
        if step_cfg.mode == "qad":
            return make_qad(step_cfg, path, meta)
        calibration = calibration or select_calibration(data.train, spec, step_cfg, recipe.seed, data.val)
        quantization = quantize_student(artifacts["onnx"], path, calibration, spec, step_cfg, meta, phases)
        notes.extend(n for n in quantization.notes if n not in notes)
        return {"target": step_cfg.target, "calibration_method": step_cfg.method,
                "calibration_images": calibration.count, **quantization.to_metadata(), **int8_opset(step_cfg, opset)}

    def make_qad(step_cfg: QuantizeConfig, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """The INT8 file of quantization-aware distillation (the `qad` stage, reused when it is finished), with
        this export's metadata."""
        nonlocal quantization
        quantization = None  # no ONNX Runtime quantization (and no layers kept in float by its search) ships
        if step_cfg.target == "cpu" and QAD_CPU_NOTE not in notes:
            notes.append(QAD_CPU_NOTE)
        with phases("int8: quantization-aware distillation"):
            qad = qad_student(recipe, source, step_cfg, opset, device)
        if qad.skipped:
            phases.report(f"int8: QAD finished earlier with these settings in {qad.path.parent}: reused")
        note = (f"int8 by QAD: {qad.epochs} epoch(s) ({qad.steps} steps, lr {qad.lr:g}) learning from the "
                f"{'teacher' if qad.teacher else 'FP32 student'} in {qad.wall_s:.0f} s; the fake-quantized student "
                f"scores {qad.top1:.2%} on the test split ({qad.calibrated_top1:.2%} calibrated, before fine-tuning)")
        if note not in notes:
            notes.append(note)
        extra = {"quantizer": "modelopt", "target": step_cfg.target, "qad": qad.to_metadata(),
                 **int8_opset(step_cfg, opset)}
        qad_to_int8(qad.path, path, {**meta, **extra, "method": "qad"}, spec.size, fp16=step_cfg.target == "tensorrt")
        return extra

    def finish_int8(path: Path, meta: dict[str, Any], extra: dict[str, Any]) -> list[dict[str, Any]]:
        """After the INT8 file was verified: the escalation steps the recipe allows while it fails, a latency
        check against the FP32 ONNX, and the metadata that records them. Returns every step's measurements."""
        first = "qad" if qcfg.mode == "qad" else "accuracy_aware" if qcfg.max_top1_drop is not None else "ptq"
        steps = [_int8_step(first, reports["int8"])]
        for remedy in (r for r in qcfg.escalate if "int8" in failures):
            if remedy == first:
                continue  # that is what just failed
            if remedy == "qad":
                step_cfg = qcfg.model_copy(update={"mode": "qad"})
                how = (f"{step_cfg.qad_epochs} epoch(s) of quantization-aware distillation from the "
                       f"{'FP32 student' if step_cfg.qad_teacher == 'student' else 'teacher'}")
            else:
                step_cfg = qcfg.model_copy(update={"mode": "ptq",
                                                   "max_top1_drop": recipe.verify.int8.max_top1_delta / 2})
                how = (f"max_top1_drop {step_cfg.max_top1_drop:.2f} on "
                       f"{'validation images' if data.val is not None else 'held-out training images'}")
            phases.report(f"int8: {steps[-1]['step']} failed verification ({'; '.join(reports['int8'].failures)})"
                          f": trying {remedy} ({how})")
            _drop_verification(export_dir, "int8")
            with phases(f"int8: escalation to {remedy}"):
                extra = make_int8(step_cfg, path, meta)
            record("int8", path, extra)
            check("int8")
            steps.append(_int8_step(remedy, reports["int8"]))
        with phases("int8: latency check against the FP32 ONNX"):
            speed = int8_speed(artifacts["onnx"], path, spec.size)
        if speed["batch1"] > 1.0:
            notes.append(f"int8 is {speed['batch1']:.2f}x the FP32 ONNX latency at batch 1 and "
                         f"{speed['batchN']:.2f}x at batch {speed['batch_size']} on this machine: slower, not "
                         f"faster; after `kdforge bench`, `kdforge serve --format auto` serves the fastest "
                         f"verified format")
        record("int8", path, {**extra, "method": steps[-1]["step"], "steps": steps, "latency_vs_fp32": speed})
        if len(steps) > 1:
            notes.append(_steps_note("int8", steps))
        return steps

    def make_openvino(path: Path, meta: dict[str, Any], step_cfg: QuantizeConfig | None = None) -> dict[str, Any]:
        """The OpenVINO IR; with `step_cfg`, INT8 by NNCF on the same calibration images as the ONNX INT8 export
        (accuracy-controlled on the held-out images when it sets max_top1_drop)."""
        nonlocal calibration
        extra: dict[str, Any] = {}
        if step_cfg is None:
            onnx_to_openvino(artifacts["onnx"], path, meta)
        else:
            calibration = calibration or select_calibration(data.train, spec, step_cfg, recipe.seed, data.val)
            validation = [(spec.prepare(image[None]).numpy(), int(label))
                          for image, label in zip(calibration.heldout_images, calibration.heldout_labels, strict=True)]
            extra = {"calibration_images": calibration.count,
                     "method": "ptq" if step_cfg.max_top1_drop is None else "accuracy_aware",
                     **onnx_to_openvino(artifacts["onnx"], path, meta, calibration.batches, validation,
                                        step_cfg.max_top1_drop)}
        weights = path.with_suffix(".bin")  # hashed too: verification and benchmarks check both files
        return {**extra, "weights_file": weights.name, "weights_sha256": sha256(weights),
                "weights_bytes": weights.stat().st_size}

    def escalate_openvino_int8(path: Path, meta: dict[str, Any]) -> None:
        """A failing NNCF INT8 is quantized again with NNCF's accuracy control at half the INT8 tolerance, when
        the recipe allows accuracy-aware escalation and did not already ask for it."""
        if ("openvino_int8" not in failures or "accuracy_aware" not in qcfg.escalate
                or qcfg.max_top1_drop is not None):
            return
        step_cfg = qcfg.model_copy(update={"max_top1_drop": recipe.verify.int8.max_top1_delta / 2})
        first = _int8_step("ptq", reports["openvino_int8"])
        phases.report(f"openvino_int8: nncf.quantize failed verification "
                      f"({'; '.join(reports['openvino_int8'].failures)}): trying NNCF's accuracy control "
                      f"(max_top1_drop {step_cfg.max_top1_drop:.2f} on "
                      f"{'validation images' if data.val is not None else 'held-out training images'})")
        _drop_verification(export_dir, "openvino_int8")
        with phases("openvino_int8: escalation to accuracy_aware"):
            extra = make_openvino(path, meta, step_cfg)
        record("openvino_int8", path, extra)
        check("openvino_int8")
        steps = [first, _int8_step("accuracy_aware", reports["openvino_int8"])]
        record("openvino_int8", path, {**extra, "method": "accuracy_aware", "steps": steps})
        notes.append(_steps_note("openvino_int8", steps))

    for name in (f for f in formats if f not in unavailable):
        fmt = FORMATS.get(name)
        _drop_verification(export_dir, name)  # an artifact about to change is no longer verified
        phases.report(f"export {name} ...")
        started = time.perf_counter()
        path = export_dir / fmt.filename
        meta = {**common, "precision": fmt.precision, "format": name}
        extra: dict[str, Any] = {}
        if name == "onnx":
            torch_to_onnx(model, spec.size, path, opset, meta)
        elif name == "fp16":
            onnx_to_fp16(artifacts["onnx"], path, meta)
        elif name == "triton":
            onnx_to_triton(artifacts["onnx"], export_dir / "triton", "student", spec.size, list(data.train.classes))
        elif name == "int8":
            extra = make_int8(qcfg, path, meta)
        elif name == "openvino":
            extra = make_openvino(path, meta)
        elif name == "openvino_int8":
            extra = make_openvino(path, meta, qcfg)
        elif fmt.needs_gpu:
            info = onnx_to_trt(artifacts[fmt.source], path, (tcfg.min_batch, tcfg.opt_batch, tcfg.max_batch),
                               tcfg.workspace_mb, Path(tcfg.timing_cache) if tcfg.timing_cache else None)
            if info["precision_built"] != fmt.precision:
                notes.append(f"{name}: TensorRT built {info['precision_built']} layers only "
                             f"({info['layer_precisions']}); the graph asked for {fmt.precision}")
            extra = {"tensorrt": info, "source_sha256": sha256(artifacts[fmt.source])}
            write_json(path.with_name(path.name + ".json"), {**meta, **extra})  # an engine has no metadata_props
        seconds[name] = phases.seconds[f"export {name}"] = round(time.perf_counter() - started, 3)
        phases.report(f"export {name}: {seconds[name]:.1f} s")
        record(name, path, extra)
        check(name)
        if name == "int8" and verify:
            steps = finish_int8(path, meta, extra)
        if name == "openvino_int8" and verify:
            escalate_openvino_int8(path, meta)
    return ExportResult(export_dir, source, artifacts, seconds, reports, notes, quantization, unavailable,
                        phases.seconds, failures, steps)


def int8_speed(fp32_path: Path, int8_path: Path, size: int, batch_size: int = 8) -> dict[str, Any]:
    """A short timing on this machine with `kdforge bench`'s measurement: INT8 latency as a multiple of the FP32
    ONNX's at batch 1 (p50) and batch N (median); above 1 means INT8 is slower."""
    from kdforge.backends import OnnxRunner
    from kdforge.bench import BenchSettings, measure

    settings = BenchSettings(batch_size=batch_size, repeats=15, warmup=3)
    (fp32_p50, _, fp32_rate), (int8_p50, _, int8_rate) = (
        measure(OnnxRunner(path), size, settings) for path in (fp32_path, int8_path))
    return {"batch1": round(int8_p50 / fp32_p50, 3), "batchN": round(fp32_rate / int8_rate, 3),
            "batch_size": batch_size}


def int8_opset(cfg: QuantizeConfig, opset: int) -> dict[str, int]:
    """The tensorrt-target INT8 file is written at opset 19 at least (FP16 Q/DQ scales)."""
    from kdforge.export.converters import QDQ_FP16_OPSET

    return {"opset": max(opset, QDQ_FP16_OPSET)} if cfg.target == "tensorrt" else {}


def _steps_note(name: str, steps: list[dict[str, Any]]) -> str:
    """One line on an escalation: which step ships (or that none passed) and what each measured."""
    outcome = "shipped" if steps[-1]["passed"] else "every allowed step failed; last tried"
    return (f"{name}: {outcome}: {steps[-1]['step']} ("
            + "; ".join(f"{s['step']}: top-1 {s['top1_delta_points']:+.2f} points, McNemar p {s['mcnemar_p']:.2g}, "
                        f"{'PASS' if s['passed'] else 'FAIL'}" for s in steps) + ")")


def _int8_step(step: str, report) -> dict[str, Any]:
    """What one INT8 step measured in verification, for the metadata and the summary."""
    return {"step": step, "top1_delta_points": round(report.top1_delta_points, 3), "agreement": report.agreement,
            "lost": report.lost, "gained": report.gained, "mcnemar_p": report.mcnemar_p, "passed": report.passed}


# ----------------------------------------------------------------------------------------------------------
# verify


def verify_export(export_dir: Path, fmt_name: str, device: str | None = None,
                  references: dict | None = None):
    """Verify one artifact against the PyTorch student it came from; writes verify.json either way and
    raises VerificationError (saying by how much) when it fails.

    `references` (a dict the caller keeps between calls) holds the PyTorch student's logits once computed, so
    verifying several formats of one export runs the reference once, not once per format."""
    from kdforge.backends import TorchRunner, open_runner
    from kdforge.data import load_dataset
    from kdforge.models import create_model
    from kdforge.runtime import out_of_memory_as_error, runtime_scope
    from kdforge.train.checkpoint import load_weights
    from kdforge.verify import judge, predict_all

    meta = read_metadata(export_dir)
    if fmt_name not in meta["formats"]:
        raise ExportError(f"{export_dir}: no {fmt_name} export recorded in {METADATA}; run `kdforge export` first")
    entry = meta["formats"][fmt_name]
    artifact = check_artifact(export_dir, entry)
    stage_dir = Path(meta["run"])
    weights = stage_dir / "last" / WEIGHTS
    if not weights.is_file() or sha256(weights) != meta["checkpoint_sha256"]:
        raise CheckpointError(f"the PyTorch student {weights} is missing or changed since export; export again")

    recipe = load_recipe(stage_dir / "recipe.toml")
    cfg = recipe.model_for(stage_dir.name)
    checks = VerifyConfig.model_validate(meta["settings"]["verify"]) if "settings" in meta else recipe.verify
    references = {} if references is None else references
    started = time.perf_counter()
    batch_size, limit = checks.batch_size, checks.limit_batches
    with runtime_scope(recipe.runtime, device) as runtime:
        data = load_dataset(recipe.data, recipe.seed)
        candidate = open_runner(artifact, str(runtime.device) if runtime.device.type == "cuda" else None)
        key = (meta["checkpoint_sha256"], str(runtime.device), candidate.spec, batch_size, limit)
        with out_of_memory_as_error(
            f"verifying {fmt_name} of {cfg.model} on {runtime.device} at batch size {batch_size}",
            "lower verify.batch_size (or compare fewer batches with verify.limit_batches)",
        ):
            if key not in references:
                model = create_model(cfg.model_copy(update={"pretrained": False, "weights": None}), data.num_classes)
                load_weights(model, stage_dir / "last")
                reference = TorchRunner(model, candidate.spec, runtime)
                references[key] = (reference.name, *predict_all(reference, data.test, batch_size, limit))
            reference_name, ref, labels = references[key]
            cand, _ = predict_all(candidate, data.test, batch_size, limit)
        tolerance = getattr(checks, entry["precision"])  # the export's own [verify] settings
        report = judge(reference_name, candidate.name, ref, cand, labels, tolerance)
    record = {**report.to_dict(), "format": fmt_name, "artifact": entry["file"], "artifact_sha256": entry["sha256"],
              "seconds": round(time.perf_counter() - started, 3)}
    reports = read_json(export_dir / VERIFY)
    write_json(export_dir / VERIFY, {**reports, fmt_name: record})
    if not report.passed:
        raise VerificationError(f"{artifact} FAILED verification against the PyTorch student: "
                                + "; ".join(report.failures), report)
    return report


def _drop_verification(export_dir: Path, fmt_name: str) -> None:
    reports = read_json(export_dir / VERIFY)
    if fmt_name in reports:
        del reports[fmt_name]
        write_json(export_dir / VERIFY, reports)

