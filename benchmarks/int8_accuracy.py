"""INT8 accuracy: the ONNX INT8 file made five ways, each verified against the FP32 student.

For each recipe and seed, the distilled student is trained (or reused: runs/<recipe>-seed<s>/, the teacher of the
first seed shared, as `kdforge distill --seeds` does), then exported to INT8 once per method through `export_run`
with escalation off, the order the escalation tries them in:
- ptq: ONNX Runtime's post-training quantization (`[quantize] mode = "ptq"`);
- bias_correction: NNCF's PTQ with fast bias correction (`"bias_correction"`, no training);
- accuracy_aware: ONNX Runtime's PTQ keeping the most sensitive layers in float until the measured drop is at most
  half the INT8 tolerance (`max_top1_drop`, as the escalation sets it);
- qad: quantization-aware distillation with the ranges fixed where calibration put them (`"qad"`,
  `qad_scales = "calibrated"`);
- qad_learned: QAD with the ranges learned too (`qad_scales = "learned"`, LSQ; the default).
Each INT8 file is verified on the test split against the FP32 PyTorch student; the table prints the FP32 top-1,
each method's top-1 change and agreement (share of test images with the same answer) and the wall time of making
the file (QAD: its training included; verification included for all).

    .venv/bin/python benchmarks/int8_accuracy.py                                  # quickstart + quickstart_vit, 3 seeds
    .venv/bin/python benchmarks/int8_accuracy.py --recipes quickstart --seeds 0 --set quantize.qad_epochs=2
    .venv/bin/python benchmarks/int8_accuracy.py --recipes quickstart --methods ptq qad qad_learned
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kdforge.export.artifacts import export_run
from kdforge.recipe import load_recipe
from kdforge.runtime import describe_machine, machine
from kdforge.seeds import mean_sd, seed_recipe
from kdforge.train.events import ProgressDisplay
from kdforge.train.stages import train_stage

RECIPES = Path(__file__).parents[1] / "recipes"
METHODS = ("ptq", "bias_correction", "accuracy_aware", "qad", "qad_learned")


def method_settings(method: str, int8_tolerance: float) -> dict:
    """The [quantize] settings that make one method's file, escalation off."""
    settings = {"ptq": {"mode": "ptq"}, "bias_correction": {"mode": "bias_correction"},
                "accuracy_aware": {"mode": "ptq", "max_top1_drop": int8_tolerance / 2},
                "qad": {"mode": "qad", "qad_scales": "calibrated"},
                "qad_learned": {"mode": "qad", "qad_scales": "learned"}}[method]
    return {**settings, "escalate": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["quickstart", "quickstart_vit"],
                        help="names in recipes/ or paths to recipe files")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", default="runs", help="runs folder (finished students are reused)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="recipe overrides for every method, e.g. quantize.qad_epochs=2")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args()
    methods = args.methods

    rows = []
    with tempfile.TemporaryDirectory(prefix="kdforge-int8-accuracy-") as tmp:
        for name in args.recipes:
            recipe = load_recipe(name if name.endswith(".toml") else RECIPES / f"{name}.toml", args.overrides)
            first = args.seeds[0]
            for seed in args.seeds:
                shared = Path(args.runs) / f"{recipe.name}-seed{first}" / "teacher" if seed != first else None
                run = seed_recipe(recipe, seed, shared)
                if shared is None:
                    train_stage(run, "teacher", args.runs, retrain_stale=True)
                student = train_stage(run, "student", args.runs, retrain_stale=True)
                row = {"recipe": name, "seed": seed, "fp32": student.top1 * 100}
                for method in methods:
                    started = time.perf_counter()
                    result = export_run(Path(student.stage_dir), formats=["int8"], recipe=run,
                                        consumers=[ProgressDisplay()], exports_dir=Path(tmp) / f"{method}-{seed}",
                                        quantize=method_settings(method, run.verify.int8.max_top1_delta))
                    report = result.reports["int8"]
                    row[method] = (report.top1_delta_points, report.agreement * 100, time.perf_counter() - started)
                rows.append(row)
                print(f"{name} seed {seed}: FP32 {row['fp32']:.2f}%  " + "  ".join(
                    f"{m} {row[m][0]:+.2f} pts ({row[m][1]:.1f}% agree, {row[m][2]:.0f} s)" for m in methods),
                    flush=True)

    print(f"\n{describe_machine(machine())}\n")
    print("| recipe | seed | FP32 top-1 | " + " | ".join(f"{m} top-1 change | {m} agreement | {m} time"
                                                       for m in methods) + " |")
    print("|---|---|---|" + "---|---|---|" * len(methods))
    for row in rows:
        print(f"| {row['recipe']} | {row['seed']} | {row['fp32']:.2f}% | " + " | ".join(
            f"{row[m][0]:+.2f} | {row[m][1]:.1f}% | {row[m][2]:.0f} s" for m in methods) + " |")
    for name in args.recipes:
        mine = [row for row in rows if row["recipe"] == name]
        cells = []
        for m in methods:
            delta, agree, seconds = (mean_sd([row[m][i] for row in mine]) for i in range(3))
            cells.append(f"{delta[0]:+.2f} +- {delta[1]:.2f} | {agree[0]:.1f}% | {seconds[0]:.0f} s")
        print(f"| {name} mean +- sd | {len(mine)} seeds | | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
