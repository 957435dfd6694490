"""Distillation overhead: step time of distillation (online teacher, and from the teacher output cache) vs plain
student training, measured side by side.

    .venv/bin/python benchmarks/distill_overhead.py                       # the quickstart pair at 32x32
    .venv/bin/python benchmarks/distill_overhead.py --teacher resnet50 --student resnet18 --size 224 --batch 32 --store
    .venv/bin/python benchmarks/distill_overhead.py --student vit_tiny_patch16_224 \
        --student-kwargs img_size=32 patch_size=4 depth=6

One training step = augmentation, forward, loss, backward, optimizer step, as in kdforge's loop; the online
distillation step adds the frozen teacher's forward on its own view of the batch; the cached one instead reads
the teacher's logits for a stored view ([distill.teacher_cache], built once before the steps; its build time is
printed separately). Prints the median step times and their ratios to the plain step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdforge.data.dataset import ImageDataset
from kdforge.data.transforms import augment_batch
from kdforge.distill.cache import load_or_build_cache
from kdforge.distill.objective import create_distill_objective, cross_entropy_objective
from kdforge.distill.store import load_or_build_store
from kdforge.distill.teacher import FrozenTeacher
from kdforge.models import create_model, resolve_input_spec
from kdforge.recipe import AugmentConfig, DistillConfig, ModelConfig, TeacherCacheConfig
from kdforge.runtime import Runtime


def step_seconds(model, spec, objective, next_batch, labels, steps: int, warmup: int) -> float:
    """Median seconds per step; next_batch(i) -> (augmented uint8 images, cached teacher logits or None)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        batch, teacher_logits = next_batch(i)
        loss, _ = objective(model(spec.prepare(batch)), labels, batch, teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="mobilenetv3_small_050")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--teacher-kwargs", nargs="*", default=[], help="timm kwargs, e.g. img_size=32 patch_size=4")
    parser.add_argument("--student-kwargs", nargs="*", default=[], help="timm kwargs, e.g. img_size=32 patch_size=4")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--views", type=int, default=4, help="teacher cache views")
    parser.add_argument("--store", action="store_true",
                        help="the sharded teacher store ([distill.teacher_cache] store, memory-mapped shards of "
                             "2 batches' images) instead of the one-file cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    def kwargs(pairs):
        return {k: int(v) for k, v in (kv.split("=") for kv in pairs)}

    teacher_cfg = ModelConfig(model=args.teacher, input_size=args.size, model_kwargs=kwargs(args.teacher_kwargs))
    student_cfg = ModelConfig(model=args.student, input_size=args.size, model_kwargs=kwargs(args.student_kwargs))
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 100, (args.batch,))
    teacher = FrozenTeacher(create_model(teacher_cfg, 100), resolve_input_spec(teacher_cfg))
    spec = resolve_input_spec(student_cfg)

    def online(i):
        return augment_batch(images, 4, True, torch.Generator().manual_seed(i)), None

    # the cache over a training set of 8 batches; each step reads one batch of it (views drawn per epoch)
    train = ImageDataset(torch.randint(0, 256, (8 * args.batch, 3, 32, 32), dtype=torch.uint8),
                         torch.randint(0, 100, (8 * args.batch,)), tuple(map(str, range(100))))
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=None)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        if args.store:
            cfg = TeacherCacheConfig(views=args.views, store=tmp, shard_images=2 * args.batch)
            cache = load_or_build_store(Path(tmp), "bench", teacher, train, cfg, AugmentConfig(), 0, runtime, 100)
        else:
            cache = load_or_build_cache(Path(tmp) / "cache.safetensors", "bench", teacher, train,
                                        TeacherCacheConfig(views=args.views), AugmentConfig(), 0, runtime)
        build_s = time.perf_counter() - started
        results = measure(args, cache, train, teacher, spec, student_cfg, labels, online)
    kind = "sharded store (memory-mapped)" if args.store else "one-file cache"
    print(f"{args.teacher} -> {args.student} at {args.size}x{args.size}, batch {args.batch}, {args.threads} threads, "
          f"torch {torch.__version__}; teacher answers from the {kind}")
    for name, seconds in results.items():
        print(f"{name + ' step:':26s} {seconds * 1e3:7.1f} ms ({args.batch / seconds:.0f} img/s)")
    plain = results["plain student"]
    print(f"online distillation / plain step time: {results['online distillation'] / plain:.2f}")
    print(f"cached distillation / plain step time: {results['cached distillation'] / plain:.2f}")
    print(f"cache build: {args.views} views of {len(train)} images in {build_s:.1f} s "
          f"({args.views * len(train) / build_s:.0f} teacher images/s)")


def measure(args, cache, train, teacher, spec, student_cfg, labels, online) -> dict[str, float]:
    """Median step times of the plain student, online distillation and distillation from `cache`."""

    def cached(i):
        epoch, index = divmod(i, 8)
        return cache.batch(train.images, torch.arange(index * args.batch, (index + 1) * args.batch), epoch)

    objective = create_distill_objective(DistillConfig(), teacher)
    results = {}
    for name, step_objective, batches in (("plain student", cross_entropy_objective(), online),
                                          ("online distillation", objective, online),
                                          ("cached distillation", objective, cached)):
        torch.manual_seed(0)
        results[name] = step_seconds(create_model(student_cfg, 100).train(), spec, step_objective, batches, labels,
                                     args.steps, args.warmup)
    return results


if __name__ == "__main__":
    main()
