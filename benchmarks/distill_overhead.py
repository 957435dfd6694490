"""Distillation overhead: step time of distillation vs plain student training, measured side by side.

    .venv/bin/python benchmarks/distill_overhead.py                       # the quickstart pair at 32x32
    .venv/bin/python benchmarks/distill_overhead.py --student vit_tiny_patch16_224 \
        --student-kwargs img_size=32 patch_size=4 depth=6

One training step = augmentation, forward, loss, backward, optimizer step, as in kdforge's loop; the distillation
step adds the frozen teacher's forward on its own view of the batch. Prints the median step times and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdforge.data.transforms import augment_batch
from kdforge.distill import FrozenTeacher, create_distill_objective
from kdforge.models import create_model, resolve_input_spec
from kdforge.recipe import DistillConfig, ModelConfig
from kdforge.train.loop import cross_entropy_objective


def step_seconds(model, spec, objective, images, labels, steps: int, warmup: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        batch = augment_batch(images, 4, True, torch.Generator().manual_seed(i))
        loss, _ = objective(model(spec.prepare(batch)), labels, batch)
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

    torch.manual_seed(0)
    plain = step_seconds(create_model(student_cfg, 100).train(), spec, cross_entropy_objective(), images, labels,
                         args.steps, args.warmup)
    torch.manual_seed(0)
    kd = step_seconds(create_model(student_cfg, 100).train(), spec,
                      create_distill_objective(DistillConfig(), teacher), images, labels, args.steps, args.warmup)
    print(f"{args.teacher} -> {args.student} at {args.size}x{args.size}, batch {args.batch}, {args.threads} threads, "
          f"torch {torch.__version__}")
    print(f"plain student step: {plain * 1e3:.1f} ms ({args.batch / plain:.0f} img/s)")
    print(f"distillation step:  {kd * 1e3:.1f} ms ({args.batch / kd:.0f} img/s)")
    print(f"distillation / plain step time: {kd / plain:.2f}")


if __name__ == "__main__":
    main()
