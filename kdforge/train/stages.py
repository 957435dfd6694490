"""Training stages on top of the one loop: `teacher`, `baseline` and the distilled `student`.

    result = train_stage(recipe, "teacher")           # runs/<recipe>/teacher/{recipe.toml, metrics.jsonl, ...}

`teacher` trains [teacher] on labels; `baseline` trains [student] on labels; `student` trains [student] with
the [distill] objective against the frozen, finished teacher. A stage that already finished with the same
settings is not trained again; an unfinished one continues with `resume=True`. A stage's settings are its
fingerprint: data, seed, its model section and, for the distilled student, the distillation settings and a
hash of the teacher's weights, so a retrained teacher invalidates the student that learned from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kdforge import layout
from kdforge.checkpoint import checkpoint_metadata, final_weights, resolve_weights
from kdforge.data import load_dataset
from kdforge.distill.cache import TeacherCache
from kdforge.distill.teacher import load_frozen_teacher
from kdforge.errors import CheckpointError, KdforgeError, RecipeError
from kdforge.fileio import (
    atomic_path,
    atomic_write_text,
    check_can_create,
    file_hash,
    folder_lock,
    read_json,
    remove_leftovers,
    write_json,
)
from kdforge.models import count_parameters
from kdforge.phases import Consumer, notify
from kdforge.recipe import AUTO, ModelConfig, Recipe, TrainConfig, data_fingerprint, recipe_to_toml
from kdforge.runtime import current_rank, runtime_scope, sync
from kdforge.tracking import check_tracking, stage_trackers
from kdforge.train.assemble import assemble_run, teacher_cache_for
from kdforge.train.events import MetricsLog, ProgressDisplay
from kdforge.train.loop import evaluate
from kdforge.train.share import share_stage

STAGES = layout.TRAINING_STAGES
SHARED = ("teacher",)  # stages reused across recipes when their fingerprint matches (a teacher is trained once)


@dataclass(frozen=True)
class StageResult:
    stage: str
    model: str
    params: int
    top1: float  # test top-1 of the final weights (the ones later stages use)
    top5: float
    best_top1: float  # best top-1 at an epoch end: on the validation split when val_images > 0 (it chose `best`),
    best_epoch: int   # else on the test split (then reported only, never used to choose)
    steps: int
    input_size: int
    wall_s: float
    train_images_per_s: float
    fingerprint: str
    stage_dir: str
    val_images: int = 0  # the validation split held out of the training split (0: none)
    skipped: bool = False  # True when an earlier finished run was reused
    adopted_from: str | None = None  # the other run whose finished stage was reused (the teacher store)
    weights_sha256: str | None = None  # of the final weights (`last`): export and later stages check it

    def record(self) -> dict[str, Any]:
        """What result.json holds (`skipped` and `adopted_from` describe this call, not the stage)."""
        return {k: v for k, v in asdict(self).items() if k not in ("skipped", "adopted_from")}


# [distill] keys newer than finished runs, with their defaults
LATER_DISTILL_KEYS = {"dkd_warmup_epochs": 0, "logit_standardization": False, "dist_beta": 1.0, "dist_gamma": 1.0,
                      "ofa_eps": 1.0, "ofa_temperature": 1.0, "ofa_weight": 1.0, "hint_weight": 1.0}
# [*.train] keys that cannot change the final weights (how often to log, checkpoint, and how much of the validation
# split to evaluate): the fingerprint holds them at their defaults, so changing one does not retrain a finished stage
# (and a run finished with the defaults keeps its fingerprint)
NOT_WEIGHTS_KEYS = ("log_every", "checkpoint_every", "limit_eval_batches")


def stage_fingerprints(recipe: Recipe, stage: str, teacher_weights: Path | None = None) -> tuple[str, ...]:
    """What the stage's output depends on: data, seed and its model section (not runtime, not other models, not
    the `NOT_WEIGHTS_KEYS` of its training); for the distilled student also the [distill] settings and the
    teacher's weights. First the fingerprint a run records now, then the form runs finished before
    `NOT_WEIGHTS_KEYS` recorded (it hashed them as set), which still matches: their work is reused, not redone."""
    parts = {
        "stage": stage,
        "seed": recipe.seed,
        "data": data_fingerprint(recipe.data),
        # how an "auto" student was chosen is not what its weights depend on: the model it chose is
        "model": recipe.model_for(stage).model_dump(mode="json", exclude={"search"}),
    }
    if stage == "student":
        # keys added later are left out at their default, so runs finished before they existed stay reused
        unset = {key for key, default in LATER_DISTILL_KEYS.items() if getattr(recipe.distill, key) == default}
        parts["distill"] = recipe.distill.model_dump(mode="json", exclude={"baseline", *unset})
        parts["teacher"] = file_hash(teacher_weights)[:16] if teacher_weights else None
    earlier = _hash(parts)
    defaults = TrainConfig().model_dump(mode="json")
    parts["model"]["train"].update({key: defaults[key] for key in NOT_WEIGHTS_KEYS})
    now = _hash(parts)
    return (now,) if now == earlier else (now, earlier)


def stage_fingerprint(recipe: Recipe, stage: str, teacher_weights: Path | None = None) -> str:
    """The fingerprint a run of `stage` records now (`stage_fingerprints`)."""
    return stage_fingerprints(recipe, stage, teacher_weights)[0]


def _hash(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _matches(recorded: str | None, fingerprint: str | tuple[str, ...]) -> bool:
    return recorded in ((fingerprint,) if isinstance(fingerprint, str) else fingerprint)


def teacher_weights_for(recipe: Recipe, runs_dir: Path) -> Path:
    """The weights the distilled student learns from: teacher.checkpoint, else this recipe's teacher run."""
    teacher = recipe.model_for("teacher")
    if teacher.checkpoint:
        return resolve_weights(Path(teacher.checkpoint), "teacher.checkpoint")
    stage_dir = layout.stage_dir(runs_dir, recipe.name, "teacher")
    if not layout.is_finished(stage_dir):
        raise CheckpointError(
            f"no trained teacher in {stage_dir}; run `kdforge distill` (which trains it first), "
            f"`kdforge teacher` or set teacher.checkpoint"
        )
    if not _matches(read_json(stage_dir / layout.RESULT).get("fingerprint"), stage_fingerprints(recipe, "teacher")):
        raise CheckpointError(f"the teacher in {stage_dir} was trained with other [teacher] settings; retrain it")
    return resolve_weights(stage_dir, "teacher")


