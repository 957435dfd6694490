"""The sharded teacher store: the teacher cache as many small safetensors files, built by every process, read by
position without loading it (`[distill.teacher_cache] store`).

    cache = load_or_build_store(folder, key, teacher, train_set, cfg, augment, seed, runtime)   # every rank
    images, teacher_logits = cache.batch(train_set.images, idx, epoch)    # as TeacherCache; rows read from disk

The single-file cache (distill/cache.py) is loaded whole by every process: fine for CIFAR, not for ImageNet-size
sets (1.28 M images x 10 views x 1,000 FP16 logits is 25 GB). The store keeps the same answers (the same views,
FP16 or top-k, the same key over the teacher's weights, the data, the augmentation, the seed and the settings) in
`<store>/<key>/shard-NNNNNN.safetensors`, each shard the `shard_images` consecutive training images of every view:

- **built in parallel**: rank r of W builds shards r, r + W, ...; each shard is written to a temporary file and
  renamed into place, so a killed build keeps its whole shards and the next one builds only the missing ones;
- **read by position**: a shard's tensors are memory-mapped (numpy over the file's documented safetensors layout:
  an 8-byte header length, a JSON header of dtypes, shapes and byte offsets, the raw data), and a batch reads
  only its rows, so memory stays flat in the dataset size (the page cache holds what was read);
- **reused by key**: `<store>` may be any folder, e.g. one shared by several runs: a run whose key matches reads
  the shards another run (or machine) wrote; a shard whose header, key or size does not match is built again.

A shard is checked before it is trusted: its header must parse, every tensor lie inside the file with the byte
length its dtype and shape need, its shape be the one the key implies, and its metadata carry the key.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdforge.data.dataset import ImageDataset
from kdforge.distill.cache import TeacherCache, build_cache_tensors, stored_logits
from kdforge.errors import KdforgeError
from kdforge.fileio import atomic_path
from kdforge.phases import Consumer, notify
from kdforge.runtime import sync

if TYPE_CHECKING:
    from kdforge.distill.teacher import FrozenTeacher
    from kdforge.recipe import AugmentConfig, TeacherCacheConfig
    from kdforge.runtime import Runtime

SHARD = "shard-{:06d}.safetensors"
MAX_HEADER_BYTES = 1 << 20
DTYPES = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64}


def shard_ranges(n: int, shard_images: int) -> list[range]:
    return [range(start, min(start + shard_images, n)) for start in range(0, n, shard_images)]


def expected_shapes(views: int, rows: int, num_classes: int, topk: int | None) -> dict[str, tuple[int, ...]]:
    if topk is None or topk >= num_classes:
        return {"logits": (views, rows, num_classes)}
    return {"values": (views, rows, topk), "indices": (views, rows, topk), "tail": (views, rows)}


def map_shard(path: Path, key: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
    """The shard's tensors as read-only memory maps, or None when it is missing, damaged or not this key's."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_bytes = struct.unpack("<Q", f.read(8))[0]
            if not 0 < header_bytes <= min(MAX_HEADER_BYTES, size - 8):
                return None
            header = json.loads(f.read(header_bytes))
    except (OSError, struct.error, ValueError, RecursionError):
        return None
    if not isinstance(header, dict) or (header.get("__metadata__") or {}).get("key") != key:
        return None
    tensors = {}
    for name, shape in shapes.items():
        info = header.get(name)
        try:
            dtype = np.dtype(DTYPES[info["dtype"]])
            begin, end = (int(x) for x in info["data_offsets"])
            if tuple(info["shape"]) != shape or not 0 <= begin <= end <= size - 8 - header_bytes \
                    or end - begin != dtype.itemsize * int(np.prod(shape)):
                return None
        except (KeyError, TypeError, ValueError):
            return None
        tensors[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + header_bytes + begin, shape=shape)
    return tensors


