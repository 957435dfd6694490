"""Distillation throughput on one GPU at 224x224: images/s of plain student training, online distillation and
distillation from the teacher output cache, bf16 autocast + channels_last (as kdforge's runtime decides on CUDA).

    .venv/bin/python benchmarks/gpu_distill_throughput.py                 # resnet152 -> resnet18, vit_base -> vit_tiny
    .venv/bin/python benchmarks/gpu_distill_throughput.py --batch 128 --steps 30
    .venv/bin/python benchmarks/gpu_distill_throughput.py --methods kd dist dkd ofa fitnet   # per method, online
    .venv/bin/python benchmarks/gpu_distill_throughput.py --device cpu --pair test_resnet test_convnext \
        --size 64 --batch 8 --steps 2        # a smoke run of the script itself, on CPU

The training images are 32x32 uint8 tensors on the GPU (CIFAR-100's shape), augmented and resized to 224 on the
device by kdforge's own transforms, as in `kdforge distill`. Random weights: throughput does not depend on them.
Needs a CUDA GPU; prints one line per pair and mode, and the cached/online and cached/plain ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from kdforge.data.dataset import ImageDataset
from kdforge.data.transforms import augment_batch
from kdforge.distill.cache import load_or_build_cache
from kdforge.distill.objective import create_distill_objective, cross_entropy_objective
from kdforge.distill.teacher import FrozenTeacher
from kdforge.models import create_model, resolve_input_spec
from kdforge.recipe import AugmentConfig, DistillConfig, ModelConfig, RuntimeConfig, TeacherCacheConfig
from kdforge.runtime import runtime_scope

PAIRS = (("resnet152", "resnet18"), ("vit_base_patch16_224", "vit_tiny_patch16_224"))


def synchronize(runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()


def cached_batches(cache, train, batch: int):
    """Step i -> (a stored view of 8 rotating batches of the training set, the teacher's cached logits)."""
    def next_batch(i):
        epoch, index = divmod(i, 8)
        idx = torch.arange(index * batch, (index + 1) * batch, device=train.images.device)
        return cache.batch(train.images, idx, epoch)

    return next_batch


def images_per_s(runtime, cfg, objective, next_batch, labels, steps: int, warmup: int, extra=None) -> float:
    """Training images/s of student `cfg` under `objective` (a function of the student when it needs the model:
    OFA's projectors and FitNets' adapters hook it; then `extra(model)` gives them, trained beside it)."""
    torch.manual_seed(0)
    model = runtime.place(create_model(cfg, 100).train())
    forward = runtime.for_training(model)
    spec = resolve_input_spec(cfg)
    trained = extra(model) if extra is not None else None
    if trained is not None:
        trained.to(runtime.device).train()
        objective = objective(trained)
    parameters = [*model.parameters(), *(trained.parameters() if trained is not None else [])]
    optimizer = torch.optim.AdamW(parameters, lr=3e-4)
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(runtime)
            started = time.perf_counter()
        images, teacher_logits = next_batch(i)
        with runtime.autocast():
            loss, _ = objective(forward(runtime.format_input(model, spec.prepare(images))), labels, images,
                                teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(runtime)
    rate = steps * len(labels) / (time.perf_counter() - started)
    if trained is not None:
        trained.remove()
    return rate


METHODS = ("kd", "dist", "dkd", "ofa", "fitnet")


def method_rates(runtime, teacher, student_cfg, methods, next_batch, labels, steps: int, warmup: int) -> dict:
    """Per distillation method, online (the teacher answers each step): training images/s and peak GPU memory
    (GiB; None on CPU) of the student, its projectors or adapters included."""
    from kdforge.distill.features import FeatureHints, StageProjectors

    spec = resolve_input_spec(student_cfg)
    rates = {}
    for method in methods:
        cfg = DistillConfig(method=method)
        extra = {"ofa": lambda model: StageProjectors(model, spec, 100, student_cfg.model),
                 "fitnet": lambda model: FeatureHints(model, spec, teacher.model, teacher.spec)}.get(method)
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rate = images_per_s(runtime, student_cfg,
                            (lambda trained, cfg=cfg: create_distill_objective(cfg, teacher, projectors=trained))
                            if extra else create_distill_objective(cfg, teacher), next_batch, labels, steps, warmup,
                            extra)
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if runtime.device.type == "cuda" else None
        rates[method] = {"images_per_s": round(rate, 1), "peak_gib": peak}
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pair", nargs=2, metavar=("TEACHER", "STUDENT"), help="one pair instead of the two")
    parser.add_argument("--methods", nargs="*", default=[], choices=METHODS,
                        help="also each of these methods online: images/s and peak memory")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu for a smoke run)")
    with runtime_scope(RuntimeConfig(device=args.device, precision="bf16")) as runtime:
        where = torch.cuda.get_device_name() if runtime.device.type == "cuda" else "cpu"
        print(f"{where}, torch {torch.__version__}, {runtime.precision}, batch {args.batch}, "
              f"{args.size}x{args.size} (resized on the device from 32x32)")
        n = 8 * args.batch
        train = ImageDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=runtime.device),
                             torch.randint(0, 100, (n,), device=runtime.device), tuple(map(str, range(100))))
        labels = train.labels[: args.batch]
        for teacher_name, student_name in [tuple(args.pair)] if args.pair else PAIRS:
            kwargs = lambda name: {"img_size": args.size} if "vit" in name else {}  # noqa: E731
            teacher_cfg = ModelConfig(model=teacher_name, input_size=args.size, model_kwargs=kwargs(teacher_name))
            student_cfg = ModelConfig(model=student_name, input_size=args.size, model_kwargs=kwargs(student_name))
            teacher_model = create_model(teacher_cfg, 100)
            teacher = FrozenTeacher(teacher_model, resolve_input_spec(teacher_cfg))
            teacher.to(runtime.device, runtime.uses_channels_last(teacher_model))

            def online(i):
                return augment_batch(train.images[: args.batch], 4, True, torch.Generator().manual_seed(i)), None

            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                cache = load_or_build_cache(Path(tmp) / "cache.safetensors", "bench", teacher, train,
                                            TeacherCacheConfig(views=args.views, batch_size=256), AugmentConfig(),
                                            0, runtime)
                build = args.views * n / (time.perf_counter() - started)

            cached = cached_batches(cache, train, args.batch)
            kd = create_distill_objective(DistillConfig(), teacher)
            rates = {
                "plain": images_per_s(runtime, student_cfg, cross_entropy_objective(), online, labels,
                                      args.steps, args.warmup),
                "online": images_per_s(runtime, student_cfg, kd, online, labels, args.steps, args.warmup),
                "cached": images_per_s(runtime, student_cfg, kd, cached, labels, args.steps, args.warmup),
            }
            print(f"{teacher_name} -> {student_name}: plain {rates['plain']:.0f} img/s, online KD "
                  f"{rates['online']:.0f} img/s, cached KD {rates['cached']:.0f} img/s "
                  f"(cached/online {rates['cached'] / rates['online']:.2f}x, cached/plain "
                  f"{rates['cached'] / rates['plain']:.2f}); cache build {build:.0f} teacher img/s", flush=True)
            if args.methods:
                for method, rate in method_rates(runtime, teacher, student_cfg, args.methods, online, labels,
                                                 args.steps, args.warmup).items():
                    print(f"    {method}: {rate['images_per_s']:.0f} img/s, peak {rate['peak_gib']} GiB", flush=True)
            del teacher, teacher_model, cache, cached
            if runtime.device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
