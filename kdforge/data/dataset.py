"""Image datasets batched by index: `dataset.images[idx]` is a uint8 (n, 3, H, W) batch.

The images are either a tensor held in memory (CIFAR-100, the synthetic set: decoded once, the fastest path at
that size) or `LazyImages`, read on demand: a decode cache on disk (`CachedImages`) or image files and
shard members decoded when asked (`kdforge.data.stream.FileImages`). Every consumer indexes them the same way;
the hot loops (training, evaluation, verification) read lazy images in DataLoader workers (`data.loader`).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from kdforge.errors import DataError
from kdforge.rng import rng_stream


class LazyImages:
    """Images read on demand: `images[idx]` -> uint8 CPU tensor (n, 3, size, size). They stay on the CPU (`to`
    returns them unchanged); the loops move each batch to the training device."""

    device = torch.device("cpu")
    dtype = torch.uint8
    size: int

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), 3, self.size, self.size)

    def to(self, device: torch.device | str) -> LazyImages:
        return self

    def subset(self, index: torch.Tensor) -> LazyImages:
        return SubsetImages(self, index)


class SubsetImages(LazyImages):
    """Some of another lazy set's images (a validation split), by position: nothing is read or copied."""

    def __init__(self, base: LazyImages, index: torch.Tensor) -> None:
        self.base, self.index, self.size = base, index, base.size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.base[self.index[idx]]

    def subset(self, index: torch.Tensor) -> LazyImages:
        return SubsetImages(self.base, self.index[index])

    def __getattr__(self, name: str):
        """What the base offers beyond indexing: its decoding `workers`, and its training `views` by position."""
        if name in ("base", "index"):  # not set yet (while unpickling)
            raise AttributeError(name)
        attr = getattr(self.base, name)
        if name in ("views", "plans"):
            return lambda idx, *args, **kwargs: attr(self.index[torch.as_tensor(idx).cpu()], *args, **kwargs)
        return attr


class CachedImages(LazyImages):
    """A decode cache on disk: a `.npy` file of uint8 (N, 3, size, size) followed by N CRC-32s, one per row (numpy
    reads the array and ignores them). A batch reads its rows (`os.preadv`) from the page cache, so stages and
    processes share one copy, none holds the whole set, and nothing of the file is mapped into a process (a memory
    map's touched pages would count in its RSS, once per mapping). Every row read is checked against its CRC-32:
    a damaged or edited cache is an error naming it, never pixels trained on."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            self.offset = f.tell()
        if dtype != np.uint8 or len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"{path}: not a decode cache (uint8 (N, 3, H, W)); got {dtype} {shape}")
        self.path, self.count, self.size = path, shape[0], shape[-1]
        self.row = 3 * self.size * self.size
        table = self.offset + self.count * self.row
        if os.path.getsize(path) != table + 4 * self.count:
            raise ValueError(f"{path}: not a decode cache with a checksum per row")
        with open(path, "rb") as f:
            f.seek(table)
            self.crcs = np.frombuffer(f.read(4 * self.count), dtype="<u4")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.as_tensor(idx).cpu().flatten().tolist()
        out = np.empty((len(positions), 3, self.size, self.size), dtype=np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for row, position in zip(out, positions, strict=True):
                if os.preadv(fd, [row.reshape(-1)], self.offset + position * self.row) != self.row:
                    raise OSError(f"{self.path} is shorter than its header says")
                if zlib.crc32(row) != self.crcs[position]:
                    raise DataError(f"the decode cache {self.path} was changed or damaged (image {position} does not "
                                    f"match its checksum); delete the file and run again: it is decoded anew")
        finally:
            os.close(fd)
        return torch.from_numpy(out)


Images = torch.Tensor | LazyImages


@dataclass(frozen=True)
class ImageDataset:
    images: Images  # uint8, (N, 3, H, W): in memory, or read on demand (LazyImages)
    labels: torch.Tensor  # int64, (N,)
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def streamed(self) -> bool:
        """Training views are decoded from the source images in every pass (`FileImages`), not read from memory
        or the decode cache."""
        return hasattr(self.images, "views")

    def to(self, device: torch.device | str) -> ImageDataset:
        """The same data on another device (in memory: the whole set lives there and batches are index ops; lazy
        images stay where they are read and each batch moves)."""
        return ImageDataset(self.images.to(device), self.labels.to(device), self.classes)


@dataclass(frozen=True)
class DataSplits:
    train: ImageDataset
    test: ImageDataset
    val: ImageDataset | None = None  # held out of the training split (`[data] val_fraction`); None: none
    description: str = ""  # for users' own data: how it is read (in memory or streamed) and why

    @property
    def streamed(self) -> bool:
        return self.train.streamed

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def selection(self) -> ImageDataset:
        """The split that chooses (the best checkpoint, INT8's held-out checks): validation when there is one."""
        return self.val if self.val is not None else self.test


def split_validation(train: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(train, val): `fraction` of every class's training images (at least one of a class with two or more),
    drawn with `seed`; both keep the original order. A pure function of the data, fraction and seed, so the
    export and every later run see the same split."""
    generator = rng_stream(seed, "validation_split")
    held = []
    for label in range(len(train.classes)):
        members = (train.labels == label).nonzero().flatten()
        count = max(1, round(len(members) * fraction)) if len(members) >= 2 else 0
        held.append(members[torch.randperm(len(members), generator=generator)[:count]])
    is_val = torch.zeros(len(train), dtype=torch.bool)
    is_val[torch.cat(held)] = True

    def subset(mask: torch.Tensor) -> ImageDataset:
        images = train.images[mask] if isinstance(train.images, torch.Tensor) \
            else train.images.subset(mask.nonzero().flatten())
        return ImageDataset(images, train.labels[mask], train.classes)

    return subset(~is_val), subset(is_val)


def epoch_order(num_items: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The shuffled batches of one epoch (full batches only), a pure function of (seed, epoch).

    Being a pure function is what makes `--resume` exact: a resumed run recomputes the same order and
    skips the batches it already trained on.
    """
    generator = rng_stream(seed, "epoch_order", epoch)
    order = torch.randperm(num_items, generator=generator)
    return list(order[: num_items - num_items % batch_size].split(batch_size))


def eval_batches(num_items: int, batch_size: int) -> list[torch.Tensor]:
    """Evaluation order: every item once, in order, the last batch possibly short."""
    return list(torch.arange(num_items).split(batch_size))
