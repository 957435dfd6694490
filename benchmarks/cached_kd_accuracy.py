"""Accuracy of distillation from the teacher output cache vs online distillation, over several seeds.

    .venv/bin/python benchmarks/cached_kd_accuracy.py                   # quickstart recipe, seeds 0 1 2, 4 views
    .venv/bin/python benchmarks/cached_kd_accuracy.py --seeds 0 --views 1 --set data.augment.hflip=false

For each seed the same trained teacher (`runs/bench_kdcache_seedS/teacher`, trained here once with the recipe)
teaches the same student twice: online (the teacher answers every step) and from the cache
([distill.teacher_cache] views = K). Prints both test top-1s per seed, their mean and the difference, and the
student training throughput of each. About 15 minutes on a 2-core CPU with three seeds (teachers included).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from kdforge.pipeline import run_distill
from kdforge.recipe import load_recipe
from kdforge.train.stages import train_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="extra recipe overrides")
    args = parser.parse_args()
    runs = Path(args.runs_dir)
    rows = []
    for seed in args.seeds:
        base = [f"seed={seed}", "distill.baseline=false", "export.formats=[]", "quantize.enabled=false",
                *args.overrides]
        teacher_recipe = load_recipe(args.recipe, [*base, f"name=bench_kdcache_seed{seed}"])
        train_stage(teacher_recipe, "teacher", runs_dir=runs, resume=True, retrain_stale=True, consumers=[])
        teacher = f"teacher.checkpoint={runs / teacher_recipe.name / 'teacher'}"
        result = {"seed": seed}
        for mode, extra in (("online", []), ("cached", [f"distill.teacher_cache.views={args.views}"])):
            recipe = load_recipe(args.recipe, [*base, teacher, *extra, f"name=bench_kdcache_seed{seed}_{mode}"])
            summary = run_distill(recipe, runs_dir=runs, consumers=[])
            student = load_recipe(Path(summary.student["stage_dir"]) / "recipe.toml")
            assert student.distill.teacher_cache.views == (args.views if mode == "cached" else 0)
            result[mode] = summary.student["top1"] * 100
            result[f"{mode}_img_s"] = _throughput(Path(summary.student["stage_dir"]))
        result["teacher"] = summary.teacher["top1"] * 100
        rows.append(result)
        difference = result["cached"] - result["online"]
        print(f"seed {seed}: teacher {result['teacher']:.2f}  online KD {result['online']:.2f}  "
              f"cached KD ({args.views} views) {result['cached']:.2f}  difference {difference:+.2f}"
              f"  (student training {result['online_img_s']:.0f} vs {result['cached_img_s']:.0f} img/s)", flush=True)
    online = [r["online"] for r in rows]
    cached = [r["cached"] for r in rows]
    spread = f" (sd {statistics.stdev(online):.2f} / {statistics.stdev(cached):.2f})" if len(rows) > 1 else ""
    print(f"mean over seeds {args.seeds}: online {statistics.mean(online):.2f}, cached {statistics.mean(cached):.2f}"
          f"{spread}, difference {statistics.mean(cached) - statistics.mean(online):+.2f} points")


def _throughput(stage_dir: Path) -> float:
    import json

    return json.loads((stage_dir / "result.json").read_text())["train_images_per_s"]


if __name__ == "__main__":
    main()
