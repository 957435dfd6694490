"""Training stages: what `kdforge teacher` and `kdforge baseline` run, on top of the one loop.

    result = train_stage(recipe, "teacher")           # runs/<recipe>/teacher/{recipe.toml, metrics.jsonl, ...}

A stage trains one model section of the recipe (`teacher` trains [teacher]; `baseline` trains [student] with
plain cross-entropy). A stage that already finished with the same settings is not trained again; an
unfinished one continues with `resume=True`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kdforge.data import load_dataset
from kdforge.data.transforms import InputSpec
from kdforge.errors import CheckpointError, ModelError
from kdforge.models import count_parameters, create_model, resolve_input_spec
from kdforge.recipe import Recipe, recipe_to_toml
from kdforge.runtime import runtime_scope, seed_everything
from kdforge.train.checkpoint import atomic_write_text, checkpoint_metadata, write_json
from kdforge.train.events import Consumer, MetricsLog, ProgressDisplay
from kdforge.train.loop import cross_entropy_objective, fit

STAGES = ("teacher", "baseline")


@dataclass(frozen=True)
class StageResult:
    stage: str
    model: str
    params: int
    top1: float  # test top-1 of the final weights (the ones later stages use)
    top5: float
    best_top1: float  # best test top-1 seen at an epoch end (reported, never used for selection)
    best_epoch: int
    steps: int
    input_size: int
    wall_s: float
    train_images_per_s: float
    fingerprint: str
    stage_dir: str
    skipped: bool = False  # True when an earlier finished run was reused


def stage_fingerprint(recipe: Recipe, stage: str) -> str:
    """What the stage's output depends on: data, seed and its model section (not runtime, not other models)."""
    parts = {
        "stage": stage,
        "seed": recipe.seed,
        "data": recipe.data.model_dump(mode="json"),
        "model": recipe.model_for(stage).model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def check_input_size(model: torch.nn.Module, spec: InputSpec, name: str) -> None:
    """Fail before training when the model cannot take inputs of the resolved size."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, spec.size, spec.size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ModelError(
            f"{name} does not accept {spec.size}x{spec.size} inputs ({str(exc).splitlines()[0][:200]}); "
            f"set input_size, or for ViTs model_kwargs = {{img_size = {spec.size}}}"
        ) from None
    finally:
        model.train(was_training)


def train_stage(
    recipe: Recipe,
    stage: str,
    runs_dir: str | Path = "runs",
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    consumers: list[Consumer] | None = None,
) -> StageResult:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    cfg = recipe.model_for(stage)
    stage_dir = Path(runs_dir) / recipe.name / stage
    fingerprint = stage_fingerprint(recipe, stage)
    result_path = stage_dir / "result.json"

    if overwrite:
        shutil.rmtree(stage_dir, ignore_errors=True)
    elif result_path.is_file():
        previous = json.loads(result_path.read_text())
        if previous.get("fingerprint") == fingerprint:
            return StageResult(**{**previous, "skipped": True})
        raise CheckpointError(
            f"{stage_dir} holds a finished {stage} trained with other settings; pass --overwrite to retrain it"
        )
    resume_from = None
    if (stage_dir / "last").exists():
        last = (stage_dir / "last").resolve()
        if not resume:
            raise CheckpointError(
                f"{stage_dir} holds an unfinished run (checkpoint {last.name}); pass --resume to continue it "
                f"or --overwrite to start over"
            )
        if checkpoint_metadata(last).get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"{stage_dir}: the recipe changed since this run started; pass --overwrite to start over"
            )
        resume_from = last

    started = time.perf_counter()
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stage_dir / "recipe.toml", recipe_to_toml(recipe))
    metrics = MetricsLog(stage_dir / "metrics.jsonl")
    if resume_from is None:
        metrics.path.unlink(missing_ok=True)
    else:
        metrics.truncate_after(int(checkpoint_metadata(resume_from)["step"]))

    with runtime_scope(recipe.runtime, device) as runtime:
        data = load_dataset(recipe.data)
        seed_everything(recipe.seed)
        model = create_model(cfg, num_classes=data.num_classes)
        spec = resolve_input_spec(cfg)
        check_input_size(model, spec, cfg.model)
        result = fit(
            model, spec, cross_entropy_objective(cfg.train.label_smoothing), data, cfg.train,
            recipe.data.augment, runtime, recipe.seed, stage_dir,
            title=f"{stage} {cfg.model}",
            resume_from=resume_from,
            consumers=[metrics, *(consumers if consumers is not None else [ProgressDisplay()])],
            checkpoint_metadata={"fingerprint": fingerprint, "model": cfg.model, "stage": stage},
        )

    outcome = StageResult(
        stage=stage, model=cfg.model, params=count_parameters(model),
        top1=result.final["top1"], top5=result.final["top5"],
        best_top1=result.best.get("top1", result.final["top1"]), best_epoch=int(result.best.get("epoch", 0)),
        steps=result.steps, input_size=spec.size, wall_s=round(time.perf_counter() - started, 2),
        train_images_per_s=round(result.train_images_per_s, 1), fingerprint=fingerprint, stage_dir=str(stage_dir),
    )
    write_json(result_path, {k: v for k, v in asdict(outcome).items() if k != "skipped"})
    return outcome