@dataclass(frozen=True)
class StagePlan:
    """What `train_stage` will do with a stage folder, decided from its files alone (nothing is loaded or changed):
    "reuse" its finished run, "adopt" a finished twin from another run (the teacher store), "resume" its
    unfinished run, or "train" (from scratch). `discard` says why an earlier run in the folder is replaced."""

    action: str
    discard: str | None = None
    resume_from: Path | None = None
    donor: Path | None = None
    previous: dict[str, Any] | None = None  # the reused stage's result.json


def plan_stage(stage_dir: Path, stage: str, fingerprint: str | tuple[str, ...], runs_dir: Path, resume: bool = False,
               overwrite: bool = False, retrain_stale: bool = False) -> StagePlan:
    """Skip, resume or redo: the decision for `stage_dir` given the stage's `fingerprint` (or the fingerprints its
    runs may have recorded, `stage_fingerprints`) and the flags. Raises
    CheckpointError when the folder holds work the flags do not allow replacing (an unfinished run without
    --resume, a run with other settings without --overwrite or `retrain_stale`)."""
    discard: str | None = "--overwrite" if overwrite else None
    resume_from = None
    if not overwrite and layout.is_finished(stage_dir):
        previous = read_json(stage_dir / layout.RESULT)
        if _matches(previous.get("fingerprint"), fingerprint):
            return StagePlan("reuse", previous=previous)
        discard = "finished with other settings (or another teacher) than the recipe now asks for"
    elif not overwrite and layout.has_started(stage_dir):
        last = (stage_dir / layout.LAST).resolve()
        if not _matches(checkpoint_metadata(last).get("fingerprint"), fingerprint):
            discard = "the recipe changed since this unfinished run started"
        elif not resume:
            raise CheckpointError(
                f"{stage_dir} holds an unfinished run (checkpoint {last.name}); pass --resume to continue it "
                f"or --overwrite to start over"
            )
        else:
            resume_from = last
    if discard and discard != "--overwrite" and not retrain_stale:
        raise CheckpointError(f"{stage_dir}: {discard}; pass --overwrite to start over")
    # a teacher is trained once: a finished one with the same fingerprint in another run is reused, not retrained
    donor = find_finished_stage(runs_dir, stage, fingerprint) if stage in SHARED and not (overwrite or resume_from) \
        else None
    action = "adopt" if donor is not None else "resume" if resume_from is not None else "train"
    return StagePlan(action, discard, resume_from, donor)


