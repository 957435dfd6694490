"""In-memory image datasets: uint8 tensors decoded once, batched by index."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def epoch_order(num_items: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The shuffled batches of one epoch (full batches only), a pure function of (seed, epoch).

    Being a pure function is what makes `--resume` exact: a resumed run recomputes the same order and
    skips the batches it already trained on.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_items, generator=generator)
    return list(order[: num_items - num_items % batch_size].split(batch_size))


def eval_batches(num_items: int, batch_size: int) -> list[torch.Tensor]:
    """Evaluation order: every item once, in order, the last batch possibly short."""
    return list(torch.arange(num_items).split(batch_size))
