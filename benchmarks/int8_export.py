"""INT8 export + verification at the reference size (224x224): how long each phase takes.

Trains the reference student baselines (resnet18_baseline, mobilevit_s_baseline) for 2 steps on synthetic data
(random init: the timing does not depend on accuracy), then runs `kdforge export --format onnx --format int8`
through the library with its phase lines, and prints the time of each phase and of the whole export.

    .venv/bin/python benchmarks/int8_export.py                      # both students, 2 threads
    .venv/bin/python benchmarks/int8_export.py --recipes resnet18_baseline --threads 8
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import tempfile
import time
from pathlib import Path

RECIPES = Path(__file__).parents[1] / "recipes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["resnet18_baseline", "mobilevit_s_baseline"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", type=int, default=2000, help="synthetic training images (calibration source)")
    parser.add_argument("--test", type=int, default=2000, help="synthetic test images (verification)")
    parser.add_argument("--max-top1-drop", type=float, default=None, help="accuracy-aware mode")
    args = parser.parse_args()

    import torch

    from kdforge.data.synthetic import write_synthetic
    from kdforge.export.artifacts import export_run
    from kdforge.recipe import load_recipe
    from kdforge.train.stages import train_stage

    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        write_synthetic(root, train=args.train, test=args.test, seed=0)
        rows = []
        for name in args.recipes:
            recipe = load_recipe(RECIPES / f"{name}.toml", [
                "data.dataset=synthetic", f"data.root={root}", f"data.synthetic.train={args.train}",
                f"data.synthetic.test={args.test}", "student.pretrained=false", "train.max_steps=2",
                "train.batch_size=2", "train.limit_eval_batches=1", "runtime.device=cpu",
                f"runtime.threads={args.threads}", f"export.dir={tmp}/exports",
            ])
            stage = train_stage(recipe, "baseline", runs_dir=Path(tmp) / "runs", consumers=[])
            quantize = {"max_top1_drop": args.max_top1_drop}
            kwargs = {}
            if "progress" in inspect.signature(export_run).parameters:
                kwargs["progress"] = lambda line, name=name: print(f"  {name}: {line}", flush=True)
            started = time.perf_counter()
            try:
                result = export_run(Path(stage.stage_dir), ["onnx", "int8"], quantize=quantize, **kwargs)
                passed = {fmt: r.passed for fmt, r in result.reports.items()}
                phases = getattr(result, "phases", {})
            except Exception as exc:  # a failed verification still has a time
                passed, phases = {"error": str(exc)[:120]}, {}
            total = time.perf_counter() - started
            rows.append((name, total, phases, passed))
            print(f"{name}: export + verification {total:.1f} s; {passed}", flush=True)
    print("\n| student | phase | seconds |\n|---|---|---|")
    for name, total, phases, _ in rows:
        for phase, seconds in phases.items():
            print(f"| {name} | {phase} | {seconds:.1f} |")
        print(f"| {name} | **whole export + verification** | {total:.1f} |")


if __name__ == "__main__":
    main()
