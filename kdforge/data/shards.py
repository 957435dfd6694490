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
bytes directly, so shuffling, resuming and splitting across processes work as for an ImageFolder. `DIR/index.json`
records those positions (each sample's shard, offset, length and label, each shard's sha256): shards served over
HTTP(S) are read through it by range requests (`data/remote.py`), `root = "https://host/DIR"`.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kdforge.data import remote
from kdforge.data.imagefolder import SPLITS, FolderIndex, SplitIndex, scan_imagefolder
from kdforge.data.stream import SampleRef
from kdforge.errors import DataError
from kdforge.fileio import atomic_path, atomic_write_text, file_hash, read_json, remove_leftovers, write_json
from kdforge.phases import Consumer, notify

CLASSES = "classes.txt"
PLAN = ".kdforge-shards.json"  # which images, in which order, at which shard size (for resuming)
WRITTEN = "written"  # the plan's record of the shards written whole: "split/shard-NNNNNN.tar" -> sha256
MAX_LABEL_BYTES = 32  # a .cls member is a decimal class number; longer is not one
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
                 consumers: Iterable[Consumer] = (), max_size: int | None = None) -> ShardResult:
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
    earlier = read_json(out / PLAN) if (out / PLAN).is_file() else None
    if earlier is not None and {k: v for k, v in earlier.items() if k != WRITTEN} != plan:
        raise DataError(f"{out} holds shards of another folder, file list, --shard-size or --max-size; remove it or "
                        f"choose another --out")
    if earlier is None:
        _check_unowned(out)
    written_hashes: dict[str, str] = dict((earlier or {}).get(WRITTEN, {}))
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / PLAN, {**plan, WRITTEN: written_hashes})  # a second run resumes only the same plan
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
            name = f"{split}/{path.name}"
            if name in written_hashes and path.is_file() and file_hash(path) == written_hashes[name]:
                kept += 1
                continue  # a shard an earlier call wrote whole; anything else at this name is written again
            try:
                with atomic_path(path) as tmp, open(tmp, "wb") as stream, TarWriter(stream, mtime=0) as sink:
                    for position in range(start, min(start + shard_size, len(data.refs))):
                        ext, payload = _member(Path(data.refs[position].path), max_size)
                        sink.write({"__key__": f"{position:08d}", ext: payload,
                                    "cls": str(data.labels[position]).encode()})
                written_hashes[name] = file_hash(path)
                write_json(out / PLAN, {**plan, WRITTEN: written_hashes})
            except OSError as exc:
                raise DataError(f"writing {path}: {exc.strerror or exc}") from None
            written += 1
            notify(consumers, f"{split}: {path.name} ({min(start + shard_size, len(data.refs)):,}/{len(data.refs):,})")
    write_index(out)
    return ShardResult(out, written, kept, {split: len(data.refs) for split, data in index.splits.items()})


def _check_unowned(out: Path) -> None:
    """A new --out may not already hold shards or a classes.txt: kdforge would take them for its own."""
    if not out.is_dir():
        return
    found = [out / CLASSES] if (out / CLASSES).exists() else []
    for split in SPLITS:
        if (out / split).is_dir():
            found += sorted((out / split).glob("*.tar"))
    if found:
        raise DataError(f"{out} already holds {found[0].relative_to(out)}, which kdforge did not write (no "
                        f"{PLAN} plan beside it); choose an empty --out or remove what is there")


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


def write_index(root: str | Path) -> Path:
    """DIR/index.json: every sample's place (shard, offset, length) and label, and each shard's sha256, read from
    the shards themselves (`kdforge data index DIR` for shards written by other tools or older kdforge)."""
    root = Path(root)
    listing = scan_shards(root)
    index: dict = {"kind": remote.INDEX_KIND, "version": 1, "classes": list(listing.classes), "splits": {}}
    for split, data in listing.splits.items():
        shards: dict[str, dict] = {}
        for ref, label in zip(data.refs, data.labels, strict=True):
            name = Path(ref.path).relative_to(root).as_posix()
            if name not in shards:
                shards[name] = {"shard": name, "sha256": file_hash(Path(ref.path)), "samples": []}
            shards[name]["samples"].append([ref.offset, ref.length, int(label)])
        index["splits"][split] = list(shards.values())
    try:
        write_json(root / remote.INDEX, index)
    except OSError as exc:
        raise DataError(f"cannot write {root / remote.INDEX}: {exc.strerror}") from None
    return root / remote.INDEX


