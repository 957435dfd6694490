"""Images read from files when they are needed: ImageFolder files and WebDataset shard members.

    images = FileImages(refs, size=224, augment=recipe.data.augment)
    images[idx]                        # evaluation: decoded and resized to 224x224 as the server does (uint8)
    images.views(idx, seed, epoch)     # training: augmented views of each image, cropped from its source resolution

A `SampleRef` says where one image's bytes are: a file, or a member of a tar shard (its offset and size, found
once by `tarfile` when the shards are listed), so any image is read on its own, in any order, by any worker.

Training views: RandomResizedCrop + flip alone (the default) are `kdforge.data.crops.crop_view`, which draws the
crop from the file's header and decodes only the resolution the crop needs (libjpeg-turbo, DCT-scaled where it can),
from a `random.Random` of the view's own seed. With RandAugment / AutoAugment or colour jitter, timm's transforms
(`timm.data.create_transform(is_training=True, use_prefetcher=True)`) make the view from the whole decoded image,
with the random modules they use (`random`, numpy, torch) seeded per image inside a scope that restores them. Then
timm's `RandomErasing` (on the image normalized with ImageNet's statistics, then back to uint8), seeded the same way.
The models normalize that uint8 crop each its own way (`InputSpec.prepare`), so the teacher sees exactly the
student's crop. Each view is a pure function of (seed, epoch, image index): it never depends on the worker that
made it, the batch it fell in, or a resume.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdforge.data.crops import crop_view
from kdforge.data.dataset import LazyImages
from kdforge.errors import DataError
from kdforge.images import ImageError, decode_rgb, open_rgb
from kdforge.rng import stream_seed

if TYPE_CHECKING:
    from kdforge.recipe import AugmentConfig


@dataclass(frozen=True)
class SampleRef:
    """Where one image's bytes are: `path` itself (length < 0), or `length` bytes at `offset` in the tar `path`."""

    path: str  # a file, or the URL of a shard served over HTTP(S) (data/remote.py)
    offset: int = 0
    length: int = -1
    version: str = ""  # a remote shard's sha256 (what the decode cache keys on instead of size and mtime)

    def read(self) -> bytes | Path:
        if self.length < 0:
            return Path(self.path)
        if self.version:
            from kdforge.data.remote import fetch

            return fetch(self.path, self.offset, self.length)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.length)

    def __str__(self) -> str:
        return self.path if self.length < 0 else f"{self.path} (member at byte {self.offset})"


def decode_ref(ref: SampleRef, size: int) -> torch.Tensor:
    """Evaluation decode of one image: uint8 (3, size, size), as `kdforge.images.decode_rgb` (the server's)."""
    try:
        return torch.from_numpy(decode_rgb(ref.read(), size)).permute(2, 0, 1)
    except (ImageError, OSError) as exc:
        raise DataError(f"{ref}: {exc}; remove or replace this image") from None


@contextlib.contextmanager
def seeded(seed: int, numpy: bool = True):
    """Seed `random`, torch's global CPU generator and (with `numpy`) numpy's, the generators timm's transforms draw
    from, for one image; restore them after, so nothing outside sees the change. (The CPU generator alone:
    `torch.manual_seed` would also queue a seed for CUDA, with a stack trace, on every call. Numpy's state costs
    0.13 ms to save and restore: only timm's auto-augment policies draw from it.)"""
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    np_state = np.random.get_state() if numpy else None
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    if numpy:
        np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.set_rng_state(torch_state)
        if numpy:
            np.random.set_state(np_state)


