"""Every CPU runtime on this CPU, FP32 and INT8, at the reference size (224x224), side by side: ONNX Runtime,
OpenVINO, ExecuTorch (XNNPACK), LiteRT and NCNN.

For each reference student (resnet18, mobilevit_s, vit_tiny baselines; 2 training steps from random init on
synthetic data, so the timings are real and the accuracies are not), exports onnx, int8 (ONNX Runtime, uint8
activations), openvino (FP16-stored weights, FP32 compute), openvino_int8 (NNCF), and, where installed, executorch,
executorch_int8 (PT2E), litert, litert_int8 (full-integer, PT2E) and ncnn (a format a model cannot be made in is
listed with the reason); verifies each
against the PyTorch student, then runs `kdforge bench` on the export: file size, latency p50 at batch 1 and
images/s at batch 32.

    .venv/bin/python benchmarks/openvino_vs_ort.py                   # all three, 2 threads
    .venv/bin/python benchmarks/openvino_vs_ort.py --recipes resnet18_baseline --threads 8
    .venv/bin/python benchmarks/openvino_vs_ort.py --formats litert litert_int8   # some formats only
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

RECIPES = Path(__file__).parents[1] / "recipes"
FORMATS = ["onnx", "int8", "openvino", "openvino_int8"]
# each exported on its own: a model one cannot take is a row
EDGE = ["executorch", "executorch_int8", "litert", "litert_int8", "ncnn"]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["resnet18_baseline", "mobilevit_s_baseline",
                                                         "vit_tiny_baseline"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--test", type=int, default=256, help="synthetic test images (verification)")
    parser.add_argument("--repeats", type=int, default=20, help="timed batch-1 calls per format")
    parser.add_argument("--formats", nargs="+", default=FORMATS + EDGE, choices=FORMATS + EDGE)
    args = parser.parse_args()

    import torch

    from kdforge.bench import BenchSettings, bench_export
    from kdforge.data.synthetic import write_synthetic
    from kdforge.errors import KdforgeError
    from kdforge.export.artifacts import export_run, unbuildable_here
    from kdforge.recipe import load_recipe
    from kdforge.train.stages import train_stage

    torch.set_num_threads(args.threads)
    flags = [f for f in ("avx512f", "avx512_vnni", "amx_int8") if f in Path("/proc/cpuinfo").read_text()]
    print(f"{cpu_model()} ({', '.join(flags) or 'no AVX-512/VNNI/AMX'}), {os.cpu_count()} CPUs, "
          f"{args.threads} threads, torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        write_synthetic(root, train=1000, test=args.test, seed=0)
        for name in args.recipes:
            recipe = load_recipe(RECIPES / f"{name}.toml", [
                "data.dataset=synthetic", f"data.root={root}", "data.synthetic.train=1000",
                f"data.synthetic.test={args.test}", "student.pretrained=false", "train.max_steps=2",
                "train.batch_size=2", "train.limit_eval_batches=1", "runtime.device=cpu",
                f"runtime.threads={args.threads}", f"export.dir={tmp}/exports", "quantize.calibration=256",
                "verify.batch_size=64",
            ])
            stage = train_stage(recipe, "baseline", runs_dir=Path(tmp) / "runs", consumers=[])
            say = [lambda event, name=name: event["event"] == "note" and print(f"  {name}: {event['message']}",
                                                                               flush=True)]
            base = [f for f in FORMATS if f in args.formats] or ["onnx"]  # an export folder needs one first format
            result = export_run(Path(stage.stage_dir), base, consumers=say)
            reports, made = dict(result.reports), [f for f in base if f in args.formats]
            for fmt in (f for f in EDGE if f in args.formats and f not in unbuildable_here([f])):
                try:
                    reports.update(export_run(Path(stage.stage_dir), [fmt], consumers=say).reports)
                    made.append(fmt)
                except KdforgeError as exc:
                    rows.append((recipe.student.model, fmt, f"not made: {str(exc)[:90]}", None, None, None, None,
                                 None, None))
            bench = bench_export(result.export_dir, BenchSettings(32, args.repeats, 3, args.threads, tuple(made)))
            for row in bench.rows:
                report = reports[row.format]
                rows.append((recipe.student.model, row.format, row.runtime, row.bytes / 1e6, row.latency_p50_ms,
                             row.throughput, report.top1_delta_points, report.agreement, report.passed))
                print(f"  {rows[-1]}", flush=True)
    print("\n| student | format | runtime | MB | batch-1 p50 ms | images/s at batch 32 | top-1 delta (points) | "
          "agreement | verification |\n|---|---|---|---|---|---|---|---|---|")
    for model, fmt, runtime, mb, p50, throughput, delta, agreement, passed in rows:
        if p50 is None:
            print(f"| {model} | {fmt} | {runtime} | - | - | - | - | - | - |")
            continue
        print(f"| {model} | {fmt} | {runtime} | {mb:.1f} | {p50:.2f} | {throughput:.0f} | {delta:+.2f} | "
              f"{agreement:.1%} | {'PASS' if passed else 'FAIL'} |")


if __name__ == "__main__":
    main()
