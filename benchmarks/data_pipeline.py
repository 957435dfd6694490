"""Data pipeline: kdforge's batched tensor augmentation + resize vs a per-image torchvision/PIL pipeline.

    .venv/bin/python benchmarks/data_pipeline.py --size 224 --batch 256 --threads 2

Both take CIFAR-style uint8 32x32 images and produce normalized float batches at --size: random crop with 4 pixels
of padding, horizontal flip, bilinear resize, normalize. The per-image pipeline is the reference scripts' way
(PIL image -> torchvision transforms -> stack). Prints images/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from PIL import Image
    from torchvision import transforms

    from kdforge.data.transforms import InputSpec, augment_batch
    from kdforge.models import IMAGENET_MEAN, IMAGENET_STD

    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8)
    spec = InputSpec(args.size, IMAGENET_MEAN, IMAGENET_STD)

    def batched(i: int) -> torch.Tensor:
        return spec.prepare(augment_batch(images, 4, True, torch.Generator().manual_seed(i)))

    per_image = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.Resize(args.size, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    pil_images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]

    def one_by_one(i: int) -> torch.Tensor:
        return torch.stack([per_image(img) for img in pil_images])

    results = {}
    for name, fn in (("kdforge batched tensors", batched), ("per-image PIL/torchvision", one_by_one)):
        fn(0)  # warm-up
        started = time.perf_counter()
        for i in range(args.batches):
            out = fn(i + 1)
        results[name] = args.batch * args.batches / (time.perf_counter() - started)
        assert out.shape == (args.batch, 3, args.size, args.size)
    print(f"32x32 uint8 -> {args.size}x{args.size} normalized, batch {args.batch}, {args.threads} threads, "
          f"torch {torch.__version__}")
    for name, rate in results.items():
        print(f"{name:>26}: {rate:8.0f} images/s")
    print(f"batched / per-image: {results['kdforge batched tensors'] / results['per-image PIL/torchvision']:.1f}x")


if __name__ == "__main__":
    main()
