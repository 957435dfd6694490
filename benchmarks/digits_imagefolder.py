"""A small real dataset any machine can build offline: scikit-learn's 1,797 handwritten digits (8x8 grey, 10
classes, shipped inside scikit-learn) written as an ImageFolder of 32x32 RGB PNGs, 20% of each class as the test
split (chosen with a fixed seed).

    .venv/bin/python benchmarks/digits_imagefolder.py --out data/digits
    .venv/bin/python benchmarks/distill_methods.py --methods kd dist ofa --set data.dataset=imagefolder \\
        --set data.root=data/digits --set data.image_size=32 --set train.batch_size=64 \\
        --set teacher.train.epochs=15 --set student.train.epochs=15 --set name=digits

Used by benchmarks/README.md's distillation-method table on real data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: Path, size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """The ImageFolder train/<digit>/NNNN.png and test/<digit>/NNNN.png; returns the image count per split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "test": 0}
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        cut = round(len(indices) * test_fraction)
        for split, chosen in (("test", indices[:cut]), ("train", indices[cut:])):
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                grey = (digits.images[index] * (255 / 16)).clip(0, 255).astype(np.uint8)
                image = Image.fromarray(grey, "L").resize((size, size), Image.BILINEAR).convert("RGB")
                image.save(folder / f"{index:04d}.png")
                counts[split] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/digits"))
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    counts = write_digits(args.out, args.size)
    print(f"wrote {counts['train']} training and {counts['test']} test images to {args.out}")


if __name__ == "__main__":
    main()
