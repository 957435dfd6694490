"""One assembly of a training run: the model, its input spec, the teacher, the training-only projectors, the
objective and the batch source that `fit` trains, built in one place for the stages (`train/stages.py`), the QAD
stage (`train/qad.py`) and the time estimate (`estimate.py`), so the three cannot drift apart: the estimate times
what the stage will train (projectors and a DeiT student's distillation head included), QAD learns from the
objective the stage learnt from.

    run = assemble_run(recipe, "student", data.num_classes, teacher_weights=weights)  # checks; writes no file
    run.learn(recipe, data, runtime, runs_dir, consumers)   # the objective (may build the teacher cache)
    result = run.fit(data, cfg.train, runtime, stage_dir, title="student resnet18")

Assembling checks every input (the model takes its input size, a student with stages for OFA/FitNets) before
any file of the stage changes; `learn` may write the teacher cache, so the stage calls it after setting its
folder up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdforge import layout
from kdforge.data.transforms import InputSpec
from kdforge.distill.cache import TeacherCache, cache_key, load_or_build_cache
from kdforge.distill.features import FeatureHints, StageProjectors
from kdforge.distill.objective import Objective, create_distill_objective, cross_entropy_objective
from kdforge.distill.teacher import FrozenTeacher, load_frozen_teacher
from kdforge.errors import ModelError
from kdforge.fileio import file_hash
from kdforge.models import create_model, resolve_input_spec
from kdforge.phases import Consumer
from kdforge.recipe import DistillConfig, ModelConfig, Recipe, TrainConfig, data_fingerprint
from kdforge.runtime import out_of_memory_as_error, seed_everything
from kdforge.train.loop import BatchSource, FitResult, fit

Projectors = StageProjectors | FeatureHints


@dataclass
class TrainingRun:
    stage: str
    cfg: ModelConfig  # the stage's model section
    model: torch.nn.Module
    spec: InputSpec
    teacher: FrozenTeacher | None  # None: labels alone
    projectors: Projectors | None  # OFA's projectors or FitNets' adapters, trained beside the model
    distillation_token: bool  # a DeiT student whose distillation head learns from the teacher
    objective: Objective | None = None  # set by learn()
    cache: TeacherCache | None = None  # the teacher's stored answers, when the recipe has a teacher cache

    def learn(self, recipe: Recipe, data, runtime, runs_dir: Path = Path(), consumers: list[Consumer] = (),
              teacher_weights: Path | None = None, distill: DistillConfig | None = None) -> TrainingRun:
        """What the model learns from: the recipe's [distill] objective against the teacher (its answers read
        from the teacher cache when the recipe has one, built here if missing), labels alone without a teacher,
        or `distill` instead of the recipe's (QAD's self-distillation: no cache, no label term)."""
        if self.teacher is None:
            self.objective = cross_entropy_objective(self.cfg.train.label_smoothing)
            return self
        self.teacher.to(runtime.device, runtime.uses_channels_last(self.teacher.model))
        if distill is not None:
            self.objective = create_distill_objective(distill, self.teacher)
            return self
        teacher = self.teacher
        if recipe.distill.teacher_cache.views:
            self.cache = teacher_cache_for(recipe, runs_dir, teacher, teacher_weights, data, runtime, consumers)
            teacher = None  # the cache answers for it from here on
        self.objective = create_distill_objective(recipe.distill, teacher, self.cfg.train.label_smoothing,
                                                  self.projectors)
        return self

    def fit(self, recipe: Recipe, data, train: TrainConfig, runtime, folder: Path, title: str,
            **options: Any) -> FitResult:
        """The one training loop over this run (`options`: fit's resume_from, consumers, checkpoint_metadata);
        the projectors' hooks are removed from the model when it ends, however it ends."""
        if self.objective is None:
            raise ValueError("learn() sets the objective before fit()")
        try:
            return fit(self.model, self.spec, self.objective, data, train, runtime,
                       BatchSource(recipe.data.augment, recipe.seed, self.cache), folder, title=title,
                       extra=self.projectors, **options)
        finally:
            if self.projectors is not None:
                self.projectors.remove()


def assemble_run(recipe: Recipe, stage: str, num_classes: int, teacher_weights: Path | None = None, *,
                 untrained: bool = False, model: torch.nn.Module | None = None,
                 teacher: FrozenTeacher | None = None, projectors: bool = True) -> TrainingRun:
    """The training run of `stage` ("teacher", "baseline", "student"; QAD passes its source stage's name).

    Without `model`, the stage's model is built from the recipe, seeded with the recipe's seed (the baseline and
    the distilled student start from the same weights), checked against its input size, and the teacher is the
    recipe's finished one (`teacher_weights`; None: labels alone). `untrained`: random weights for both, what the
    estimate times (the cost of a step does not depend on the weights). With `model` (QAD: the finished student,
    quantized), `teacher` is used as given. `projectors=False`: no OFA/FitNets modules (QAD fine-tunes the exported
    graph, which holds none)."""
    cfg = recipe.model_for(stage)
    distillation_token = False
    if model is None:
        seed_everything(recipe.seed)
        model = create_model(_untrained(cfg) if untrained else cfg, num_classes)
        spec = resolve_input_spec(cfg)
        check_input_size(model, spec, cfg.model)
        distillation_token = stage == "student" and hasattr(model, "set_distilled_training")
        if distillation_token:  # DeiT: its distillation token's head learns from the teacher (objective.heads)
            model.set_distilled_training(True)
        teacher = _recipe_teacher(recipe, stage, teacher_weights, num_classes, untrained)
    else:
        spec = resolve_input_spec(cfg)
    made = stage_projectors(recipe, stage, model, spec, num_classes, teacher) if projectors else None
    return TrainingRun(stage, cfg, model, spec, teacher, made, distillation_token)


def _untrained(cfg: ModelConfig) -> ModelConfig:
    return cfg.model_copy(update={"pretrained": False, "weights": None})


def _recipe_teacher(recipe: Recipe, stage: str, weights: Path | None, num_classes: int,
                    untrained: bool) -> FrozenTeacher | None:
    """The finished teacher a distilled student learns from; untrained: one of the same architecture answering
    every step, as the stage's will (none when a teacher cache answers: a step then costs about what labels do)."""
    if stage != "student":
        return None
    if untrained:
        if recipe.distill.teacher_cache.views:
            return None
        cfg = recipe.model_for("teacher")
        return FrozenTeacher(create_model(_untrained(cfg), num_classes), resolve_input_spec(cfg))
    return load_frozen_teacher(recipe.model_for("teacher"), weights, num_classes) if weights is not None else None


def check_input_size(model: torch.nn.Module, spec: InputSpec, name: str) -> None:
    """Fail before training when the model cannot take inputs of the resolved size."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, spec.size, spec.size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ModelError(
            f"{name} does not accept {spec.size}x{spec.size} inputs ({str(exc).splitlines()[0][:200]}); "
            f"set input_size, or for ViTs model_kwargs = {{img_size = {spec.size}}}"
        ) from None
    finally:
        model.train(was_training)


def stage_projectors(recipe: Recipe, stage: str, model, spec, num_classes: int,
                     teacher: FrozenTeacher | None = None) -> Projectors | None:
    """The distilled student's training-only modules beside it: method ofa, the projectors of its intermediate
    stages; method fitnet, the adapters of its stages onto the teacher's (hooks on both). None without a teacher
    (labels alone: nothing to distill them onto)."""
    if stage != "student" or recipe.distill.method not in ("ofa", "fitnet") or teacher is None:
        return None
    if recipe.distill.method == "ofa":
        return StageProjectors(model, spec, num_classes, recipe.model_for(stage).model)
    return FeatureHints(model, spec, teacher.model, teacher.spec,
                        (recipe.model_for(stage).model, recipe.model_for("teacher").model))


def teacher_cache_for(recipe: Recipe, runs_dir: Path, teacher, teacher_weights: Path, data, runtime,
                      consumers) -> TeacherCache:
    """The recipe's teacher cache (runs/<name>/teacher_cache.safetensors, or the sharded store in
    [distill.teacher_cache] store), generated when its key changed."""
    cache_cfg = recipe.distill.teacher_cache
    data_settings = data_fingerprint(recipe.data)
    key = cache_key(
        # the weights by their hash, not by where they lie: a run that points teacher.checkpoint at another run's
        # teacher reuses that run's answers
        teacher=file_hash(teacher_weights),
        teacher_model=recipe.model_for("teacher").model_dump(mode="json", exclude={"checkpoint"}),
        data={k: v for k, v in data_settings.items() if k != "augment"}, images=len(data.train),
        augment=data_settings["augment"], seed=recipe.seed,
        views=cache_cfg.views, topk=cache_cfg.topk, precision=runtime.precision,
        **({"shard_images": cache_cfg.shard_images} if cache_cfg.store is not None else {}),
    )
    (runs_dir / recipe.name).mkdir(parents=True, exist_ok=True)
    if cache_cfg.store is not None:  # the sharded store, built by every process
        from kdforge.distill.store import load_or_build_store

        with out_of_memory_as_error(
            f"building the teacher store ({recipe.model_for('teacher').model} on {runtime.device}, teacher batch "
            f"size {cache_cfg.batch_size})", "lower distill.teacher_cache.batch_size",
        ):
            return load_or_build_store(Path(cache_cfg.store), key, teacher, data.train, cache_cfg,
                                       recipe.data.augment, recipe.seed, runtime, data.num_classes, consumers)
    with out_of_memory_as_error(
        f"building the teacher cache ({recipe.model_for('teacher').model} on {runtime.device}, teacher batch size "
        f"{cache_cfg.batch_size})", "lower distill.teacher_cache.batch_size",
    ):
        return load_or_build_cache(runs_dir / recipe.name / layout.TEACHER_CACHE, key, teacher, data.train,
                                   cache_cfg, recipe.data.augment, recipe.seed, runtime, consumers)

