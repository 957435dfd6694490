"""The student search, measured: the candidate table at a size and format, and the chosen student against a recipe's
fixed student over seeds.

    # candidates at 224x224 / 100 classes on this CPU, one table per format (no race; ~25 min on 2 cores)
    .venv/bin/python benchmarks/student_search.py table --size 224 --formats onnx int8 openvino

    # quickstart: search under a budget (race on the validation split), then the chosen student and the recipe's
    # own student distilled over seeds 0 1 2 from the same teacher; validation and test top-1, latency, the search's
    # cost against one distillation
    .venv/bin/python benchmarks/student_search.py compare --budget-ms 0.5

    # the size axis: one search over sizes 24 and 32 and one per size, same budget; each choice distilled over seeds
    .venv/bin/python benchmarks/student_search.py sizes --sizes 24 32 --budget-ms 0.3

`compare` reuses the fixed student's runs of benchmarks/distill_methods.py (runs/quickstart-kd-seedS) when they are
there, and every finished stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kdforge.data import load_dataset
from kdforge.layout import seed_run_name, stage_dir
from kdforge.pipeline import run_distill
from kdforge.recipe import load_recipe
from kdforge.runtime import describe_machine, machine
from kdforge.seeds import gain_interval, mean_sd, seed_recipe
from kdforge.students import choose_student, search_settings
from kdforge.train.events import ProgressDisplay

RECIPES = Path(__file__).parents[1] / "recipes"


def table(args: argparse.Namespace) -> None:
    recipe = load_recipe(RECIPES / f"{args.recipe}.toml", [f"student.input_size={args.size}",
                                                            f"teacher.input_size={args.size}", *args.overrides])
    results = {}
    for fmt in args.formats:
        settings = search_settings(recipe, format=fmt, budget_ms=1e9, threads=args.threads,
                                   candidates=args.candidates or None)
        results[fmt] = choose_student(recipe, settings, Path(args.runs), race_on=False, consumers=[])
    first = results[args.formats[0]]
    classes = load_dataset(recipe.data, recipe.seed).num_classes
    print(f"\ncandidates at {args.size}x{args.size}, {classes} classes, batch 1, "
          f"{args.threads} threads, on {describe_machine(machine())}")
    header = "| model | params (M) | MMACs | " + " | ".join(f"{fmt} MB | {fmt} p50 ms" for fmt in args.formats) + " |"
    print(header)
    print("|---|---|---|" + "---|---|" * len(args.formats))
    rows = {fmt: {row["model"]: row for row in result.rows} for fmt, result in results.items()}
    order = [row["model"] for row in first.rows]
    for model in order:
        base = rows[args.formats[0]][model]
        cells = [f"{rows[fmt][model]['bytes'] / 1e6:.1f} | {rows[fmt][model]['latency_p50_ms']:.2f}"
                 if model in rows[fmt] else "- | -" for fmt in args.formats]
        print(f"| {model} | {base['params'] / 1e6:.2f} | {base['macs'] / 1e6:.0f} | " + " | ".join(cells) + " |")
    for fmt, result in results.items():
        for model, why in result.skipped.items():
            print(f"{fmt}: {model} skipped: {why}")
        print(f"{fmt}: search took {result.wall_s:.0f} s")


def compare(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    recipe = load_recipe(RECIPES / f"{args.recipe}.toml", args.overrides)
    settings = search_settings(recipe, format=args.format, budget_ms=args.budget_ms, threads=args.threads,
                               candidates=args.candidates or None)
    search = choose_student(recipe, settings, runs, race_on=True)
    chosen = search.resolved(recipe)
    latency = {row["model"]: row["latency_p50_ms"] for row in search.rows}
    race_s = sum(sum(entry["wall_s"].values()) for entry in search.race)
    print(f"search: {search.wall_s:.0f} s (race {race_s:.0f} s), chose {search.winner['model']}", flush=True)

    variants = {"fixed": (recipe, f"{recipe.name}-kd"), "chosen": (chosen, f"{recipe.name}-chosen")}
    top1: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in variants}
    student_s: dict[str, list[float]] = {name: [] for name in variants}
    teacher = stage_dir(runs, seed_run_name(f"{recipe.name}-kd", args.seeds[0]), "teacher")
    for seed in args.seeds:
        for name, (base, run_name) in variants.items():
            variant = base.model_copy(update={
                "name": run_name, "distill": base.distill.model_copy(update={"baseline": False}),
                "export": base.export.model_copy(update={"formats": []}),
                "quantize": base.quantize.model_copy(update={"enabled": False})})
            print(f"== seed {seed}, {name} student {variant.student.model}", flush=True)
            shared = None if (seed, name) == (args.seeds[0], "fixed") else teacher
            summary = run_distill(seed_recipe(variant, seed, shared), runs, consumers=[ProgressDisplay()])
            result = json.loads((Path(summary.student["stage_dir"]) / "result.json").read_text())
            top1[name][seed] = (100 * result["best_top1"], 100 * result["top1"])
            student_s[name].append(result["wall_s"])

    print(f"\n{recipe.name}: budget {args.budget_ms:g} ms p50 on {args.format} (batch 1, {args.threads} threads), "
          f"{len(args.seeds)} seeds, on {describe_machine(machine())}")
    print("| student | p50 ms | params (M) | validation top-1 | test top-1 | test vs fixed (points, paired) | 95% CI |")
    print("|---|---|---|---|---|---|---|")
    params = {row["model"]: row["params"] for row in search.rows}
    for name, (base, _) in variants.items():
        model = base.student.model
        val = mean_sd([top1[name][s][0] for s in args.seeds])
        test = mean_sd([top1[name][s][1] for s in args.seeds])
        row = (f"| {name}: {model} | {latency.get(model, float('nan')):.2f} | {params.get(model, 0) / 1e6:.2f} | "
               f"{val[0]:.2f} +- {val[1]:.2f} | {test[0]:.2f} +- {test[1]:.2f} |")
        if name == "chosen":
            diff = gain_interval([top1["chosen"][s][1] - top1["fixed"][s][1] for s in args.seeds])
            ci = f"[{diff['ci'][0]:+.2f}, {diff['ci'][1]:+.2f}]" if diff["ci"] else "-"
            row += f" {diff['mean']:+.2f} +- {diff['sd']:.2f} | {ci} |"
        else:
            row += " - | - |"
        print(row)
    per_seed = {name: sum(times) / len(times) for name, times in student_s.items() if times}
    fixed_s, chosen_s = per_seed.get("fixed", float("nan")), per_seed.get("chosen", float("nan"))
    print(f"search {search.wall_s:.0f} s (of it the race {race_s:.0f} s) against one distillation of the fixed student "
          f"{fixed_s:.0f} s and of the chosen one {chosen_s:.0f} s (student stage wall time, mean over seeds; reused "
          f"stages report their original time)")
    for entry in search.race:
        print(f"race round {entry['round']} ({entry['steps']} steps): " + ", ".join(
            f"{model} {top1 * 100:.1f}%" for model, top1 in sorted(entry["val_top1"].items(), key=lambda kv: -kv[1])))


def sizes(args: argparse.Namespace) -> None:
    """The size axis, measured: one search over every size in --sizes and one search per single size, all under
    the same budget, then each distinct choice distilled over the seeds from the same teacher; the sized choice's
    test top-1 against each single-size choice's, paired by seed."""
    runs = Path(args.runs)
    recipe = load_recipe(RECIPES / f"{args.recipe}.toml", args.overrides)
    searches = {"sized": list(args.sizes), **{f"{size} only": [size] for size in args.sizes}}
    chosen: dict[str, tuple[str, int, float]] = {}  # search -> (model, size, p50 ms)
    chosen_recipes = {}
    for label, search_sizes in searches.items():
        settings = search_settings(recipe, format=args.format, budget_ms=args.budget_ms, threads=args.threads,
                                   candidates=args.candidates or None, sizes=search_sizes)
        search = choose_student(recipe, settings, runs, race_on=True)
        if search.winner is None:
            print(f"{label}: no candidate fits {args.budget_ms:g} ms")
            continue
        chosen[label] = (search.winner["model"], search.winner["input_size"], search.winner["latency_p50_ms"])
        print(f"{label} ({search.wall_s:.0f} s): chose {search.winner['model']}@{search.winner['input_size']} "
              f"({search.winner['latency_p50_ms']:.3f} ms)", flush=True)
        chosen_recipes[label] = search.resolved(recipe)
    students = {(model, size): chosen_recipes[label] for label, (model, size, _) in chosen.items()}
    teacher = stage_dir(runs, recipe.name, "teacher")  # the searches' teacher: every student learns from it
    top1: dict[tuple[str, int], dict[int, float]] = {key: {} for key in students}
    for seed in args.seeds:
        for (model, size), base in students.items():
            variant = base.model_copy(update={
                "name": f"{recipe.name}-{model}-{size}",
                "distill": base.distill.model_copy(update={"baseline": False}),
                "export": base.export.model_copy(update={"formats": []}),
                "quantize": base.quantize.model_copy(update={"enabled": False})})
            print(f"== seed {seed}, {model}@{size}", flush=True)
            summary = run_distill(seed_recipe(variant, seed, teacher), runs, consumers=[ProgressDisplay()])
            result = json.loads((Path(summary.student["stage_dir"]) / "result.json").read_text())
            top1[(model, size)][seed] = 100 * result["top1"]

    print(f"\n{recipe.name}: budget {args.budget_ms:g} ms p50 on {args.format} (batch 1, {args.threads} threads), "
          f"sizes {args.sizes}, {len(args.seeds)} seeds, on {describe_machine(machine())}")
    print("| search | chosen | p50 ms | test top-1 | sized choice vs this (points, paired) | 95% CI |")
    print("|---|---|---|---|---|---|")
    sized = chosen.get("sized")
    for label, (model, size, latency) in chosen.items():
        test = mean_sd([top1[(model, size)][s] for s in args.seeds])
        row = f"| {label} | {model}@{size} | {latency:.3f} | {test[0]:.2f} +- {test[1]:.2f} |"
        if sized and label != "sized":
            diff = gain_interval([top1[sized[:2]][s] - top1[(model, size)][s] for s in args.seeds])
            ci = f"[{diff['ci'][0]:+.2f}, {diff['ci'][1]:+.2f}]" if diff["ci"] else "-"
            row += f" {diff['mean']:+.2f} +- {diff['sd']:.2f} | {ci} |"
        else:
            row += " - | - |"
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["table", "compare", "sizes"])
    parser.add_argument("--recipe", default="quickstart", help="a name in recipes/")
    parser.add_argument("--size", type=int, default=224, help="table: the input size of every candidate")
    parser.add_argument("--formats", nargs="+", default=["onnx", "int8", "openvino"], help="table: formats")
    parser.add_argument("--format", default="onnx", help="compare: the format searched")
    parser.add_argument("--budget-ms", type=float, default=0.5, help="compare: the latency budget")
    parser.add_argument("--sizes", nargs="+", type=int, default=[24, 32], help="sizes: the input sizes searched")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--candidates", nargs="*", default=[], help="default: the curated list")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe overrides")
    args = parser.parse_args()
    {"table": table, "compare": compare, "sizes": sizes}[args.mode](args)


if __name__ == "__main__":
    main()
