"""Batched tensor transforms, run on whatever device the batch lives on (no per-image PIL).

Training: `augment_batch` (random crop with padding, horizontal flip) on uint8 images at the dataset's
resolution (streamed data gets timm's augmentations in the decoding workers instead, data/stream.py), then
`mix_batch` (timm's mixup / CutMix) when the recipe asks for it. Every model then gets its own view of that
same augmented batch through `InputSpec.prepare`: resized to its input size and normalized with its own
mean/std. A teacher and a student with different input configurations thus see the same crop and flip, each
the way it expects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kdforge.recipe import AugmentConfig


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: square input size and per-channel mean/std of inputs scaled to [0, 1]."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def prepare(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> normalized float (N, 3, size, size), on the images' device."""
        x = images.to(dtype) / 255.0
        if x.shape[-2:] != (self.size, self.size):
            downscale = x.shape[-1] > self.size
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=downscale)
        mean = torch.tensor(self.mean, device=x.device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=dtype).view(1, 3, 1, 1)
        return (x - mean) / std


def spec_from_metadata(meta: Mapping[str, Any]) -> InputSpec:
    """The InputSpec an export recorded (`input_size`, `mean`, `std`): lists in metadata.json and an engine's
    sidecar, JSON text in an ONNX file's metadata_props and an OpenVINO IR's rt_info."""
    def values(value: Any) -> tuple[float, float, float]:
        return tuple(json.loads(value) if isinstance(value, str) else value)

    return InputSpec(int(meta["input_size"]), values(meta["mean"]), values(meta["std"]))


def draw_augment(
    n: int, crop_padding: int, hflip: bool, generator: torch.Generator
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Random crop offsets (2, n) in [0, 2 * crop_padding] and flip flags (n,), drawn on the CPU from
    `generator` (so they do not depend on the device); None where that augmentation is off."""
    offsets = torch.randint(0, 2 * crop_padding + 1, (2, n), generator=generator) if crop_padding > 0 else None
    flips = torch.rand(n, generator=generator) < 0.5 if hflip else None
    return offsets, flips


def apply_augment(
    images: torch.Tensor, crop_padding: int, offsets: torch.Tensor | None, flips: torch.Tensor | None
) -> torch.Tensor:
    """Crop (zero padding of `crop_padding` pixels, at `offsets`) and flip (where `flips`) a uint8 batch,
    as one gather on the batch's own device."""
    n, _, h, w = images.shape
    out = images
    if offsets is not None:
        p = crop_padding
        offsets = offsets.to(images.device)
        padded = F.pad(images, (p, p, p, p))
        rows = (offsets[0, :, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (N,1,H,1)
        cols = (offsets[1, :, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (N,1,1,W)
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        out = padded[batch, channel, rows, cols]
    if flips is not None:
        flips = flips.to(images.device)
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out


def augment_batch(
    images: torch.Tensor, crop_padding: int, hflip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random crop (zero padding of `crop_padding` pixels) and random horizontal flip of a uint8 batch."""
    offsets, flips = draw_augment(len(images), crop_padding, hflip, generator)
    return apply_augment(images, crop_padding, offsets, flips)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, cfg: AugmentConfig, num_classes: int,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's `Mixup` (mixup and/or CutMix, one draw per batch) of a uint8 batch: (mixed uint8 images, targets
    (N, num_classes)). Each image is mixed with the batch's mirror image (the last with the first); the result
    is rounded back to uint8, so the teacher and the student both see exactly the mixed image. The draw is a pure
    function of `seed` (timm draws from numpy's global generator, seeded and restored around the call)."""
    from timm.data import Mixup

    from kdforge.data.stream import seeded

    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                  switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=0.0, num_classes=num_classes)
    with seeded(seed):
        mixed, targets = mixup(images.float(), labels)
    return mixed.round_().clamp_(0, 255).to(torch.uint8), targets