class FileImages(LazyImages):
    """Images decoded from their files when indexed (see the module docstring)."""

    def __init__(self, refs: list[SampleRef], size: int, augment: AugmentConfig | None = None,
                 workers: int = 0, decode: str = "cpu") -> None:
        self.refs, self.size, self.augment, self.workers = refs, size, augment, workers
        self.decode = decode  # [data] decode: "gpu": the workers plan (`plans`), the training process decodes
        self._transform = None  # timm's training transform, made on first use (in each worker process)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([decode_ref(self.refs[i], self.size) for i in _positions(idx)])

    def views(self, idx: torch.Tensor, seed: int, number: int | torch.Tensor,
              purpose: str = "image_view") -> torch.Tensor:
        """Training views (uint8 (n, 3, size, size)) of the images at `idx`: view `number` of each (the epoch; or
        per image, the teacher cache's view with `purpose` "cache_image_view")."""
        return torch.stack([self.view(i, seed, n, purpose) for i, n in _numbered(idx, number)])

    def plans(self, idx: torch.Tensor, seed: int, number: int | torch.Tensor,
              purpose: str = "image_view") -> list:
        """[data] decode = "gpu", in a worker: each view's JPEG bytes and the crop and flip `views` would draw for it
        (crops.ViewPlan), or the view itself where it is not a plain JPEG; `crops.finish_views` makes the batch."""
        from kdforge.data.crops import plan_view

        cfg, planned = self.augment, []
        for index, n in _numbered(idx, number):
            ref = self.refs[index]
            rng = random.Random(stream_seed(seed, purpose, n * 2**32 + index))
            try:
                planned.append(plan_view(ref.read(), rng, self.size, tuple(cfg.scale), tuple(cfg.ratio), cfg.hflip,
                                         cfg.interpolation))
            except (ImageError, OSError) as exc:
                raise DataError(f"{ref}: {exc}; remove or replace this image") from None
        return planned

    def view(self, index: int, seed: int, number: int, purpose: str = "image_view") -> torch.Tensor:
        if self._transform is None:
            self._transform = create_train_transform(self.augment, self.size)
        transform, erase = self._transform
        cfg, ref, view_seed = self.augment, self.refs[index], stream_seed(seed, purpose, number * 2**32 + index)
        crop_only = cfg.auto_augment is None and not cfg.color_jitter  # RandomResizedCrop + flip: kdforge.data.crops
        try:
            if crop_only:  # the box drawn from the header, the image decoded at the resolution the box needs
                view = crop_view(ref.read(), random.Random(view_seed), self.size, tuple(cfg.scale), tuple(cfg.ratio),
                                 cfg.hflip, cfg.interpolation)
            else:
                image = open_rgb(ref.read(), self.size)
        except (ImageError, OSError) as exc:
            raise DataError(f"{ref}: {exc}; remove or replace this image") from None
        if crop_only and erase is None:
            return view
        with seeded(view_seed, numpy=cfg.auto_augment is not None):  # timm's policies draw from the global modules
            view = view if crop_only else transform(image)
            return erase(view) if erase is not None else view


def _positions(idx: torch.Tensor) -> list[int]:
    return [int(i) for i in torch.as_tensor(idx).flatten()]


def _numbered(idx: torch.Tensor, number: int | torch.Tensor) -> list[tuple[int, int]]:
    """(image position, view number) pairs: one number for all, or one per image."""
    positions = _positions(idx)
    numbers = _positions(number) if isinstance(number, torch.Tensor) else [number] * len(positions)
    return list(zip(positions, numbers, strict=True))


def create_train_transform(cfg: AugmentConfig, size: int):
    """(timm's training transform to a uint8 (3, size, size) tensor, random erasing or None) from [data.augment]."""
    from timm.data import create_transform

    transform = create_transform(
        size, is_training=True, use_prefetcher=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
        hflip=0.5 if cfg.hflip else 0.0, color_jitter=cfg.color_jitter or None, auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
    )
    return transform, (_uint8_erasing(cfg.re_prob) if cfg.re_prob > 0 else None)


def _uint8_erasing(probability: float):
    """timm's RandomErasing ('pixel' mode: normal noise in normalized space) on a uint8 image: normalized with
    ImageNet's mean/std, erased, and mapped back (noise outside the uint8 range is clipped)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.data.random_erasing import RandomErasing

    erasing = RandomErasing(probability, mode="pixel", device="cpu")
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)

    def erase(image: torch.Tensor) -> torch.Tensor:
        x = erasing((image.float() / 255 - mean) / std)
        return ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)

    return erase
