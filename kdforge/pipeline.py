"""`kdforge distill`: the chain a recipe describes, stage by stage, and its summary.

    summary = run_distill(recipe)      # teacher -> baseline -> distilled student; runs/<name>/summary.json
                                       # and runs/<name>/report/report.md (+ .html, plots)

`plan_stages` lists what runs. Each stage is skipped when its finished output matches the recipe and
redone when the recipe changed (a retrained teacher also redoes the student that learned from it).
Export (with verification) joins when the recipe's [export] names formats; later stages join the same way.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from kdforge import layout
from kdforge.data import describe_data
from kdforge.errors import RecipeError
from kdforge.estimate import estimate_training
from kdforge.export.artifacts import ExportResult, export_run
from kdforge.fileio import check_can_create, folder_lock, read_json, write_json
from kdforge.phases import Consumer, notify
from kdforge.plan import describe_plan, plan_stages, recipe_formats
from kdforge.recipe import AUTO, Recipe, recipe_hash
from kdforge.report import write_report
from kdforge.runtime import current_rank, machine, resolve_device, sync
from kdforge.tracking import check_tracking, track_summary
from kdforge.train.events import ProgressDisplay
from kdforge.train.stages import STAGES, StageResult, evaluate_teacher_checkpoint, stage_is_finished, train_stage


@dataclass
class ChainContext:
    runs_dir: Path
    resume: bool = False
    device: str | None = None
    consumers: list[Consumer] = field(default_factory=lambda: [ProgressDisplay()])


def _train(stage: str) -> Callable[[Recipe, ChainContext], StageResult]:
    def run(recipe: Recipe, ctx: ChainContext) -> StageResult:
        return train_stage(recipe, stage, runs_dir=ctx.runs_dir, resume=ctx.resume, retrain_stale=True,
                           device=ctx.device, consumers=ctx.consumers)

    return run


def _export(recipe: Recipe, ctx: ChainContext) -> ExportResult:
    # the recipe as it is now decides the export settings, also when the training stages were reused
    return export_run(layout.stage_dir(ctx.runs_dir, recipe.name, "student"), recipe_formats(recipe),
                      recipe.export.opset, Path(recipe.export.dir), verify=recipe.export.verify, device=ctx.device,
                      consumers=ctx.consumers, recipe=recipe, reuse=True)


STAGE_RUNNERS: dict[str, Callable[[Recipe, ChainContext], Any]] = {
    "teacher": _train("teacher"),
    "teacher_eval": lambda recipe, ctx: evaluate_teacher_checkpoint(recipe, device=ctx.device, runs_dir=ctx.runs_dir),
    "baseline": _train("baseline"),
    "student": _train("student"),
    "export": _export,
}


@dataclass(frozen=True)
class DistillSummary:
    recipe: str
    recipe_hash: str
    teacher: dict[str, Any]
    baseline: dict[str, Any] | None
    student: dict[str, Any]
    gain_top1: float | None  # distilled - baseline, in points of accuracy (fraction)
    compression: float  # teacher parameters / student parameters
    reused: list[str]  # stages whose earlier finished output was reused
    exports: dict[str, dict[str, Any]]  # format -> artifact, PyTorch vs exported top-1, verification
    unavailable: dict[str, str] = field(default_factory=dict)  # formats this machine could not make -> why
    failures: dict[str, str] = field(default_factory=dict)  # formats that failed verification -> why
    report: str | None = None  # runs/<name>/report/report.md
    # the top-1 numbers above are on the test split; this many training images were held out as the validation
    # split that chose each stage's `best` checkpoint and judged INT8's held-out checks (0: no validation split)
    val_images: int = 0
    wall_s: float | None = None  # this command's wall time (reused stages cost nothing)
    machine: dict[str, Any] = field(default_factory=dict)  # CPU model, its vector extension, threads, GPU
    # a student chosen by the search ([student.search]): its final file in the search's format, timed, against the
    # budget (students.check_budget)
    budget: dict[str, Any] | None = None


def _row(result: StageResult) -> dict[str, Any]:
    return {"model": result.model, "params": result.params, "top1": result.top1, "top5": result.top5,
            "input_size": result.input_size, "stage_dir": result.stage_dir}


def export_rows(result: ExportResult | None) -> dict[str, dict[str, Any]]:
    """Per format: the artifact, its export time and size, and PyTorch vs exported top-1 when verified."""
    if result is None:
        return {}
    rows = {}
    for name, path in result.artifacts.items():
        report = result.reports.get(name)
        rows[name] = {"artifact": str(path), "export_s": result.seconds[name], "verified": report is not None,
                      "bytes": path.stat().st_size}
        if report is not None:
            rows[name].update(report.row())
        if result.steps.get(name):  # an INT8 format: each step it took and what it measured
            rows[name]["int8_steps"] = result.steps[name]
    return rows


def summarize(recipe: Recipe, results: dict[str, Any]) -> DistillSummary:
    teacher = results.get("teacher") or results["teacher_eval"]
    baseline, student = results.get("baseline"), results["student"]
    return DistillSummary(
        recipe=recipe.name,
        recipe_hash=recipe_hash(recipe),
        teacher=_row(teacher),
        baseline=_row(baseline) if baseline else None,
        student=_row(student),
        gain_top1=student.top1 - baseline.top1 if baseline else None,
        compression=teacher.params / student.params,
        reused=[name for name, result in results.items() if getattr(result, "skipped", False)],
        val_images=max((getattr(result, "val_images", 0) for result in results.values()), default=0),
        exports=export_rows(results.get("export")),
        unavailable=results["export"].unavailable if results.get("export") else {},
        failures=results["export"].failures if results.get("export") else {},
    )


def tracked_files(recipe: Recipe, runs_dir: Path) -> list[Path]:
    """What a tracking backend attaches to the chain's summary: summary.json, the report, the export's records."""
    run_dir = runs_dir / recipe.name
    return [run_dir / layout.SUMMARY, run_dir / layout.REPORT,
            *layout.export_files(layout.export_dir(recipe.export.dir, recipe.name))]


def announce(recipe: Recipe, stages: list[str], ctx: ChainContext, plan_shown: bool = False) -> None:
    """Say what the chain will do (unless the caller said it already: the CLI prints the plan before torch is
    imported) and, when it trains for long enough to be worth measuring, how long its training should take here
    (not under torchrun: an estimate needs the machine to itself)."""
    notes = [*([] if plan_shown else [describe_plan(recipe, stages)]), *filter(None, [describe_data(recipe.data)])]
    pending = [stage for stage in stages  # an "auto" student is not known yet: the teacher's alone
               if stage in STAGES and not stage_is_finished(recipe, stage, ctx.runs_dir)
               and (stage == "teacher" or recipe.student.model != AUTO)]
    if pending and not torch.distributed.is_initialized():
        estimate = estimate_training(recipe, pending, ctx.device)
        if estimate is not None:
            notes.append(estimate.line())
    for message in notes:
        notify(ctx.consumers, message)


def resolve_student(recipe: Recipe, ctx: ChainContext) -> Recipe:
    """The recipe with `[student] model = "auto"` replaced by the search's choice (`kdforge.students`): the one
    recorded in runs/<name>/students/students.json when nothing it depends on changed, else a new search (the
    teacher is finished by now: the race distils from it). The search's format joins the export, so the chain
    ends by checking the budget on its own file."""
    from kdforge.students import earlier_choice, no_fit_message, search_students, with_search_format

    if torch.distributed.is_initialized():
        raise RecipeError('[student] model = "auto" is resolved on one process: run `kdforge students RECIPE '
                          '--write-recipe PATH` first, then distil the written recipe with --nproc')
    search = recipe.student.search
    found = earlier_choice(recipe, search, ctx.runs_dir)
    if found is None:
        notify(ctx.consumers, f"student: searching the candidates for {search.format} within {search.budget_ms:g} ms "
                              f"(p50, batch {search.batch})")
        found = search_students(recipe, search, ctx.runs_dir, device=ctx.device, consumers=ctx.consumers)
    if found.winner is None:
        raise RecipeError(no_fit_message(found))
    winner = found.winner
    raced = f", validation top-1 {winner['val_top1']:.2%} in the race" if winner.get("val_top1") is not None else ""
    size = winner.get("input_size", found.input_size)
    notify(ctx.consumers, f"student: {winner['model']} at {size}x{size} "
                          f"({'chosen earlier, reused' if found.reused else 'chosen'}: "
                          f"p50 {winner['latency_p50_ms']:.2f} ms within {search.budget_ms:g} ms{raced}; "
                          f"{ctx.runs_dir / recipe.name / layout.STUDENTS / layout.STUDENTS_RECORD})")
    resolved, added = with_search_format(found.resolved(recipe))
    if added:
        notify(ctx.consumers, f"export: {search.format} added, the format the student was chosen for (its budget is "
                              f"checked on the chain's own file)")
    return resolved


def write_summary(path: Path, summary: DistillSummary) -> None:
    """summary.json, unless it says the same already but for this command's wall time and reused stages: a chain
    run again that reused every stage keeps the summary of the run that did the work (and writes nothing, so a
    finished run can be run again on a read-only folder)."""
    earlier, now = read_json(path), json.loads(json.dumps(asdict(summary)))
    this_command = {"wall_s": None, "reused": None}
    if not earlier or {**earlier, **this_command} != {**now, **this_command}:
        write_json(path, now)


def run_distill(
    recipe: Recipe, runs_dir: str | Path = "runs", resume: bool = False, device: str | None = None,
    consumers: list[Consumer] | None = None, plan_shown: bool = False,
) -> DistillSummary:
    """Run the recipe's stages. Under torchrun every process trains (each its share of every batch); only
    rank 0 exports, writes summary.json and the report, and its summary is the one to print. `plan_shown`: the
    caller printed `describe_plan` already."""
    # what can be checked for the whole chain is checked before its first stage: a machine without the device,
    # or a file where the runs or exports folder goes, fails here and not after hours of training
    stages = plan_stages(recipe)
    check_can_create(Path(runs_dir) / recipe.name, "run folder")
    if "export" in stages:
        check_can_create(Path(recipe.export.dir) / recipe.name, "export folder")
    resolve_device(device or recipe.runtime.device)
    check_tracking(recipe.tracking)
    ctx = ChainContext(Path(runs_dir), resume, device)
    if consumers is not None:
        ctx.consumers = consumers
    main = current_rank() == 0
    started = time.perf_counter()

    # one kdforge process at a time on a run, from its first stage to its summary (rank 0 holds it for all ranks)
    with folder_lock(ctx.runs_dir / recipe.name, "run") if main else contextlib.nullcontext():
        if main:
            announce(recipe, stages, ctx, plan_shown)
        results = {}
        for stage in stages:
            if stage == "export" and not main:
                continue
            if stage in ("baseline", "student") and recipe.student.model == AUTO:  # the teacher is trained now
                recipe = resolve_student(recipe, ctx)
            results[stage] = STAGE_RUNNERS[stage](recipe, ctx)
            if getattr(results[stage], "skipped", False) and not getattr(results[stage], "adopted_from", None) \
                    and main:  # (train_stage says where it adopted from)
                notify(ctx.consumers, f"{stage}: finished earlier with these settings, reused")
        summary = replace(summarize(recipe, results), wall_s=round(time.perf_counter() - started, 1),
                          machine=machine())
        if main and recipe.student.search is not None and results.get("export") is not None \
                and recipe.student.search.format in results["export"].artifacts:
            from kdforge.students import check_budget, describe_budget

            summary = replace(summary, budget=check_budget(recipe.student.search, results["export"].export_dir,
                                                           ctx.runs_dir / recipe.name))
            notify(ctx.consumers, describe_budget(summary.budget))
        if main:  # written also when an export failed verification: the finished stages and the failure are in it
            summary = replace(summary, report=str(write_report(ctx.runs_dir / recipe.name).markdown))
            write_summary(ctx.runs_dir / recipe.name / layout.SUMMARY, summary)
            if recipe.tracking.backends:
                track_summary(recipe, ctx.runs_dir, asdict(summary), tracked_files(recipe, ctx.runs_dir))
    sync()
    return summary

