"""The teacher output cache: the teacher answers once per augmented view, training reads its answers.

    cache = load_or_build_cache(path, key, teacher, train_set, recipe.distill.teacher_cache, augment, seed, runtime)
    images, teacher_logits = cache.batch(train_set.images, idx, epoch)      # inside the training step

Every training image gets K views. A view's augmentation (crop offsets, flip; for streamed data timm's
augmentation in the decoding workers) is a pure function of (seed, view index, image index), so the cache
stores logits only and the views are re-made exactly when training reads them. Each epoch, every image draws
one of its K views (a function of seed, epoch and image index: a random start, then the next view each epoch).
With K = 1 and augmentation off this is classic offline distillation.

Logits are stored as FP16 (K x N x classes), or with `topk` as the k largest values and their class indices
plus, per image, the log-mean-exp of the remaining logits (the tail is rebuilt with that value, which keeps
its total probability mass exact at temperature 1 and approximate at others). The file
(`runs/<name>/teacher_cache.safetensors`) carries a key over the teacher's weights, the data, the augmentation
settings, the seed and the cache settings; a changed key regenerates it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdforge.data.dataset import ImageDataset, eval_batches
from kdforge.data.loader import prefetch
from kdforge.data.transforms import apply_augment, draw_augment
from kdforge.fileio import atomic_path
from kdforge.phases import Consumer, notify
from kdforge.rng import rng_stream
from kdforge.runtime import sync

if TYPE_CHECKING:
    from kdforge.distill.teacher import FrozenTeacher
    from kdforge.recipe import AugmentConfig, TeacherCacheConfig
    from kdforge.runtime import Runtime

FORMAT_VERSION = "1"


def view_augment(n: int, view: int, seed: int,
                 augment: AugmentConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Crop offsets (2, n) and flips (n,) of view `view` for all n training images: a function of (seed, view)
    indexed by image, drawn from a generator separate from the online one (seed, step)."""
    generator = rng_stream(seed, "cache_view", view)
    return draw_augment(n, augment.crop_padding, augment.hflip, generator)


def view_choice(n: int, views: int, seed: int, epoch: int) -> torch.Tensor:
    """Which stored view each of the n images uses in `epoch`: every image starts at a random view and moves
    to the next one each epoch, so K epochs show it K different views (as many as online augmentation would;
    drawing a view at random each epoch repeats some and showed fewer)."""
    generator = rng_stream(seed, "cache_start_view")
    return (torch.randint(0, views, (n,), generator=generator) + epoch) % views


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps({**parts, "format": FORMAT_VERSION}, sort_keys=True).encode()).hexdigest()[:16]


