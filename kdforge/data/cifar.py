"""CIFAR-100 in its official python format: `cifar-100-python/{train,test,meta}`.

Each file is a pickled dict; `data` is a uint8 array of shape (N, 3072) holding the red, green and blue
32x32 planes of each image one after another. Files are md5-checked, then unpickled through a restricted
unpickler that can build only the numpy arrays the format needs, and decoded once into uint8 tensors.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdforge.data.dataset import DataSplits, ImageDataset
from kdforge.errors import DataError
from kdforge.fileio import atomic_path, file_hash

FOLDER = "cifar-100-python"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
# the checksums torchvision uses for the official files
OFFICIAL_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# (module, name) pairs a CIFAR pickle may reference, and what they resolve to
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,  # how protocol-2 pickles spell bytes
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numbers, strings and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of the CIFAR-100 format")
        return resolve()


def read_pickle(path: Path, expected_md5: str) -> dict[str, Any]:
    actual = file_hash(path, "md5")
    if actual != expected_md5:
        raise DataError(
            f"{path}: md5 mismatch (expected {expected_md5}, got {actual}): not the complete official file. "
            f"A broken download: move it aside and download again (kdforge never deletes it); your own images: "
            f"use dataset = \"imagefolder\""
        )
    try:
        with path.open("rb") as f:
            obj = RestrictedUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a CIFAR-100 python file: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR-100 python file: expected a dict, got {type(obj).__name__}")
    return obj


def _split_to_dataset(path: Path, obj: dict[str, Any], classes: tuple[str, ...]) -> ImageDataset:
    try:
        data = np.asarray(obj["data"], dtype=np.uint8)
        labels = np.asarray(obj["fine_labels"], dtype=np.int64)
    except KeyError as exc:
        raise DataError(f"{path}: not a CIFAR-100 python file: missing key {exc}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape}, {len(labels)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{path}: labels outside 0..{len(classes) - 1}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return ImageDataset(images=images, labels=torch.from_numpy(labels), classes=classes)


def read_cifar100(root: str | Path, md5: dict[str, str] | None = None) -> DataSplits:
    """Read `root/cifar-100-python/` (official checksums unless `md5` gives others, as for synthetic data)."""
    folder = Path(root) / FOLDER
    md5 = md5 or OFFICIAL_MD5
    missing = [name for name in ("train", "test", "meta") if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-100 not found: {folder} lacks {', '.join(missing)}. Set `data.download = true` to fetch it "
            f"(needs network), or download {URL} and extract it into {Path(root)}/"
        )
    meta = read_pickle(folder / "meta", md5["meta"])
    try:
        classes = tuple(str(name) for name in meta["fine_label_names"])
    except KeyError:
        raise DataError(f"{folder / 'meta'}: missing fine_label_names") from None
    splits = {
        split: _split_to_dataset(folder / split, read_pickle(folder / split, md5[split]), classes)
        for split in ("train", "test")
    }
    return DataSplits(train=splits["train"], test=splits["test"])


def download_cifar100(root: str | Path) -> None:
    """Fetch and md5-check the official archive the way torchvision does, then extract it under root."""
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(URL, download_root=str(root), filename=ARCHIVE, md5=ARCHIVE_MD5)
    except Exception as exc:  # network errors come in many types (URLError, OSError, RuntimeError, ...)
        raise DataError(
            f"could not download CIFAR-100 from {URL}: {exc}. Offline? Download the archive elsewhere and "
            f"extract it into {Path(root)}/"
        ) from None


def write_cifar100(
    root: str | Path,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    fine_names: list[str],
    coarse_of_fine: list[int],
    coarse_names: list[str],
) -> dict[str, str]:
    """Write images (N, 32, 32, 3 uint8) and labels in the official format; returns each file's md5."""
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    batch_labels = {"train": "training batch 1 of 1", "test": "testing batch 1 of 1"}
    for split, (images, labels) in (("train", train), ("test", test)):
        payload = {
            "filenames": [f"synthetic_{i:06d}.png" for i in range(len(labels))],
            "batch_label": batch_labels[split],
            "fine_labels": [int(x) for x in labels],
            "coarse_labels": [coarse_of_fine[int(x)] for x in labels],
            "data": np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1),
        }
        _atomic_pickle(folder / split, payload)
    _atomic_pickle(folder / "meta", {"fine_label_names": fine_names, "coarse_label_names": coarse_names})
    return {name: file_hash(folder / name, "md5") for name in ("train", "test", "meta")}


def _atomic_pickle(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the official files
