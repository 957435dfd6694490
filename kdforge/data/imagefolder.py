"""Users' own data: an ImageFolder (`root/train/<class>/*.jpg|png...`, `root/test/<class>/*`) or WebDataset
shards made from one (`kdforge data shard`, kdforge/data/shards.py). Both are listed into `SampleRef`s and
labels without decoding anything, then read one of two ways (`[data] in_memory`, decided by `resolve_in_memory`):

- in memory: every image decoded ONCE, resized to the square `image_size`, into a decode cache on disk (a
  `.npy` file keyed by the file list, sizes, modification times and `image_size`) that every later stage, the
  estimate, export, verification and QAD read instead of decoding again (`CachedImages`);
- streamed: images decoded when a batch needs them, in DataLoader workers (`FileImages`); training views are
  timm's augmentations of the image at its source resolution, evaluation the same square resize.

Images are decoded by `kdforge.images` (the server's decoder: formats, pixel budget, 16-bit, transparency onto
white). Files with other extensions (notes, .DS_Store) are ignored; a training class folder without images is
an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdforge.data.dataset import CachedImages, DataSplits, ImageDataset, eval_batches
from kdforge.data.loader import prefetch
from kdforge.data.stream import FileImages, SampleRef
from kdforge.errors import DataError
from kdforge.fileio import atomic_path, remove_leftovers
from kdforge.layout import DECODED, user_cache_dir

if TYPE_CHECKING:
    from kdforge.recipe import DataConfig

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SPLITS = ("train", "test")
DECODER_VERSION = 2  # part of the decode cache's key: change it when kdforge.images decodes differently (2: EXIF)
MEMORY_SHARE = 0.25  # in_memory = "auto": in memory while the decoded set takes at most this share of free memory


@dataclass(frozen=True)
class SplitIndex:
    refs: list[SampleRef]
    labels: list[int]


@dataclass(frozen=True)
class FolderIndex:
    """What a dataset holds, listed without decoding: per split, where each image is and its label."""

    classes: tuple[str, ...]
    splits: dict[str, SplitIndex]
    source: str  # "ImageFolder" or "WebDataset"

    def count(self) -> int:
        return sum(len(split.refs) for split in self.splits.values())


def scan_imagefolder(root: str | Path) -> FolderIndex:
    root = Path(root)
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"ImageFolder dataset: {root / split} is not a folder (expected {root}/{split}/<class>/*)")
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"ImageFolder dataset: {root / 'train'} has no class folders")
    extra = sorted({p.name for p in (root / "test").iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise DataError(f"ImageFolder dataset: test classes not in train: {', '.join(extra)}")
    splits = {}
    for split in SPLITS:
        refs, labels = [], []
        for label, name in enumerate(classes):
            files = sorted(p for p in (root / split / name).glob("*") if p.suffix.lower() in EXTENSIONS)
            for file in files:
                check_regular(file)
            if not files and split == "train":
                raise DataError(f"ImageFolder dataset: {root / split / name} has no images ({', '.join(EXTENSIONS)}); "
                                f"a class needs training images: add some or remove the folder")
            refs += [SampleRef(str(p)) for p in files]
            labels += [label] * len(files)
        if not refs:
            raise DataError(f"{root / split}: no images ({', '.join(EXTENSIONS)}) in its class folders")
        splits[split] = SplitIndex(refs, labels)
    return FolderIndex(classes, splits, "ImageFolder")


def check_regular(path: Path) -> None:
    """An image must be a regular file (a link to one is fine): a FIFO would block the reader forever and a device
    such as /dev/zero never ends, so they are refused by type before anything opens them."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise DataError(f"{path}: {exc.strerror} (a broken link?); remove it or fix it") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
            else "a socket" if stat.S_ISSOCK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise DataError(f"{path} is {kind}, not an image file; remove it from the dataset")


# ----------------------------------------------------------------------------------------------------------
# in memory or streamed: one decision, said out loud


def decoded_bytes(index: FolderIndex, image_size: int) -> int:
    return index.count() * 3 * image_size * image_size


