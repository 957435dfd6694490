"""Distillation methods against Hinton KD over seeds: validation and test top-1 of the distilled student.

For each seed the recipe's teacher is trained once (the first seed's, shared by the later seeds and by every method,
as `kdforge distill --seeds` shares it) and one student is distilled per method from the same initial weights; each
method's difference to KD is paired per seed, with the seeds machinery's t interval. The choice between methods is
read on the validation split (the best epoch's top-1, what chose the checkpoint); the test split only reports.

    .venv/bin/python benchmarks/distill_methods.py        # quickstart, 6 methods, 3 seeds (~15 min on 2 cores)
    .venv/bin/python benchmarks/distill_methods.py --methods kd dist --seeds 0 --set student.train.epochs=2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kdforge.layout import seed_run_name, stage_dir
from kdforge.pipeline import run_distill
from kdforge.recipe import load_recipe
from kdforge.runtime import describe_machine, machine
from kdforge.seeds import gain_interval, mean_sd, seed_recipe
from kdforge.train.events import ProgressDisplay

RECIPES = Path(__file__).parents[1] / "recipes"
VARIANTS = {  # name -> [distill] settings on top of the recipe's (its temperature unless given)
    "kd": ["distill.method=kd"],
    "kd+ls": ["distill.method=kd", "distill.logit_standardization=true", "distill.temperature=2.0"],
    "dist": ["distill.method=dist"],
    "dkd": ["distill.method=dkd"],
    "dkd+ls": ["distill.method=dkd", "distill.logit_standardization=true", "distill.temperature=2.0"],
    "ofa": ["distill.method=ofa"],
    "fitnet": ["distill.method=fitnet"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart", help="a name in recipes/ or a recipe file")
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", default="runs", help="runs folder (finished stages are reused)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe overrides for all")
    args = parser.parse_args()

    path = Path(args.recipe) if args.recipe.endswith(".toml") else RECIPES / f"{args.recipe}.toml"
    base = load_recipe(path, [*args.overrides, "distill.baseline=false", "export.formats=[]",
                              "quantize.enabled=false"])
    runs = Path(args.runs)
    top1: dict[str, dict[int, tuple[float, float]]] = {method: {} for method in args.methods}  # (val, test) in %
    for seed in args.seeds:
        for method in args.methods:
            recipe = load_recipe(path, [*args.overrides, *VARIANTS[method], "distill.baseline=false",
                                        "export.formats=[]", "quantize.enabled=false",
                                        f"name={base.name}-{method.replace('+', '-')}"])
            first = stage_dir(runs, seed_run_name(f"{base.name}-{args.methods[0].replace('+', '-')}", args.seeds[0]),
                              "teacher")
            shared = None if (seed, method) == (args.seeds[0], args.methods[0]) else first
            print(f"== seed {seed}, {method}", flush=True)
            summary = run_distill(seed_recipe(recipe, seed, shared), runs, consumers=[ProgressDisplay()])
            student = summary.student
            result = Path(student["stage_dir"]) / "result.json"
            best = json.loads(result.read_text()).get("best_top1")
            top1[method][seed] = (100 * best if best is not None else float("nan"), 100 * student["top1"])

    print(f"\n{base.name}: student {base.model_for('student').model} from teacher {base.model_for('teacher').model}, "
          f"{len(args.seeds)} seeds, on {describe_machine(machine())}")
    print("| method | validation top-1 (best epoch) | test top-1 | test vs kd (points, paired) | 95% CI |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        val = mean_sd([top1[method][s][0] for s in args.seeds])
        test = mean_sd([top1[method][s][1] for s in args.seeds])
        row = f"| {method} | {val[0]:.2f} +- {val[1]:.2f} | {test[0]:.2f} +- {test[1]:.2f} |"
        if method != "kd" and "kd" in top1:
            diff = gain_interval([top1[method][s][1] - top1["kd"][s][1] for s in args.seeds])
            val_diff = mean_sd([top1[method][s][0] - top1["kd"][s][0] for s in args.seeds])
            ci = f"[{diff['ci'][0]:+.2f}, {diff['ci'][1]:+.2f}]" if diff["ci"] else "-"
            row += f" {diff['mean']:+.2f} +- {diff['sd']:.2f} (validation {val_diff[0]:+.2f}) | {ci} |"
        else:
            row += " - | - |"
        print(row)


if __name__ == "__main__":
    main()
