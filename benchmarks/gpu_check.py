"""GPU acceptance check: the five reference recipes at 224x224 on one GPU, end to end, in a few minutes.

For each reference distillation recipe (synthetic data in CIFAR-100's format, random initialisation, no network):
teacher, baseline and distilled student for a bounded number of steps with evaluation; the student's ONNX, FP16
and INT8 exports verified against the PyTorch student (true FP32 on the GPU: TF32 off); TensorRT engines when
TensorRT imports; then `pytest -m gpu` when TensorRT imports. Prints one table and writes gpu_check.json: per
recipe and stage images/s and peak GPU memory (torch.cuda.max_memory_allocated), verification results,
pass/fail, versions; and per recipe's pair, each distillation method's training images/s and peak memory
(`--method-steps`, online teacher; informational, never fails the check).

    make gpu-check                                         # = python benchmarks/gpu_check.py (about 5 min, H100)
    python benchmarks/gpu_check.py --recipes vit_to_vit --steps 50
    python benchmarks/gpu_check.py --device cpu --tiny     # the smoke run the test suite does on CPU

Needs kdforge's own dependencies with the `export` extra. A bare CUDA image with PyTorch usually lacks pydantic,
tomli-w, typer/rich, onnx and onnxruntime: `pip install -e ".[export]"` (or carry their wheels) first.
Exit code 0 when every recipe and every verification passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["vit_to_vit", "vit_to_resnet", "vit_to_mobilevit", "resnet_to_vit", "resnet_to_resnet"]
# --tiny: the same chain with test-size models at 32x32 (a CPU smoke run of this script)
TINY = ["teacher.model=test_resnet", "teacher.input_size=32", "student.model=test_convnext",
        "student.input_size=32"]


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    found = {}
    for name in ("torch", "timm", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "kdforge"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


class StageMeter:
    """A training-event consumer: peak GPU memory per stage (reset at each stage's start)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.current, self.peak_gib = cuda, None, {}

    def __call__(self, event: dict) -> None:
        import torch

        if event["event"] == "start":
            self.current = event["title"].split()[0]
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
        elif event["event"] == "end" and self.current and self.cuda:
            self.peak_gib[self.current] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        elif event["event"] == "note":
            print(f"    {event['message']}", flush=True)


def check_recipe(name: str, args, work: Path, data_root: Path, formats: list[str]) -> dict:
    from kdforge.pipeline import run_distill
    from kdforge.recipe import load_recipe

    overrides = [
        "data.dataset=synthetic", f"data.root={data_root}", f"data.synthetic.train={args.train_images}",
        f"data.synthetic.test={args.test_images}", "teacher.pretrained=false", "student.pretrained=false",
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch}", f"teacher.train.batch_size={args.batch}",
        f"train.limit_eval_batches={args.eval_batches}", f"runtime.device={args.device}",
        f"export.formats={json.dumps(formats)}", f"export.dir={work / 'exports'}",
        f"verify.batch_size={args.verify_batch}", f"verify.limit_batches={args.verify_batches}",
        f"quantize.calibration={args.calibration}", "train.log_every=10",
        *(TINY if args.tiny else []),
    ]
    recipe = load_recipe(ROOT / "recipes" / f"{name}.toml", overrides)
    meter = StageMeter(args.device.startswith("cuda"))
    row: dict = {"recipe": name, "teacher": recipe.teacher.model, "student": recipe.student.model, "stages": {}}
    started = time.perf_counter()
    try:
        summary = run_distill(recipe, runs_dir=work / "runs", device=args.device, consumers=[meter])
        row["exports"] = summary.exports
        row["unavailable"] = summary.unavailable
        row["passed"] = all(e.get("passed", False) for e in summary.exports.values())
    except Exception as exc:  # one failing recipe must not hide the others' results
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["passed"] = False
        traceback.print_exc()
    for stage in ("teacher", "baseline", "student"):
        result = work / "runs" / name / stage / "result.json"
        if result.is_file():
            done = json.loads(result.read_text())
            row["stages"][stage] = {"model": done["model"], "images_per_s": done["train_images_per_s"],
                                    "top1": done["top1"], "peak_gib": meter.peak_gib.get(stage)}
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def method_throughput(name: str, args) -> dict:
    """Each distillation method's training images/s and peak memory on this recipe's pair at its input size
    (online: the teacher answers every step; random weights, bf16 + channels_last on a GPU; `--method-steps`
    steps after 2 of warm-up), from benchmarks/gpu_distill_throughput.py."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_distill_throughput import METHODS, method_rates

    from kdforge.data.dataset import ImageDataset
    from kdforge.data.transforms import augment_batch
    from kdforge.distill.teacher import FrozenTeacher
    from kdforge.models import create_model, resolve_input_spec
    from kdforge.recipe import RuntimeConfig, load_recipe
    from kdforge.runtime import runtime_scope

    recipe = load_recipe(ROOT / "recipes" / f"{name}.toml", [*(TINY if args.tiny else []), "teacher.pretrained=false",
                                                            "student.pretrained=false"])
    teacher_cfg, student_cfg = recipe.model_for("teacher"), recipe.model_for("student")
    with runtime_scope(RuntimeConfig(device=args.device, precision="bf16")) as runtime:
        images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=runtime.device)
        labels = torch.randint(0, 100, (args.batch,), device=runtime.device)
        train = ImageDataset(images, labels, tuple(map(str, range(100))))
        teacher_model = create_model(teacher_cfg, 100)
        teacher = FrozenTeacher(teacher_model, resolve_input_spec(teacher_cfg))
        teacher.to(runtime.device, runtime.uses_channels_last(teacher_model))

        def batch(i):
            return augment_batch(train.images, 4, True, torch.Generator().manual_seed(i)), None

        rates = method_rates(runtime, teacher, student_cfg, METHODS, batch, labels, args.method_steps, 2)
        del teacher, teacher_model
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()
    return rates


def tensorrt_tests() -> dict:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return {"ran": False, "why": "TensorRT is not installed here: engines and `pytest -m gpu` were skipped"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", str(ROOT / "tests")], cwd=ROOT)
    return {"ran": True, "exit_code": done.returncode}


def print_methods(methods: dict) -> None:
    """Training images/s (peak GPU GiB) per recipe and distillation method, and each against kd."""
    if not methods:
        return
    names = sorted({m for rates in methods.values() for m in rates if m != "error"})
    print("\n| recipe | " + " | ".join(f"{m} img/s (GiB)" for m in names) + " |")
    print("|---|" + "---|" * len(names))
    for recipe, rates in methods.items():
        if "error" in rates:
            print(f"| {recipe} | ERROR {rates['error']} |")
            continue
        kd = rates.get("kd", {}).get("images_per_s") or 1.0
        cells = [f"{rates[m]['images_per_s']:.0f} ({rates[m]['peak_gib']}) {rates[m]['images_per_s'] / kd:.2f}x"
                 for m in names]
        print(f"| {recipe} | " + " | ".join(cells) + " |")


def print_table(rows: list[dict]) -> None:
    print("\n| recipe | stage | model | images/s | peak GPU GiB | top-1 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for stage, s in row["stages"].items():
            print(f"| {row['recipe']} | {stage} | {s['model']} | {s['images_per_s']:.0f} | {s['peak_gib']} "
                  f"| {s['top1']:.2%} |")
    print("\n| recipe | format | PyTorch top-1 | exported top-1 | agreement | max abs logit diff | export s | result |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for fmt, e in row.get("exports", {}).items():
            if e.get("verified"):
                print(f"| {row['recipe']} | {fmt} | {e['pytorch_top1']:.2%} | {e['exported_top1']:.2%} "
                      f"| {e['agreement']:.2%} | {e['max_abs_diff']:.1e} | {e['export_s']:.1f} "
                      f"| {'PASS' if e['passed'] else 'FAIL'} |")
        for fmt, why in row.get("unavailable", {}).items():
            print(f"| {row['recipe']} | {fmt} | - | - | - | - | - | not built: {why} |")
        if "error" in row:
            print(f"| {row['recipe']} | - | - | - | - | - | - | ERROR {row['error']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--recipes", nargs="+", default=RECIPES, choices=RECIPES)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per training stage")
    parser.add_argument("--batch", type=int, default=64, help="training batch size (teacher and students)")
    parser.add_argument("--eval-batches", type=int, default=4, help="evaluation batches per stage")
    parser.add_argument("--verify-batch", type=int, default=128)
    parser.add_argument("--verify-batches", type=int, default=4, help="test batches each export is verified on")
    parser.add_argument("--calibration", type=int, default=256, help="INT8 calibration images")
    parser.add_argument("--train-images", type=int, default=2560)
    parser.add_argument("--test-images", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true", help="test-size models at 32x32 (a CPU smoke run)")
    parser.add_argument("--method-steps", type=int, default=10,
                        help="steps per distillation method in the method throughput table (0: skip it)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.train_images, args.test_images = min(args.batch, 50), 1000, 300
        args.verify_batch, args.calibration = min(args.verify_batch, 100), min(args.calibration, 64)
        args.method_steps = min(args.method_steps, 2)

    import torch

    from kdforge.data.synthetic import write_synthetic
    from kdforge.runners.tensorrt import tensorrt_missing

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"error: --device {args.device} but PyTorch sees no CUDA GPU here", file=sys.stderr)
        return 1
    missing = tensorrt_missing() if cuda else "not a GPU run"
    formats = ["onnx", "fp16", "int8"] + ([] if missing else ["trt_fp16", "trt_int8"])
    machine = {"platform": platform.platform(), "python": platform.python_version(), "versions": versions(),
               "gpu": torch.cuda.get_device_name() if cuda else None,
               "cuda": torch.version.cuda if cuda else None, "tensorrt": missing or "available"}
    found = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    print(f"gpu_check on {machine['gpu'] or args.device}: {found}")
    if missing:
        print(f"TensorRT: absent ({missing}); engines and `pytest -m gpu` are skipped")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdforge-gpu-check-") as tmp:
        work = Path(tmp)
        write_synthetic(work / "data", train=args.train_images, test=args.test_images, seed=0)
        rows = []
        for name in args.recipes:
            print(f"== {name}", flush=True)
            rows.append(check_recipe(name, args, work, work / "data", formats))
            print(f"== {name}: {'PASS' if rows[-1]['passed'] else 'FAIL'} in {rows[-1]['seconds']} s", flush=True)
            args.out.write_text(json.dumps({"partial": True, "machine": machine, "recipes": rows}, indent=2))
        methods = {}
        for name in args.recipes if args.method_steps else []:
            try:
                methods[name] = method_throughput(name, args)
            except Exception as exc:  # a method's failure is reported, not fatal to the acceptance check
                methods[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                traceback.print_exc()
    trt_tests = tensorrt_tests() if cuda else {"ran": False, "why": "not a GPU run"}
    passed = all(r["passed"] for r in rows) and trt_tests.get("exit_code", 0) == 0
    print_table(rows)
    print_methods(methods)
    print(f"\ntensorrt tests: {trt_tests}")
    result = {"passed": passed, "seconds": round(time.perf_counter() - started, 1), "machine": machine,
              "settings": {k: str(v) for k, v in vars(args).items()}, "recipes": rows, "tensorrt_tests": trt_tests,
              "methods": methods}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'PASS' if passed else 'FAIL'} in {result['seconds']} s -> {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
