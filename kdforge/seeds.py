"""Seeds as a dimension of an experiment: the chain once per seed, then whether the distillation gain is real.

    summary = run_seeds(recipe)    # recipe.experiment.seeds = [0, 1, 2]
    summary.verdict    # "gain +7.70 +- 0.52 points over 3 seeds, 95% CI [+6.40, +9.00]: significant"

Seed s runs as the recipe named `<name>-seed<s>` (runs/<name>-seed<s>/, exports in <export dir>/<name>-seed<s>/):
each seed is a run like any other, resumed, reused, exported and found by the teacher store as such; the
statistics go to runs/<name>/seeds.json and runs/<name>/report/seeds.md. With `share_teacher` (the
default) the teacher is trained once, with the first seed, and the other seeds distill from that same teacher
(`teacher.checkpoint`): the spread of the gain is then the students'. The gain of a seed is its distilled
student's top-1 minus its baseline's (the two start from the same weights), so the interval is a paired one:
the t distribution over the per-seed differences.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdforge.fileio import write_json
from kdforge.layout import SEEDS, TRAINING_STAGES, seed_run_name, stage_dir
from kdforge.phases import Consumer, notify
from kdforge.pipeline import DistillSummary, run_distill
from kdforge.recipe import Recipe
from kdforge.report import write_seeds_report
from kdforge.runtime import current_rank
from kdforge.train.events import ProgressDisplay

ROLES = TRAINING_STAGES  # the roles compared over seeds


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t distribution with `df` degrees of freedom (p > 0.5): bisection on its CDF,
    integrated with Simpson's rule (accurate to ~1e-6 here; no SciPy needed for one number)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float, n: int = 2000) -> float:  # 0.5 + integral of the density from 0 to t
        h = t / n
        density = [math.exp(log_norm - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return 0.5 + h / 3 * (density[0] + density[-1] + 4 * sum(density[1:-1:2]) + 2 * sum(density[2:-1:2]))

    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < p else (low, middle)
    return (low + high) / 2


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def gain_interval(gains: list[float], level: float = 0.95) -> dict[str, Any]:
    """Mean, sd and the `level` confidence interval (t distribution, paired differences) of per-seed gains in
    points, and whether the interval excludes 0. With one seed there is no interval."""
    mean, sd = mean_sd(gains)
    result: dict[str, Any] = {"mean": mean, "sd": sd, "n": len(gains), "level": level, "ci": None,
                              "significant": None}
    if len(gains) >= 2:
        half = t_quantile(0.5 + level / 2, len(gains) - 1) * sd / math.sqrt(len(gains))
        result["ci"] = [mean - half, mean + half]
        result["significant"] = mean - half > 0 or mean + half < 0
    return result


def verdict(gain: dict[str, Any]) -> str:
    """One line: the gain, its spread, its interval and what they say."""
    head = f"gain {gain['mean']:+.2f} +- {gain['sd']:.2f} points over {gain['n']} seed{'s' * (gain['n'] > 1)}"
    if gain["ci"] is None:
        return f"{head}: one seed, no confidence interval (run several seeds to know whether the gain is real)"
    low, high = gain["ci"]
    interval = f"{gain['level']:.0%} CI [{low:+.2f}, {high:+.2f}]"
    if gain["significant"]:
        return f"{head}, {interval}: significant"
    return f"{head}, {interval}: not significant (the interval includes 0)"


@dataclass
class SeedsSummary:
    recipe: str
    seeds: list[int]
    shared_teacher: bool
    per_seed: list[dict[str, Any]]  # seed, top-1 (%) of teacher, baseline and student, gain (points)
    stats: dict[str, dict[str, float]]  # role -> {"mean", "sd"} of top-1 in percent
    gain: dict[str, Any]  # gain_interval()
    verdict: str
    failures: dict[str, str] = field(default_factory=dict)  # "seed <s> <format>" -> why it failed verification
    report: str | None = None


def seed_recipe(recipe: Recipe, seed: int, teacher_dir: Path | None) -> Recipe:
    """The recipe of one seed: its own run name (so its own run and export folders); the shared teacher when one
    is given."""
    update: dict[str, Any] = {"name": seed_run_name(recipe.name, seed), "seed": seed,
                              "experiment": recipe.experiment.model_copy(update={"seeds": []}),
                              "tracking": recipe.tracking.model_copy(  # every seed in the recipe's experiment
                                  update={"experiment": recipe.tracking.experiment or recipe.name})}
    if teacher_dir is not None:
        update["teacher"] = recipe.model_for("teacher").model_copy(update={"checkpoint": str(teacher_dir)})
    return recipe.model_copy(update=update)


def summarize_seeds(recipe: Recipe, runs: dict[int, DistillSummary], shared_teacher: bool) -> SeedsSummary:
    per_seed = []
    for seed, run in runs.items():
        row = {"seed": seed, **{role: getattr(run, role)["top1"] * 100 for role in ROLES}}
        row["gain"] = row["student"] - row["baseline"]
        per_seed.append(row)
    stats = {role: dict(zip(("mean", "sd"), mean_sd([row[role] for row in per_seed]), strict=True))
             for role in ROLES}
    gain = gain_interval([row["gain"] for row in per_seed])
    failures = {f"seed {seed} {name}": why for seed, run in runs.items() for name, why in run.failures.items()}
    return SeedsSummary(recipe=recipe.name, seeds=list(runs), shared_teacher=shared_teacher, per_seed=per_seed,
                        stats=stats, gain=gain, verdict=verdict(gain), failures=failures)


def run_seeds(recipe: Recipe, runs_dir: str | Path = "runs", resume: bool = False, device: str | None = None,
              consumers: list[Consumer] | None = None) -> SeedsSummary:
    """The chain once per seed of `recipe.experiment.seeds` (runs/<name>-seed<s>/), then the statistics
    (runs/<name>/seeds.json and runs/<name>/report/seeds.md)."""
    consumers = [ProgressDisplay()] if consumers is None else consumers
    seeds = recipe.experiment.seeds
    runs_dir = Path(runs_dir)
    given = recipe.model_for("teacher").checkpoint is not None  # every seed uses that teacher anyway
    share = recipe.experiment.share_teacher and not given
    runs: dict[int, DistillSummary] = {}
    for seed in seeds:
        shared = share and seed != seeds[0]
        teacher_dir = stage_dir(runs_dir, seed_run_name(recipe.name, seeds[0]), "teacher") if shared else None
        notify(consumers if current_rank() == 0 else [], f"seed {seed} ({len(runs) + 1} of {len(seeds)})"
               + (f": teacher of seed {seeds[0]}" if teacher_dir else ""))
        runs[seed] = run_distill(seed_recipe(recipe, seed, teacher_dir), runs_dir=runs_dir, resume=resume,
                                 device=device, consumers=consumers)
    summary = summarize_seeds(recipe, runs, share or given)
    if current_rank() == 0:
        group = runs_dir / recipe.name
        summary.report = str(write_seeds_report(group, asdict(summary)))
        write_json(group / SEEDS, asdict(summary))
    return summary


def run_recipe(recipe: Recipe, runs_dir: str | Path = "runs", resume: bool = False, device: str | None = None,
               consumers: list[Consumer] | None = None, plan_shown: bool = False) -> DistillSummary | SeedsSummary:
    """`kdforge distill`: the chain once (`run_distill`), or once per seed when the recipe lists seeds
    (`run_seeds`). `consumers` (default: a progress display) hear first about formats this machine cannot build
    (the other stages still run).
    `plan_shown`: the caller printed the recipe's `describe_plan` already (each seed's run still says its own)."""
    from kdforge.export.artifacts import unbuildable_here
    from kdforge.formats import with_sources
    from kdforge.plan import recipe_formats

    if consumers is None:
        consumers = [ProgressDisplay()] if current_rank() == 0 else []
    for name, reason in unbuildable_here(with_sources(recipe_formats(recipe))).items() if current_rank() == 0 else []:
        notify(consumers, f"note: {name} will not be built here ({reason}); the other stages run")
    if recipe.experiment.seeds:
        return run_seeds(recipe, runs_dir=runs_dir, resume=resume, device=device, consumers=consumers)
    return run_distill(recipe, runs_dir=runs_dir, resume=resume, device=device, consumers=consumers,
                       plan_shown=plan_shown)