class ShardedTeacherCache(TeacherCache):
    """A TeacherCache whose logits are read from the store's memory-mapped shards, a batch's rows at a time."""

    def __init__(self, shards: list[dict[str, np.ndarray]], shard_images: int, num_classes: int, views: int,
                 num_images: int, seed: int, augment: AugmentConfig, device: torch.device, streamed: bool) -> None:
        self.shards, self.shard_images, self.num_classes = shards, shard_images, num_classes
        self._setup(views, num_images, seed, augment, device, streamed)

    def logits(self, view: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        where, views = idx.cpu().numpy(), view.cpu().numpy()
        shard_of, row = where // self.shard_images, where % self.shard_images
        names = self.shards[0].keys()
        rows: dict[str, np.ndarray] = {}
        for shard in np.unique(shard_of):
            mine = shard_of == shard
            for name in names:
                part = self.shards[shard][name][views[mine], row[mine]]
                if name not in rows:
                    rows[name] = np.empty((len(where), *part.shape[1:]), dtype=part.dtype)
                rows[name][mine] = part
        return stored_logits({name: torch.from_numpy(part).to(idx.device) for name, part in rows.items()},
                             self.num_classes)


def load_or_build_store(folder: Path, key: str, teacher: FrozenTeacher, train: ImageDataset, cfg: TeacherCacheConfig,
                        augment: AugmentConfig, seed: int, runtime: Runtime, num_classes: int,
                        consumers: Iterable[Consumer] = ()) -> ShardedTeacherCache:
    """The store `folder`/`key`/: the shards this process's rank owns that are missing or not whole are built
    (every rank in parallel), then every process maps all of them."""
    build_shards(folder, key, teacher, train, cfg, augment, seed, runtime, num_classes, consumers)
    sync()
    return open_store(folder, key, train, cfg, augment, seed, runtime, num_classes)


def build_shards(folder: Path, key: str, teacher: FrozenTeacher, train: ImageDataset, cfg: TeacherCacheConfig,
                 augment: AugmentConfig, seed: int, runtime: Runtime, num_classes: int,
                 consumers: Iterable[Consumer] = ()) -> list[int]:
    """Build the shards of this process's rank (r, r + W, ...) that are missing or not whole; returns them."""
    from safetensors.torch import save_file

    root = folder / key
    ranges = shard_ranges(len(train), cfg.shard_images)
    mine = [i for i in range(len(ranges)) if i % runtime.world_size == runtime.rank]
    missing = [i for i in mine if map_shard(root / SHARD.format(i), key,
                                            expected_shapes(cfg.views, len(ranges[i]), num_classes, cfg.topk)) is None]
    if not missing:
        notify(consumers, f"teacher store: reusing {root} ({len(ranges)} shards)")
        return []
    notify(consumers, f"teacher store: building {len(missing)} of {len(ranges)} shards in {root} "
                      f"({cfg.views} view(s), {cfg.shard_images} images a shard)")
    root.mkdir(parents=True, exist_ok=True)
    for done, i in enumerate(missing, 1):
        tensors = build_cache_tensors(teacher, train, cfg, augment, seed, runtime, rows=ranges[i])
        tensors.pop("num_classes", None)
        with atomic_path(root / SHARD.format(i)) as tmp:
            save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata={"key": key})
        notify(consumers, f"teacher store: shard {i} written ({done}/{len(missing)})")
    return missing


def open_store(folder: Path, key: str, train: ImageDataset, cfg: TeacherCacheConfig, augment: AugmentConfig,
               seed: int, runtime: Runtime, num_classes: int) -> ShardedTeacherCache:
    """Every shard of the store, memory-mapped; one missing or damaged is an error naming it."""
    root = folder / key
    ranges = shard_ranges(len(train), cfg.shard_images)
    mapped = [map_shard(root / SHARD.format(i), key, expected_shapes(cfg.views, len(r), num_classes, cfg.topk))
              for i, r in enumerate(ranges)]
    bad = [SHARD.format(i) for i, shard in enumerate(mapped) if shard is None]
    if bad:
        raise KdforgeError(f"teacher store {root}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} missing or "
                           f"damaged after the build; run again to build them")
    return ShardedTeacherCache(mapped, cfg.shard_images, num_classes, cfg.views, len(train), seed, augment,
                               runtime.device, train.streamed)
