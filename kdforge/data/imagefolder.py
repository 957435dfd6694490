"""ImageFolder datasets for users' own data: `root/train/<class>/*.png|jpg` and `root/test/<class>/*`.

Images are decoded once by `kdforge.images.decode_rgb` (the server's decoder: formats, pixel budget, 16-bit,
transparency onto white), resized to a square `image_size`, then held in memory as uint8 like CIFAR. Files
with other extensions (notes, .DS_Store) are ignored; a training class folder without images is an error.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kdforge.data.dataset import DataSplits, ImageDataset
from kdforge.errors import DataError
from kdforge.images import ImageError, decode_rgb

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _read_image(path: Path, size: int) -> torch.Tensor:
    try:
        pixels = decode_rgb(path, size)
    except ImageError as exc:
        raise DataError(f"{path}: {exc}; remove or replace this file") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _read_split(folder: Path, classes: tuple[str, ...], size: int) -> ImageDataset:
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).glob("*") if p.suffix.lower() in EXTENSIONS)
        if not files and folder.name == "train":
            raise DataError(f"ImageFolder dataset: {folder / name} has no images ({', '.join(EXTENSIONS)}); a "
                            f"class needs training images: add some or remove the folder")
        images += [_read_image(p, size) for p in files]
        labels += [label] * len(files)
    if not images:
        raise DataError(f"{folder}: no images ({', '.join(EXTENSIONS)}) in its class folders")
    return ImageDataset(torch.stack(images), torch.tensor(labels, dtype=torch.int64), classes)


def read_imagefolder(root: str | Path, image_size: int) -> DataSplits:
    root = Path(root)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"ImageFolder dataset: {root / split} is not a folder (expected {root}/{split}/<class>/*)")
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"ImageFolder dataset: {root / 'train'} has no class folders")
    extra = sorted({p.name for p in (root / "test").iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise DataError(f"ImageFolder dataset: test classes not in train: {', '.join(extra)}")
    return DataSplits(_read_split(root / "train", classes, image_size), _read_split(root / "test", classes, image_size))
