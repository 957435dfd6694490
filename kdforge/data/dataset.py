"""In-memory image datasets: uint8 tensors decoded once, batched by index."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdforge.rng import rng_stream


@dataclass(frozen=True)
class ImageDataset:
    images: torch.Tensor  # uint8, (N, 3, H, W)
    labels: torch.Tensor  # int64, (N,)
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> ImageDataset:
        """The same data on another device (the whole set lives there; batches are then just index ops)."""
        return ImageDataset(self.images.to(device), self.labels.to(device), self.classes)


@dataclass(frozen=True)
class DataSplits:
    train: ImageDataset
    test: ImageDataset
    val: ImageDataset | None = None  # held out of the training split (`[data] val_fraction`); None: none

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
        return ImageDataset(train.images[mask], train.labels[mask], train.classes)

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