def stage_is_finished(recipe: Recipe, stage: str, runs_dir: str | Path = "runs") -> bool:
    """Whether `kdforge distill` would reuse a finished run of `stage` instead of training (`plan_stage`'s
    decision, from the same files, without loading anything)."""
    runs_dir = Path(runs_dir)
    try:
        teacher_weights = teacher_weights_for(recipe, runs_dir) if stage == "student" else None
        plan = plan_stage(layout.stage_dir(runs_dir, recipe.name, stage), stage,
                          stage_fingerprints(recipe, stage, teacher_weights), runs_dir, resume=True,
                          retrain_stale=True)
    except KdforgeError:  # no teacher yet, or a damaged file: the stage will train (and say what is wrong)
        return False
    return plan.action in ("reuse", "adopt")




def train_stage(recipe: Recipe, stage: str, runs_dir: str | Path = "runs", resume: bool = False,
                overwrite: bool = False, retrain_stale: bool = False, device: str | None = None,
                consumers: list[Consumer] | None = None) -> StageResult:
    """Train one stage. `retrain_stale`: when the stage's settings changed, discard the old run (and say so)
    instead of refusing; `kdforge distill` uses it so that a changed recipe invalidates what depends on it."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    cfg = recipe.model_for(stage)
    if cfg.model == AUTO:
        raise RecipeError(f'the {stage} stage needs a model: [student] model = "auto" is chosen by `kdforge distill` '
                          f'(after the teacher) or by `kdforge students RECIPE --write-recipe PATH`')
    check_tracking(recipe.tracking)
    main = current_rank() == 0  # with torchrun: only rank 0 writes files, logs and shows progress
    consumers = (consumers if consumers is not None else [ProgressDisplay()]) if main else []
    runs_dir = Path(runs_dir)
    stage_dir = layout.stage_dir(runs_dir, recipe.name, stage)
    # one kdforge process at a time on a run (rank 0 holds it for all ranks): a second one fails here, before it plans
    with folder_lock(runs_dir / recipe.name, "run") if main else contextlib.nullcontext():
        # hosts that share no disk: every process gets the newest copy of the folders this stage reads (share.py)
        needs = [layout.stage_dir(runs_dir, recipe.name, "teacher")] \
            if stage == "student" and not recipe.model_for("teacher").checkpoint else []
        for folder in (*needs, stage_dir):
            note = share_stage(folder)
            if note and main:
                notify(consumers, note)
        teacher_weights = teacher_weights_for(recipe, runs_dir) if stage == "student" else None
        fingerprints = stage_fingerprints(recipe, stage, teacher_weights)
        return _train_planned(recipe, stage, runs_dir, stage_dir, cfg, teacher_weights, fingerprints, resume,
                              overwrite, retrain_stale, device, main, consumers)


def _train_planned(recipe: Recipe, stage: str, runs_dir: Path, stage_dir: Path, cfg: ModelConfig,
                   teacher_weights: Path | None, fingerprints: tuple[str, ...], resume: bool, overwrite: bool,
                   retrain_stale: bool, device: str | None, main: bool, consumers: list[Consumer]) -> StageResult:
    # every process decides from the same files, then rank 0 alone changes them
    plan = plan_stage(stage_dir, stage, fingerprints, runs_dir, resume, overwrite, retrain_stale)
    fingerprint = fingerprints[0]  # what this run records
    sync()
    if plan.action == "reuse":
        return StageResult(**{**plan.previous, "skipped": True})

    started = time.perf_counter()
    metrics = MetricsLog(stage_dir / layout.METRICS)
    with runtime_scope(recipe.runtime, device) as runtime:
        # every input is checked (device, data, model, teacher) before any file of the stage changes: a command
        # that fails here leaves an earlier finished run exactly as it was
        check_can_create(stage_dir, "stage folder")
        data = load_dataset(recipe.data, recipe.seed)
        # a student (or, for hints, a teacher) without stages is refused here
        run = assemble_run(recipe, stage, data.num_classes, teacher_weights)
        if main:
            prepare_stage_dir(plan, stage_dir, recipe, metrics, consumers)
        sync()
        if plan.donor is not None:  # nothing to train
            if run.projectors is not None:
                run.projectors.remove()
            reused = StageResult(**{**read_json(plan.donor / layout.RESULT), "stage_dir": str(stage_dir),
                                    "skipped": True, "adopted_from": str(plan.donor)})
            return _finished(reused, runs_dir / recipe.name, main)

        run.learn(recipe, data, runtime, runs_dir, consumers, teacher_weights)
        if run.projectors is not None and main:
            notify(consumers, f"student {cfg.model}: {run.projectors.describe()}")
        if run.distillation_token and main:
            notify(consumers, f"student {cfg.model}: the labels train its class head, the teacher its distillation "
                              f"head ({recipe.distill.method}); evaluation, export and serving average the two")
        trackers = stage_trackers(recipe, runs_dir, stage) if main else []  # TensorBoard, MLflow: as the recipe asks
        try:
            result = run.fit(recipe, data, cfg.train, runtime, stage_dir, title=f"{stage} {cfg.model}",
                             resume_from=plan.resume_from, consumers=[metrics, *trackers, *consumers] if main else [],
                             checkpoint_metadata={"fingerprint": fingerprint, "model": cfg.model, "stage": stage})
        finally:  # a run that failed before the loop's own end event is marked so (no-op after a normal end)
            for tracker in trackers:
                tracker.close("FAILED")

    outcome = StageResult(
        stage=stage, model=cfg.model, params=count_parameters(run.model), top1=result.final["top1"],
        top5=result.final["top5"], best_top1=result.best.get("top1", result.final["top1"]),
        best_epoch=int(result.best.get("epoch", 0)), steps=result.steps, input_size=run.spec.size,
        wall_s=round(time.perf_counter() - started, 2), train_images_per_s=round(result.train_images_per_s, 1),
        fingerprint=fingerprint, stage_dir=str(stage_dir), val_images=len(data.val) if data.val is not None else 0)
    return _finished(outcome, runs_dir / recipe.name, main)


def prepare_stage_dir(plan: StagePlan, stage_dir: Path, recipe: Recipe, metrics: MetricsLog,
                      consumers: list[Consumer]) -> None:
    """Rank 0, after every input was checked: set the stage folder up as `plan` says. A replaced run is moved
    aside (deleted only once the new one finished); an adopted one is linked in; what a killed run left
    half-written goes; the recipe is written; the metrics log is cut back to the resumed checkpoint."""
    stage, stale = stage_dir.name, None
    if (plan.discard or plan.donor) and stage_dir.exists():
        stale = stage_dir.parent / layout.STALE / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        stale.parent.mkdir(parents=True, exist_ok=True)
        stage_dir.rename(stale)
    if plan.discard and plan.discard != "--overwrite":
        notify(consumers, f"{stage}: {plan.discard}; training it again (the earlier run is kept in {stale} until "
                          f"the new one finishes)")
    if plan.donor is not None:
        adopt_stage(plan.donor, stage_dir)
        notify(consumers, f"{stage}: trained with these settings in {plan.donor}: reused (its files linked here; "
                          f"--overwrite trains it again)")
    stage_dir.mkdir(parents=True, exist_ok=True)
    for folder in (stage_dir, stage_dir / layout.CHECKPOINTS):  # what a killed run left half-written
        remove_leftovers(folder)
    atomic_write_text(stage_dir / layout.RECIPE, recipe_to_toml(recipe))
    if plan.resume_from is not None:
        metrics.truncate_after(int(checkpoint_metadata(plan.resume_from)["step"]))
    elif plan.donor is None:
        metrics.path.unlink(missing_ok=True)






def _finished(outcome: StageResult, run_dir: Path, main: bool) -> StageResult:
    """Record the finished stage (result.json) and drop the earlier runs it replaced."""
    if main:
        outcome = replace(outcome, weights_sha256=file_hash(final_weights(Path(outcome.stage_dir))))
        write_json(Path(outcome.stage_dir) / layout.RESULT, outcome.record())
        drop_stale(run_dir, outcome.stage)
    sync()
    return outcome


def drop_stale(run_dir: Path, stage: str) -> None:
    """The earlier runs of `stage` that `prepare_stage_dir` kept aside (this one's and any a crash left): its
    successor finished, so they go."""
    for earlier in (run_dir / layout.STALE).glob(f"{stage}-*"):
        shutil.rmtree(earlier, ignore_errors=True)


def find_finished_stage(runs_dir: Path, stage: str, fingerprint: str | tuple[str, ...]) -> Path | None:
    """A finished `stage` of any run in `runs_dir` with this fingerprint (same model, data, seed and training
    settings: the same weights up to the machine's arithmetic), or None. The runs folder is the store: nothing
    else to keep in sync."""
    for candidate in layout.finished_stages(runs_dir, stage):
        try:
            finished = _matches(read_json(candidate / layout.RESULT).get("fingerprint"), fingerprint)
            weights = final_weights(candidate)
        except KdforgeError:  # a damaged result or a foreign `last` elsewhere is that run's problem, not this one's
            continue
        if finished and weights.is_file():
            return candidate
    return None


def adopt_stage(donor: Path, stage_dir: Path) -> None:
    """Make `stage_dir` a copy of the finished stage `donor`, files hard-linked where the file system allows
    (checkpoints are never changed in place, so a link is as safe as a copy and costs no space)."""
    def link_or_copy(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    remove_leftovers(stage_dir.parent)  # what an adoption killed half-way left
    with atomic_path(stage_dir) as tmp:
        shutil.copytree(donor, tmp, symlinks=True, copy_function=link_or_copy,
                        ignore=shutil.ignore_patterns(".*", layout.RESULT, layout.RECIPE))




def evaluate_teacher_checkpoint(recipe: Recipe, device: str | None = None,
                                runs_dir: str | Path | None = None) -> StageResult:
    """Test accuracy of the finished teacher named by teacher.checkpoint (always reported, never assumed). With
    `runs_dir`, the result is also written to runs/<name>/teacher_eval/result.json, where the report reads it."""
    cfg = recipe.model_for("teacher")
    weights = resolve_weights(Path(cfg.checkpoint), "teacher.checkpoint")
    started = time.perf_counter()
    with runtime_scope(recipe.runtime, device) as runtime:
        data = load_dataset(recipe.data, recipe.seed)
        teacher = load_frozen_teacher(cfg, weights, data.num_classes).to(runtime.device)
        metrics = evaluate(teacher.model, teacher.spec, data.test.to(runtime.device), cfg.train.batch_size,
                           runtime, cfg.train.limit_eval_batches)
    result = StageResult(
        stage="teacher", model=cfg.model, params=count_parameters(teacher.model), top1=metrics["top1"],
        top5=metrics["top5"], best_top1=metrics["top1"], best_epoch=0, steps=0, input_size=teacher.spec.size,
        wall_s=round(time.perf_counter() - started, 2), train_images_per_s=0.0, fingerprint=file_hash(weights)[:16],
        stage_dir=str(weights),
    )
    if runs_dir is not None and current_rank() == 0:
        folder = Path(runs_dir) / recipe.name / layout.TEACHER_EVAL
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / layout.RESULT, result.record())
    return result


def build_teacher_cache(recipe: Recipe, runs_dir: Path = Path("runs"), device: str | None = None,
                        consumers: list[Consumer] = ()) -> tuple[TeacherCache, Path]:
    """`kdforge teacher-cache`: the recipe's teacher answers stored ahead of distillation (the one file, or the
    sharded store, every process of a torchrun launch building its shards), exactly as the student stage would
    build them; returns the cache and where it lies."""
    cache_cfg = recipe.distill.teacher_cache
    if not cache_cfg.views:
        raise RecipeError("the recipe has no teacher cache: set distill.teacher_cache.views (e.g. --set "
                          "distill.teacher_cache.views=4; add distill.teacher_cache.store=DIR for the sharded store)")
    weights = teacher_weights_for(recipe, runs_dir)
    with runtime_scope(recipe.runtime, device) as runtime:
        data = load_dataset(recipe.data, recipe.seed)
        teacher = load_frozen_teacher(recipe.model_for("teacher"), weights, data.num_classes)
        teacher.to(runtime.device, runtime.uses_channels_last(teacher.model))  # as the student stage places it
        cache = teacher_cache_for(recipe, runs_dir, teacher, weights, data, runtime, consumers)
    where = Path(cache_cfg.store) if cache_cfg.store is not None else runs_dir / recipe.name / layout.TEACHER_CACHE
    return cache, where
