"""Loop parity: kdforge's own training loop (`kdforge.train.loop.fit`, the code `kdforge distill` runs) against a
minimal hand-written PyTorch loop on the same model, batch, optimizer, precision and data on the device, for plain
training, online distillation and distillation from the teacher output cache; and the teacher cache build
(`kdforge.distill.cache.load_or_build_cache`) against pure teacher inference over the same images.

    .venv/bin/python benchmarks/loop_parity.py                  # CPU: resnet18 -> mobilenetv3_small_050 at 32x32
    .venv/bin/python benchmarks/loop_parity.py --device cuda --size 224 --batch 128 \
        --teacher resnet152 --student resnet18 --precision bf16                   # a GPU

The hand-written loop is what a careful user writes without kdforge: inputs already prepared on the device
(normalized float, channels_last for CNNs on CUDA), `torch.optim.AdamW` (fused on CUDA, PyTorch's default
elsewhere: foreach measured no faster on 2 CPU cores), no augmentation, no logging, no evaluation. kdforge runs
with augmentation off, evaluation limited to one batch and logging every `--log-every` steps, timed by wall clock
(see `kdforge_images_per_s`). Each side trains `--steps` steps after `--warmup` untimed ones; each number is
the median of `--repeats` measurements, taken alternately with its counterpart, and the ratio is the median of
the pairs' ratios (a 2-core machine's timings drift by 10-30% from run to run). Prints images/s and the ratio
kdforge / hand-written (1.00 = parity).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdforge.data.dataset import DataSplits, ImageDataset
from kdforge.distill.cache import load_or_build_cache
from kdforge.distill.objective import create_distill_objective, cross_entropy_objective
from kdforge.distill.teacher import FrozenTeacher
from kdforge.models import create_model, resolve_input_spec
from kdforge.recipe import AugmentConfig, DistillConfig, ModelConfig, RuntimeConfig, TeacherCacheConfig, TrainConfig
from kdforge.runtime import runtime_scope
from kdforge.train.loop import BatchSource, fit

NO_AUGMENT = AugmentConfig(crop_padding=0, hflip=False)


def dataset(n: int, size: int, classes: int = 100, seed: int = 0) -> ImageDataset:
    generator = torch.Generator().manual_seed(seed)
    return ImageDataset(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator),
                        torch.randint(0, classes, (n,), generator=generator), tuple(map(str, range(classes))))


def kdforge_images_per_s(student_cfg, objective, data, args, runtime, cache=None) -> float:
    """Images/s of `fit` by wall clock: a run of warmup + steps minus a run of warmup steps, so that everything a
    step costs counts (logging and events included) and what both runs share (set-up, the final one-batch
    evaluation and checkpoint) cancels. A first, untimed run of warmup steps takes what a process pays once (the
    first fit's lazy set-up), which would otherwise land in the shorter run and can make the difference negative."""
    times = {}
    for steps in (args.warmup, args.warmup, args.warmup + args.steps):  # the first: untimed (overwritten)
        torch.manual_seed(0)
        model = create_model(student_cfg, 100)
        cfg = TrainConfig(epochs=1, batch_size=args.batch, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                          warmup_epochs=0, max_steps=steps, limit_eval_batches=1, log_every=args.log_every)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            fit(model, resolve_input_spec(student_cfg), objective, data, cfg, runtime,
                BatchSource(NO_AUGMENT, 0, cache), Path(tmp), "parity")
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            times[steps] = time.perf_counter() - started
    return args.steps * args.batch / (times[args.warmup + args.steps] - times[args.warmup])


def hand_written_images_per_s(student_cfg, data, args, device, channels_last, amp, teacher=None,
                              teacher_logits=None) -> float:
    """A minimal loop: prepared inputs on the device, AdamW, cross-entropy (+ KD against a teacher's logits)."""
    torch.manual_seed(0)
    model = create_model(student_cfg, 100).to(device).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    spec = resolve_input_spec(student_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05,
                                  **({"fused": True} if device.type == "cuda" else {}))
    batches = len(data.train) // args.batch
    inputs = [spec.prepare(data.train.images[i * args.batch:(i + 1) * args.batch].to(device)).contiguous(
        memory_format=memory_format) for i in range(batches)]
    labels = [data.train.labels[i * args.batch:(i + 1) * args.batch].to(device) for i in range(batches)]
    if teacher is not None:  # online: the teacher's forward is part of every step
        teacher_model = teacher.model.to(device).eval().to(memory_format=memory_format)
    started = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        x, y = inputs[step % batches], labels[step % batches]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None or teacher_logits is not None:
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher_model(x)
                else:
                    target = teacher_logits[step % batches]
                t = 4.0
                kd = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(target.float() / t, 1),
                              reduction="batchmean", log_target=True) * t * t
                loss = 0.5 * loss + 0.5 * kd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch / (time.perf_counter() - started)


