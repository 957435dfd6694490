"""Where a CPU's training time goes for small-input models: one training step (forward, backward, AdamW) and one
inference batch per model, in PyTorch's default NCHW layout and in channels_last (NHWC), at the quickstart's
32x32. This chose the quickstart's teacher (resnet10t) and its `channels_last = true`.

    .venv/bin/python benchmarks/cpu_training_speed.py                       # the candidates, 2 threads
    .venv/bin/python benchmarks/cpu_training_speed.py --models resnet18 mobilenetv3_small_050 --batch 256
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F

from kdforge.runtime import describe_machine, machine

MODELS = ["resnet18", "resnet10t", "resnet14t", "mobilenetv3_large_100", "mobilenetv3_small_050"]


def images_per_s(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, steps: int, warmup: int,
                 train: bool) -> float:
    """Images per second of `steps` training steps (or inference batches) after `warmup` of them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        if train:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), labels).backward()
            optimizer.step()
        else:
            with torch.inference_mode():
                model(x)

    model.train(train)
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{describe_machine(machine())}; {args.size}x{args.size}, batch {args.batch}, images/s")
    print(f"{'model':<24}{'layout':<15}{'train':>9}{'inference':>11}")
    rows = []
    for name in args.models:
        for layout in ("nchw", "channels_last"):
            model = timm.create_model(name, num_classes=100)
            x = torch.randn(args.batch, 3, args.size, args.size)
            if layout == "channels_last":
                model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            labels = torch.randint(0, 100, (args.batch,))
            row = {"model": name, "layout": layout,
                   "train": images_per_s(model, x, labels, args.steps, args.warmup, train=True),
                   "inference": images_per_s(model, x, labels, args.steps, args.warmup, train=False)}
            rows.append(row)
            print(f"{name:<24}{layout:<15}{row['train']:>9.0f}{row['inference']:>11.0f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