def available_memory() -> int:
    """Bytes of memory available to new work (MemAvailable on Linux; elsewhere a quarter of physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def resolve_in_memory(cfg: DataConfig, index: FolderIndex, free: int | None = None) -> tuple[bool, str]:
    """(in memory?, why) for `[data] in_memory` on this dataset: true/false as set; "auto" streams when the
    recipe asks for augmentations that crop from the source image (they need it), or when the decoded set would
    take more than MEMORY_SHARE of the available memory; otherwise the decode cache."""
    size = decoded_bytes(index, cfg.image_size)
    gb = f"{size / 1e9:.2f} GB decoded at {cfg.image_size}x{cfg.image_size}"
    if cfg.in_memory is True:
        return True, f"data.in_memory = true ({gb})"
    if cfg.in_memory is False:
        return False, "data.in_memory = false"
    if cfg.augment.needs_source_images():
        return False, f"data.augment: {', '.join(cfg.augment.source_image_keys())} crop from the source images"
    free = available_memory() if free is None else free
    if size > MEMORY_SHARE * free:
        return False, f"{gb} is more than {MEMORY_SHARE:.0%} of the {free / 1e9:.1f} GB of memory available"
    return True, f"{gb} fits in the {free / 1e9:.1f} GB of memory available"


def describe(cfg: DataConfig, index: FolderIndex, workers: int, decision: tuple[bool, str]) -> str:
    """One line: how many images, read how, and why (`decision`: `resolve_in_memory`'s answer)."""
    in_memory, why = decision
    counts = " + ".join(f"{len(s.refs):,} {name}" for name, s in index.splits.items())
    if not in_memory:
        how = f"streamed: decoded by {workers} worker{'s' * (workers != 1)} in every pass"
    elif all((cache_root() / f"{decode_key(s.refs, cfg.image_size)}.npy").is_file() for s in index.splits.values()):
        how = "in memory: read from the decode cache (decoded by an earlier run)"
    else:
        how = (f"in memory: each image decoded once (by {workers} worker{'s' * (workers != 1)}) into the decode "
               f"cache at {cfg.image_size}x{cfg.image_size}, which later stages read")
    return f"{index.source} {cfg.root}: {counts} images, {how} ({why})"


def read_folder_dataset(cfg: DataConfig, index: FolderIndex, workers: int) -> DataSplits:
    """The dataset's splits, in memory (the decode cache) or streamed, as `resolve_in_memory` decides."""
    decision = resolve_in_memory(cfg, index)  # once: the line printed is the path taken
    in_memory, description = decision[0], describe(cfg, index, workers, decision)
    splits = {}
    for name, split in index.splits.items():
        images = decode_cached(split.refs, cfg.image_size, workers) if in_memory \
            else FileImages(split.refs, cfg.image_size, cfg.augment, workers, cfg.decode)
        splits[name] = ImageDataset(images, torch.tensor(split.labels, dtype=torch.int64), index.classes)
    return DataSplits(splits["train"], splits["test"], description=description)


# ----------------------------------------------------------------------------------------------------------
# the decode cache


def cache_root() -> Path:
    """Where decoded datasets are kept: $KDFORGE_CACHE_DIR/decoded, else ~/.cache/kdforge/decoded."""
    return user_cache_dir() / DECODED


def decode_key(refs: list[SampleRef], size: int) -> str:
    """What a decoded set depends on: each image's place, size and modification time, the size, the decoder."""
    digest = hashlib.sha256(json.dumps({"decoder": DECODER_VERSION, "size": size}).encode())
    for ref in refs:
        if ref.version:  # a remote shard: its sha256 from the index
            digest.update(f"{ref.path}\0{ref.offset}\0{ref.length}\0{ref.version}\n".encode())
            continue
        try:
            info = os.stat(ref.path)
        except OSError as exc:
            raise DataError(f"{ref.path}: {exc.strerror}") from None
        digest.update(f"{ref.path}\0{ref.offset}\0{ref.length}\0{info.st_size}\0{info.st_mtime_ns}\n"
                      .encode("utf-8", "surrogateescape"))  # file names need not be UTF-8
    return digest.hexdigest()[:24]


def decode_cached(refs: list[SampleRef], size: int, workers: int, batch: int = 64) -> CachedImages:
    """The images decoded at `size`, read from the decode cache; decoded and written first when the cache
    does not hold them, each batch by a worker straight into the file (the main process holds no decoded image).
    The file's space is reserved first (a full disk fails before any decoding) and it appears whole or not at
    all (written, then renamed)."""
    path = cache_root() / f"{decode_key(refs, size)}.npy"
    shape = (len(refs), 3, size, size)
    if path.is_file():
        try:
            cached = CachedImages(str(path))
            if (len(cached), cached.size) == (len(refs), size):
                return cached
        except (OSError, ValueError):  # damaged: derived data, decoded again
            pass
    files = FileImages(refs, size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path.parent)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                offset = f.tell()
                table = offset + int(np.prod(shape))  # then a CRC-32 per row (CachedImages checks each read)
                if hasattr(os, "posix_fallocate"):  # not on macOS: there a full disk fails while writing
                    os.posix_fallocate(f.fileno(), 0, table + 4 * len(refs))

            def write(idx: torch.Tensor) -> int:
                rows = files[idx].numpy()
                crcs = np.array([zlib.crc32(row) for row in rows], dtype="<u4")
                fd = os.open(tmp, os.O_WRONLY)
                try:
                    os.pwrite(fd, rows.tobytes(), offset + int(idx[0]) * 3 * size * size)
                    os.pwrite(fd, crcs.tobytes(), table + 4 * int(idx[0]))
                finally:
                    os.close(fd)
                return len(idx)

            for _ in prefetch(write, eval_batches(len(refs), batch), workers):
                pass
    except OSError as exc:
        raise DataError(f"cannot write the decode cache {path} ({exc.strerror or exc}); set KDFORGE_CACHE_DIR to a "
                        f"writable folder with {np.prod(shape) / 1e9:.2f} GB free, or stream the data "
                        f"([data] in_memory = false)") from None
    return CachedImages(str(path))
