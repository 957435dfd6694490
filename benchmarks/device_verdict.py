"""The verdict on a device, measured.

    # the quickstart's export bundled (1,000 test images) and judged by the probe on this machine; with --report,
    # each given device-report.json (e.g. from the arm64 serving image under qemu) tabled beside it
    .venv/bin/python benchmarks/device_verdict.py quickstart [--report arm64-report.json ...]

    # cold vs sustained latency and session memory at 224x224 (random initial weights), the probe over the
    # candidates' exports as `kdforge students` leaves them (~1 min per file at --seconds 60)
    .venv/bin/python benchmarks/device_verdict.py sustained --models resnet18 mobilevit_s vit_tiny_patch16_224 \\
        --formats onnx int8 --seconds 60

Both print markdown tables (benchmarks/README.md holds the last ones, with the machine they come from).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def run_probe(target: Path, output: Path, *options: str) -> dict:
    subprocess.run([sys.executable, "-m", "kdforge.serve.probe", str(target), "--output", str(output), *options],
                   check=False, cwd=ROOT)
    return json.loads(output.read_text())


def quickstart(args: argparse.Namespace) -> None:
    from kdforge.bundle import make_bundle

    result = make_bundle(args.export, Path(args.out), images=args.images)
    print(f"bundle: {result.images} images, {', '.join(result.formats)}: {result.bytes / 1e6:.1f} MB "
          f"({result.tar})")
    with tempfile.TemporaryDirectory() as tmp:
        host = run_probe(result.tar, Path(tmp) / "host.json", "--verify", "--seconds", str(args.seconds),
                         "--device-name", "host")
    reports = [host] + [json.loads(Path(path).read_text()) for path in args.report]
    print("\n| device | format | runtime | top-1 | agreement with PyTorch | top-1 changed vs host run | "
          "max abs logit diff vs host run | verdict |\n|---|---|---|---|---|---|---|---|")
    for report in reports:
        where = f"{report['device']['cpu']} ({report['device']['arch']})"
        for row in report["rows"]:
            if "verdict" not in row:
                print(f"| {where} | {row['format']} | - | - | - | - | - | FAILED: {'; '.join(row['failures'])} |")
                continue
            print(f"| {where} | {row['format']} | {row['runtime']} | {row['verdict']['candidate_top1']:.2%} | "
                  f"{row['verdict']['agreement']:.2%} | {row['host']['top1_changed']} | "
                  f"{row['host']['max_abs_diff']:.1e} | {'PASS' if row['passed'] else 'FAILED'} |")


def sustained(args: argparse.Namespace) -> None:
    from kdforge.recipe import load_recipe
    from kdforge.students import choose_student, search_settings

    recipe = load_recipe(ROOT / "recipes" / "quickstart.toml", [f"student.input_size={args.size}",
                                                                f"teacher.input_size={args.size}"])
    for fmt in args.formats:  # each candidate exported to each format (reused when exported before)
        settings = search_settings(recipe, format=fmt, budget_ms=1e9, threads=args.threads, candidates=args.models)
        choose_student(recipe, settings, Path("runs"), race_on=False)
    exports = Path("runs") / recipe.name / "students" / "exports"
    folders = [exports / f"{model}-{args.size}" for model in args.models]
    print("\n| model | format | p50 cold ms | p50 first window | p50 last window | p95 last window | "
          "session memory MB |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for folder in folders:
            profile = run_probe(folder, Path(tmp) / "latency.json", "--seconds", str(args.seconds), "--threads",
                                str(args.threads))
            for row in profile["rows"]:
                if row["format"] not in args.formats:
                    continue
                first, last = row["windows"][0], row["windows"][-1]
                print(f"| {row['model']} | {row['format']} | {row['latency_p50_ms']:.2f} | {first['p50_ms']:.2f} | "
                      f"{last['p50_ms']:.2f} | {last['p95_ms']:.2f} | {row['memory_mb']:.0f} |", flush=True)
    print(f"\nmeasured on {profile['machine']['cpu']} ({profile['machine']['arch']}), {args.threads} threads, "
          f"batch 1, {args.seconds:g} s per file in 6 windows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart")
    q.add_argument("--export", type=Path, default=Path("exports/quickstart"))
    q.add_argument("--out", default="bundles/quickstart")
    q.add_argument("--images", type=int, default=1000)
    q.add_argument("--seconds", type=float, default=5)
    q.add_argument("--report", nargs="*", default=[])
    q.set_defaults(run=quickstart)
    s = sub.add_parser("sustained")
    s.add_argument("--models", nargs="+", default=["resnet18", "mobilevit_s", "vit_tiny_patch16_224"])
    s.add_argument("--formats", nargs="+", default=["onnx", "int8"])
    s.add_argument("--size", type=int, default=224)
    s.add_argument("--seconds", type=float, default=60)
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(run=sustained)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