def scan_remote(root: str) -> FolderIndex:
    """The samples of shards served at the URL `root`, from its index.json: each image a range of its shard's URL
    (tagged with the shard's sha256, what the decode cache keys on), its label checked against the classes."""
    index = remote.read_index(root)
    base = root.rstrip("/")
    try:
        classes = tuple(index["classes"])
        if not classes or len(set(classes)) != len(classes) or not all(isinstance(c, str) for c in classes):
            raise ValueError("the class names must be distinct strings")
        splits = {}
        for split in SPLITS:
            refs, labels = [], []
            for shard in index["splits"][split]:
                name = str(shard["shard"])
                if name.startswith("/") or ".." in name.split("/"):
                    raise ValueError(f"shard path {name!r} leaves the dataset's folder")
                for offset, length, label in shard["samples"]:
                    if not (isinstance(offset, int) and isinstance(length, int) and isinstance(label, int)
                            and offset >= 0 and length >= 0 and 0 <= label < len(classes)):
                        raise ValueError(f"{name}: sample {[offset, length, label]} is not an offset, a length and "
                                         f"a label below {len(classes)}")
                    refs.append(SampleRef(f"{base}/{name}", offset, length, version=str(shard["sha256"])))
                    labels.append(label)
            if not refs:
                raise ValueError(f"no samples in the {split} split")
            splits[split] = SplitIndex(refs, labels)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{base}/{remote.INDEX}: not a whole shards index ({exc}); write it again with `kdforge data "
                        f"index`") from None
    return FolderIndex(classes, splits, "WebDataset over HTTP")


def scan_shards(root: str | Path) -> FolderIndex:
    """List the samples of the shards in `root` (see the module docstring): where each image's bytes are, and its
    label, reading only the tar headers and the small .cls members; a URL root through its index.json."""
    if remote.is_url(root):
        return scan_remote(str(root))
    root = Path(root)
    if not (root / CLASSES).is_file():
        raise DataError(f"WebDataset dataset: {root / CLASSES} is missing (one class name a line; `kdforge data "
                        f"shard IMAGEFOLDER --out {root}` writes it with the shards)")
    classes = read_classes(root / CLASSES)
    splits = {}
    for split in SPLITS:
        shards = sorted((root / split).glob("*.tar")) if (root / split).is_dir() else []
        if not shards:
            raise DataError(f"WebDataset dataset: no shards (*.tar) in {root / split}")
        refs, labels = [], []
        for shard in shards:
            if not shard.is_file():  # a FIFO or a device would block or never end
                raise DataError(f"WebDataset dataset: {shard} is not a regular file")
            for ref, label in _samples(shard, len(classes)):
                refs.append(ref)
                labels.append(label)
        splits[split] = SplitIndex(refs, labels)
    return FolderIndex(classes, splits, "WebDataset")


def read_classes(path: Path) -> tuple[str, ...]:
    """The class names of classes.txt, one a line in label order: present, distinct, at least one."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"WebDataset dataset: cannot read {path} ({getattr(exc, 'strerror', None) or exc})") from None
    classes = tuple(line.strip() for line in lines if line.strip())
    if not classes:
        raise DataError(f"WebDataset dataset: {path} lists no classes")
    seen: dict[str, int] = {}
    for number, name in enumerate(classes):
        if name in seen:
            raise DataError(f"WebDataset dataset: {path} lists class {name!r} twice (labels {seen[name]} and "
                            f"{number}); each class name once, in label order")
        seen[name] = number
    return classes


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member, WebDataset's way: the key is the path up to the first dot of its FILE
    name (`./a/00000001.jpg` -> `./a/00000001`, `jpg`), so dots in folder names and GNU tar's `./` keep samples
    whole."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext if dot else "")


def _samples(shard: Path, num_classes: int):
    """(SampleRef of the image, label) of each sample of one shard, in the shard's order. Every member that is
    an image or a label belongs to a whole sample, else the shard is refused with the member named: a shard is
    read as written or not at all."""
    images: dict[str, SampleRef] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                key, ext = split_member(member.name)
                if member.isdir() or ext.lower() not in (*IMAGE_EXTENSIONS, "cls"):
                    continue  # folders, and what a sample may carry beside (.json, .txt): not read
                if not member.isfile():
                    raise DataError(f"{shard}: member {member.name!r} is a link or special file, not the sample's "
                                    f"bytes; write the shard again (kdforge data shard)")
                if ext == "cls":
                    if key in labels:
                        raise DataError(f"{shard}: sample {key!r} has two labels")
                    labels[key] = _label(shard, tar, member, num_classes)
                elif key in images:
                    raise DataError(f"{shard}: sample {key!r} has two images (the second: {member.name!r})")
                else:
                    images[key] = SampleRef(str(shard), member.offset_data, member.size)
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{shard}: not a readable tar shard ({exc})") from None
    for missing, have, what in ((set(images) - set(labels), images, "an image but no .cls label"),
                                (set(labels) - set(images), labels, "a .cls label but no image")):
        if missing:
            raise DataError(f"{shard}: sample {sorted(missing)[0]!r} has {what} ({len(missing)} such samples of "
                            f"{len(have)})")
    if not images:
        raise DataError(f"{shard}: holds no samples (an image and a .cls label per key); remove it or write the "
                        f"shards again")
    return [(images[key], labels[key]) for key in images]


def _label(shard: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, num_classes: int) -> int:
    """The class number a .cls member holds (decimal ASCII digits, below `num_classes`)."""
    data = tar.extractfile(member).read(MAX_LABEL_BYTES + 1) if member.size <= MAX_LABEL_BYTES else b""
    text = data.decode("ascii", errors="replace").strip()
    if not (text.isascii() and text.isdigit()) or int(text) >= num_classes:
        shown = text[:20] if data else f"{member.size:,} bytes"
        raise DataError(f"{shard}: {member.name} holds {shown!r}, not a class number below {num_classes}")
    return int(text)
