"""How long a chain's training will take on this machine, measured before it starts.

    estimate = estimate_training(recipe, ["teacher", "baseline", "student"])   # a few real steps of each stage
    estimate.line()      # "training: about 4 min 40 s on this machine (teacher 2 min 5 s, baseline 1 min 5 s, ...)"

Each stage is measured by running the real training loop (`fit`) for a few steps on the real data in a
temporary folder: steps 3-4 give the time of a step (the first two pay for kernel selection and allocation),
and one evaluation batch the time of an evaluation. The stage then costs its steps plus its evaluations (one per
epoch). Nothing of the run is touched, and the stages reseed before they build their models, so measuring does
not change any result.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdforge.data import load_dataset
from kdforge.recipe import Recipe

PROBE_STEPS = 4  # steps 1-2 warm up, steps 3-4 are timed
MIN_STEPS = 200  # shorter trainings are not estimated: measuring would cost a noticeable part of them


def minutes(seconds: float) -> str:
    """"4 min 40 s", "35 s"."""
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


@dataclass
class TrainingEstimate:
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> estimated wall time

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def line(self) -> str:
        parts = ", ".join(f"{stage} {minutes(s)}" for stage, s in self.seconds.items())
        return f"training: about {minutes(self.total)} on this machine ({parts}; measured from the first steps)"


class _Timer:
    """An event consumer that remembers the loop's images/s and how long each evaluation took."""

    def __init__(self) -> None:
        self.images_per_s = 0.0  # of the last logged window
        self.evals: list[float] = []  # seconds of each evaluation (one batch each here)
        self.last = 0.0

    def __call__(self, event: dict) -> None:
        now = time.perf_counter()
        if event["event"] == "log":
            self.images_per_s = event["images_per_s"]
        elif event["event"] == "eval":  # the last step's log line (or the evaluation before) comes just before
            self.evals.append(now - self.last)
        self.last = now


def _probe_stage(recipe: Recipe, stage: str, data, runtime) -> float:
    """Estimated seconds of `stage`, from a few real steps of it."""
    from kdforge.train.assemble import assemble_run
    from kdforge.train.loop import Plan

    cfg = recipe.model_for(stage)
    # what the stage will train, with random weights: its objective, OFA's projectors or FitNets' adapters, a DeiT
    # student's distillation head (a stage reading a teacher cache costs about what labels alone do)
    run = assemble_run(recipe, stage, data.num_classes, untrained=True).learn(recipe, data, runtime)
    probe = cfg.train.model_copy(update={"max_steps": PROBE_STEPS, "log_every": PROBE_STEPS // 2,
                                         "limit_eval_batches": 1, "checkpoint_every": 0})
    timer = _Timer()
    with tempfile.TemporaryDirectory(prefix="kdforge-estimate-") as folder:
        run.fit(recipe, data, probe, runtime, Path(folder), title=f"estimate {stage}", consumers=[timer])
    plan = Plan.create(len(data.train), cfg.train)
    step_s = cfg.train.batch_size / timer.images_per_s
    eval_s = timer.evals[0]
    eval_batches = -(-len(data.selection) // cfg.train.batch_size)
    if cfg.train.limit_eval_batches:
        eval_batches = min(eval_batches, cfg.train.limit_eval_batches)
    seconds = plan.total_steps * step_s + plan.epochs * eval_batches * eval_s
    if data.val is not None:  # and the test split once, at the end
        seconds += -(-len(data.test) // cfg.train.batch_size) * eval_s
    return seconds


def estimate_training(recipe: Recipe, stages: list[str], device: str | None = None) -> TrainingEstimate | None:
    """Estimated wall time of each training stage in `stages` (teacher, baseline, student), on this machine;
    None when they are shorter than MIN_STEPS steps in all. A teacher cache's build is not included."""
    from kdforge.runtime import runtime_scope
    from kdforge.train.loop import Plan

    estimate = TrainingEstimate()
    with runtime_scope(recipe.runtime, device) as runtime:
        data = load_dataset(recipe.data, recipe.seed)
        if sum(Plan.create(len(data.train), recipe.model_for(stage).train).total_steps for stage in stages) < MIN_STEPS:
            return None
        for stage in stages:
            estimate.seconds[stage] = _probe_stage(recipe, stage, data, runtime)
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()
    return estimate