def inference_images_per_s(teacher: FrozenTeacher, images: torch.Tensor, batch: int, device, channels_last, amp,
                           repeats: int) -> float:
    """Pure teacher inference over `images` `repeats` times (as many forwards as a cache of that many views)."""
    model = teacher.model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    prepared = [teacher.spec.prepare(images[i:i + batch].to(device)) for i in range(0, len(images), batch)]
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        model(prepared[0])
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            for x in prepared:
                model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return repeats * len(images) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="mobilenetv3_small_050")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--views", type=int, default=2, help="teacher cache views")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="measure each number this many times: the median")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    rows = []
    runtime_cfg = RuntimeConfig(device=args.device, precision=args.precision, threads=args.threads)
    with runtime_scope(runtime_cfg) as runtime:
        device, amp = runtime.device, runtime.amp_dtype
        teacher_cfg = ModelConfig(model=args.teacher, input_size=args.size)
        student_cfg = ModelConfig(model=args.student, input_size=args.size)
        batches = args.warmup + args.steps
        data = DataSplits(dataset(batches * args.batch, args.size), dataset(args.batch, args.size, seed=1))
        channels_last = runtime.uses_channels_last(create_model(student_cfg, 100))
        torch.manual_seed(0)
        teacher = FrozenTeacher(create_model(teacher_cfg, 100), resolve_input_spec(teacher_cfg))
        teacher.to(device, runtime.uses_channels_last(teacher.model))
        kd = create_distill_objective(DistillConfig(method="kd", temperature=4.0, alpha=0.5), teacher)

        def row(what: str, ours, theirs) -> float:
            """Measure the two alternately (a drift of the machine's speed hits both) and report the medians and
            the median of the per-pair ratios."""
            pairs = [(ours(), theirs()) for _ in range(args.repeats)]
            mine, other = (statistics.median(p[i] for p in pairs) for i in (0, 1))
            ratio = statistics.median(a / b for a, b in pairs)
            rows.append({"what": what, "kdforge_images_per_s": round(mine, 1),
                         "hand_written_images_per_s": round(other, 1), "ratio": round(ratio, 3)})
            print(f"{what:34s} kdforge {mine:9.1f} img/s   hand-written {other:9.1f} img/s   ratio {ratio:.2f}",
                  flush=True)
            return mine

        print(f"{args.teacher} -> {args.student} at {args.size}x{args.size}, batch {args.batch}, {args.steps} steps "
              f"after {args.warmup}, {runtime.describe()}, torch {torch.__version__}", flush=True)
        plain = row("plain training",
                    lambda: kdforge_images_per_s(student_cfg, cross_entropy_objective(), data, args, runtime),
                    lambda: hand_written_images_per_s(student_cfg, data, args, device, channels_last, amp))
        row("online KD", lambda: kdforge_images_per_s(student_cfg, kd, data, args, runtime),
            lambda: hand_written_images_per_s(student_cfg, data, args, device, channels_last, amp, teacher=teacher))

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "cache.safetensors"

            def build() -> float:
                path.unlink(missing_ok=True)
                started = time.perf_counter()
                load_or_build_cache(path, "parity", teacher, data.train, TeacherCacheConfig(views=args.views),
                                    NO_AUGMENT, 0, runtime)
                return args.views * len(data.train) / (time.perf_counter() - started)

            build()  # the first build also loads kernels
            row(f"teacher cache build ({args.views} views)", build,
                lambda: inference_images_per_s(teacher, data.train.images, 256, device,
                                               runtime.uses_channels_last(teacher.model), amp, args.views))
            cache = load_or_build_cache(path, "parity", teacher, data.train, TeacherCacheConfig(views=args.views),
                                        NO_AUGMENT, 0, runtime)
            logits = [cache.batch(data.train.images, torch.arange(i * args.batch, (i + 1) * args.batch, device=device),
                                  0)[1] for i in range(batches)]
            cached = row("cached KD", lambda: kdforge_images_per_s(student_cfg, kd, data, args, runtime, cache),
                         lambda: hand_written_images_per_s(student_cfg, data, args, device, channels_last, amp,
                                                           teacher_logits=logits))
        print(f"cached KD / plain training (kdforge): {cached / plain:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
