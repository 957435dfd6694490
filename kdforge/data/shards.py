"""WebDataset shards: a dataset as a few large tar files instead of many small ones (what timm and OpenCLIP train
from; one sequential read per shard on network file systems and object stores).

    write_shards("data/photos", "data/photos-shards", shard_size=1000)   # `kdforge data shard`
    index = scan_shards("data/photos-shards")                            # `dataset = "webdataset"`

Layout: `DIR/classes.txt` (one class name a line, in label order) and `DIR/<split>/shard-NNNNNN.tar` for the
splits `train` and `test`. A sample is two tar members sharing a key, WebDataset's convention:
`<key>.<ext>` (the image file's own bytes, not re-encoded; with `max_size`, an image whose longer side is above it
is stored upright as a JPEG of that longer side instead, FFCV's way of making data cheap to decode) and
`<key>.cls` (the label as decimal text), so
`webdataset.WebDataset` reads the shards too. Shards are written with WebDataset's `TarWriter`, each to a
temporary file renamed when complete: a killed run leaves whole shards only, and running it again writes only
the missing ones (the assignment of images to shards is a pure function of the sorted file list).

kdforge reads shards by position: `tarfile` lists each member's offset once, and a worker reads one image's
bytes directly, so shuffling, resuming and splitting across processes work as for an ImageFolder.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kdforge.data.imagefolder import SPLITS, FolderIndex, SplitIndex, scan_imagefolder
from kdforge.data.stream import SampleRef
from kdforge.errors import DataError
from kdforge.fileio import atomic_path, atomic_write_text, read_json, remove_leftovers, write_json

CLASSES = "classes.txt"
PLAN = ".kdforge-shards.json"  # which images, in which order, at which shard size (for resuming)
SHARD = "shard-{:06d}.tar"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MIN_MAX_SIZE = 32  # --max-size below this would leave less than the smallest model input
RESIZED_QUALITY = 90  # JPEG quality of the images --max-size re-encodes


@dataclass(frozen=True)
class ShardResult:
    out: Path
    written: int  # shards written by this call
    kept: int  # complete shards an earlier call had written
    images: dict[str, int]  # per split


def write_shards(imagefolder: str | Path, out: str | Path, shard_size: int = 1000,
                 progress: Callable[[str], None] | None = None, max_size: int | None = None) -> ShardResult:
    """Write the ImageFolder `imagefolder` as WebDataset shards of `shard_size` images into `out` (see above);
    with `max_size`, images larger than that (longer side) are stored resized to it."""
    from kdforge.optional import require

    TarWriter = require("webdataset").TarWriter

    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1 (got {shard_size})")
    if max_size is not None and max_size < MIN_MAX_SIZE:
        raise DataError(f"--max-size must be at least {MIN_MAX_SIZE} pixels (got {max_size}); it should be at least "
                        f"the input size the recipe trains at")
    index = scan_imagefolder(imagefolder)  # every input is checked before anything is written
    out = Path(out)
    plan = {"shard_size": shard_size, "classes": list(index.classes),
            "images": {split: [str(Path(ref.path).relative_to(imagefolder)) for ref in data.refs]
                       for split, data in index.splits.items()}}
    if max_size is not None:
        plan["max_size"] = max_size
    if (out / PLAN).is_file() and read_json(out / PLAN) != plan:
        raise DataError(f"{out} holds shards of another folder, file list, --shard-size or --max-size; remove it or "
                        f"choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / PLAN, plan)  # what the shards hold: a second run resumes only the same plan
        atomic_write_text(out / CLASSES, "".join(f"{name}\n" for name in index.classes))
    except OSError as exc:
        raise DataError(f"cannot write shards into {out}: {exc.strerror}") from None
    written = kept = 0
    for split, data in index.splits.items():
        folder = out / split
        folder.mkdir(exist_ok=True)
        remove_leftovers(folder)  # shards a killed run left half-written
        for number, start in enumerate(range(0, len(data.refs), shard_size)):
            path = folder / SHARD.format(number)
            if path.is_file():
                kept += 1
                continue
            try:
                with atomic_path(path) as tmp, open(tmp, "wb") as stream, TarWriter(stream, mtime=0) as sink:
                    for position in range(start, min(start + shard_size, len(data.refs))):
                        ext, payload = _member(Path(data.refs[position].path), max_size)
                        sink.write({"__key__": f"{position:08d}", ext: payload,
                                    "cls": str(data.labels[position]).encode()})
            except OSError as exc:
                raise DataError(f"writing {path}: {exc.strerror or exc}") from None
            written += 1
            if progress:
                progress(f"{split}: {path.name} ({min(start + shard_size, len(data.refs)):,}/{len(data.refs):,})")
    return ShardResult(out, written, kept, {split: len(data.refs) for split, data in index.splits.items()})


def _member(image: Path, max_size: int | None) -> tuple[str, bytes]:
    """(extension, bytes) of one image as a shard stores it: the file's own bytes, or with `max_size` and a longer
    side above it, the upright image resized to that longer side (antialiased) as a JPEG."""
    from PIL import Image

    from kdforge.images import ImageError, open_rgb

    data = image.read_bytes()
    ext = image.suffix.lower().lstrip(".")
    if max_size is None:
        return ext, data
    try:
        with Image.open(image) as header:
            if max(header.size) <= max_size:
                return ext, data
        upright = open_rgb(data, max_size)  # a JPEG decoded reduced while it stays >= max_size a side
    except (ImageError, OSError) as exc:
        raise DataError(f"{image}: {exc}; remove or replace this image") from None
    scale = max_size / max(upright.size)
    if scale < 1:
        size = (max(1, round(upright.width * scale)), max(1, round(upright.height * scale)))
        upright = upright.resize(size, Image.Resampling.LANCZOS)
    stream = io.BytesIO()
    upright.save(stream, "JPEG", quality=RESIZED_QUALITY)
    return "jpg", stream.getvalue()


def scan_shards(root: str | Path) -> FolderIndex:
    """List the samples of the shards in `root` (see the module docstring): where each image's bytes are, and its
    label, reading only the tar headers and the small .cls members."""
    root = Path(root)
    if not (root / CLASSES).is_file():
        raise DataError(f"WebDataset dataset: {root / CLASSES} is missing (one class name a line; `kdforge data "
                        f"shard IMAGEFOLDER --out {root}` writes it with the shards)")
    classes = tuple(line.strip() for line in (root / CLASSES).read_text().splitlines() if line.strip())
    if not classes:
        raise DataError(f"WebDataset dataset: {root / CLASSES} lists no classes")
    splits = {}
    for split in SPLITS:
        shards = sorted((root / split).glob("*.tar")) if (root / split).is_dir() else []
        if not shards:
            raise DataError(f"WebDataset dataset: no shards (*.tar) in {root / split}")
        refs, labels = [], []
        for shard in shards:
            for ref, label in _samples(shard, len(classes)):
                refs.append(ref)
                labels.append(label)
        splits[split] = SplitIndex(refs, labels)
    return FolderIndex(classes, splits, "WebDataset")


def _samples(shard: Path, num_classes: int):
    """(SampleRef of the image, label) of each sample of one shard, in the shard's order."""
    images: dict[str, SampleRef] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if ext.lower() in IMAGE_EXTENSIONS:
                    images[key] = SampleRef(str(shard), member.offset_data, member.size)
                elif ext == "cls":
                    text = tar.extractfile(member).read().decode(errors="replace").strip()
                    if not text.isdigit() or int(text) >= num_classes:
                        raise DataError(f"{shard}: {member.name} holds {text[:20]!r}, not a class number below "
                                        f"{num_classes}")
                    labels[key] = int(text)
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{shard}: not a readable tar shard ({exc})") from None
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled:
        raise DataError(f"{shard}: sample {unlabelled[0]} has an image but no .cls label "
                        f"({len(unlabelled)} such samples)")
    return [(images[key], labels[key]) for key in images]