class TeacherCache:
    """Stored teacher logits for K views of every training image, and the views themselves on demand."""

    def __init__(self, tensors: dict[str, torch.Tensor], num_images: int, seed: int, augment: AugmentConfig,
                 device: torch.device, streamed: bool = False) -> None:
        self.tensors = {name: t.to(device) for name, t in tensors.items()}
        # views from the answers themselves: the file lists its tensors largest dtype first, so the first one read
        # back may be top-k's num_classes (a K-view top-k cache once counted 1 view and trained on view 0 alone)
        views = int(self.tensors["logits" if "logits" in self.tensors else "values"].shape[0])
        self._setup(views, num_images, seed, augment, device, streamed)

    def _setup(self, views: int, num_images: int, seed: int, augment: AugmentConfig, device: torch.device,
               streamed: bool) -> None:
        """The views' augmentation parameters (data in memory) and the per-epoch view choice."""
        self.views, self.num_images, self.seed, self.augment = views, num_images, seed, augment
        params = [view_augment(num_images, v, seed, augment) for v in range(self.views)] if not streamed else []
        self.offsets = torch.stack([p[0] for p in params]).to(device) if params and augment.crop_padding > 0 else None
        self.flips = torch.stack([p[1] for p in params]).to(device) if params and augment.hflip else None
        self._epoch, self._choice = -1, torch.empty(0)

    def choice(self, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """The view each of the images `idx` shows in `epoch`."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._choice = view_choice(self.num_images, self.views, self.seed, epoch)
        return self._choice.to(idx.device)[idx]

    def logits(self, view: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Float32 teacher logits (B, classes) of images `idx`, each in its view."""
        rows = {name: t[view, idx] for name, t in self.tensors.items() if name != "num_classes"}
        return stored_logits(rows, int(self.tensors["num_classes"][0]) if "num_classes" in self.tensors else 0)

    def batch(self, images: torch.Tensor, idx: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented uint8 images, teacher logits) of training images `idx` in `epoch` (data in memory)."""
        view = self.choice(idx, epoch)
        offsets = self.offsets[view, :, idx].T if self.offsets is not None else None
        flips = self.flips[view, idx] if self.flips is not None else None
        return (apply_augment(images[idx].to(idx.device), self.augment.crop_padding, offsets, flips),
                self.logits(view, idx))


def stored_logits(rows: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """Float32 logits from a batch's stored rows: the FP16 logits as they are, or (top-k) the k values at their
    classes and the tail's log-mean-exp everywhere else (`num_classes` wide)."""
    if "logits" in rows:
        return rows["logits"].float()
    tail = rows["tail"].float()
    dense = tail[:, None].expand(len(tail), num_classes).clone()
    return dense.scatter_(1, rows["indices"].long(), rows["values"].float())


@torch.inference_mode()
def build_cache_tensors(teacher: FrozenTeacher, train: ImageDataset, cfg: TeacherCacheConfig, augment: AugmentConfig,
                        seed: int, runtime: Runtime, progress: Callable[[int, int], None] | None = None,
                        rows: range | None = None) -> dict[str, torch.Tensor]:
    """Run the teacher once per view of every image (large batches, the runtime's mixed precision); `rows`: of
    those training images only (a shard of the sharded store), each in the view it has in the whole set."""
    n = len(train)
    rows = rows if rows is not None else range(n)
    images = train.images.to(runtime.device)
    topk = cfg.topk
    out: dict[str, list[torch.Tensor]] = {}
    batches = [rows.start + batch for batch in eval_batches(len(rows), cfg.batch_size)]
    for view in range(cfg.views):
        if train.streamed:  # the view made by the decoding workers, as training will make it again
            views = prefetch(lambda idx, view=view: images.views(idx, seed, view, "cache_image_view"), batches,
                             images.workers)
        else:
            offsets, flips = view_augment(n, view, seed, augment)
            views = (apply_augment(images[idx.to(runtime.device)].to(runtime.device), augment.crop_padding,
                                   offsets[:, idx] if offsets is not None else None,
                                   flips[idx] if flips is not None else None) for idx in batches)
        for i, x in enumerate(views):
            x = x.to(runtime.device)
            with runtime.autocast():
                logits = teacher(x).float()
            if topk is None or topk >= logits.shape[1]:
                parts = {"logits": logits.half()}
            else:
                values, indices = logits.topk(topk, dim=1)
                rest = logits.scatter(1, indices, float("-inf"))
                tail = torch.logsumexp(rest, dim=1) - torch.log(torch.tensor(logits.shape[1] - topk))
                parts = {"values": values.half(), "indices": indices.int(), "tail": tail.half()}
            for name, value in parts.items():
                out.setdefault(name, []).append(value.cpu())
            if progress:
                progress(view * len(batches) + i + 1, cfg.views * len(batches))
    tensors = {name: torch.cat(chunks).reshape(cfg.views, len(rows), *chunks[0].shape[1:])
               for name, chunks in out.items()}
    if "values" in tensors:
        tensors["num_classes"] = torch.tensor([logits.shape[1]])
    return tensors


DAMAGED = "<damaged>"


def load_or_build_cache(path: Path, key: str, teacher: FrozenTeacher, train: ImageDataset, cfg: TeacherCacheConfig,
                        augment: AugmentConfig, seed: int, runtime: Runtime,
                        consumers: Iterable[Consumer] = ()) -> TeacherCache:
    """The cache at `path` when its key matches; otherwise the teacher's answers are generated (by the main
    process when several train together) and written atomically. Every process then loads the file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file, save_file

    def stored_key() -> str | None:
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as handle:
                return (handle.metadata() or {}).get("key")
        except (SafetensorError, OSError, ValueError):  # truncated or not ours: derived data, made again
            return DAMAGED

    if runtime.is_main:
        found = stored_key()
        if found != key:
            why = {None: "", DAMAGED: f"{path.name} is damaged, "}.get(found, "key changed (teacher, data or "
                                                                             "augmentation), ")
            notify(consumers, f"teacher cache: {why}running the teacher on {cfg.views} view(s) of {len(train)} images")
            reported = [0]

            def progress(done: int, total: int) -> None:
                if done * 10 // total > reported[0]:
                    reported[0] = done * 10 // total
                    notify(consumers, f"teacher cache: {done}/{total} batches")

            tensors = build_cache_tensors(teacher, train, cfg, augment, seed, runtime, progress)
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"key": key, "views": str(cfg.views), "topk": str(cfg.topk)})
        else:
            notify(consumers, f"teacher cache: reusing {path} ({cfg.views} view(s))")
    sync()
    return TeacherCache(load_file(str(path)), len(train), seed, augment, runtime.device, train.streamed)
