"""Datasets by name. Each loader takes the recipe's [data] section and returns train and test splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from kdforge.data.dataset import DataSplits, ImageDataset, epoch_order, eval_batches, split_validation
from kdforge.data.loader import default_workers
from kdforge.registry import Registry

if TYPE_CHECKING:
    from kdforge.recipe import DataConfig

__all__ = ["DATASETS", "DataSplits", "ImageDataset", "epoch_order", "eval_batches", "load_dataset", "split_validation"]

DATASETS: Registry[Callable[[DataConfig], DataSplits]] = Registry("dataset")


@DATASETS.register("cifar100")
def _load_cifar100(cfg: DataConfig) -> DataSplits:
    from kdforge.data import cifar

    if cfg.download and not (Path(cfg.root) / cifar.FOLDER / "train").is_file():
        cifar.download_cifar100(cfg.root)
    return cifar.read_cifar100(cfg.root)


@DATASETS.register("synthetic")
def _load_synthetic(cfg: DataConfig) -> DataSplits:
    from kdforge.data import synthetic

    return synthetic.load_synthetic(cfg.root, cfg.synthetic.train, cfg.synthetic.test, cfg.synthetic.seed)


@DATASETS.register("imagefolder")
@DATASETS.register("webdataset")
def _load_files(cfg: DataConfig) -> DataSplits:
    from kdforge.data import imagefolder

    return imagefolder.read_folder_dataset(cfg, scan_files(cfg), data_workers(cfg))


def scan_files(cfg: DataConfig):
    """The listing (no decoding) of an imagefolder or webdataset dataset: each image's place and label."""
    from kdforge.data import imagefolder, shards

    return shards.scan_shards(cfg.root) if cfg.dataset == "webdataset" else imagefolder.scan_imagefolder(cfg.root)


def describe_data(cfg: DataConfig) -> str | None:
    """For users' own data (imagefolder, webdataset), one line before anything is decoded: how many images, read
    how (in memory through the decode cache, or streamed by workers) and why; None for the built-in sets."""
    if cfg.dataset not in ("imagefolder", "webdataset"):
        return None
    from kdforge.data import imagefolder

    index = scan_files(cfg)
    return imagefolder.describe(cfg, index, data_workers(cfg), imagefolder.resolve_in_memory(cfg, index))


def data_workers(cfg: DataConfig) -> int:
    """Decoding processes for files and shards: `[data] workers`, default the cores (at most 8)."""
    return cfg.workers if cfg.workers is not None else default_workers()


def load_dataset(cfg: DataConfig, seed: int = 0) -> DataSplits:
    """The dataset's train and test splits, and the validation split `cfg.val_fraction` holds out of the
    training split (stratified, drawn with `seed`, the recipe's). Nothing is decoded twice: CIFAR-100 and the
    synthetic set are read into memory, an ImageFolder or shards are read from the decode cache or streamed
    (`DataSplits.description` says which and why)."""
    splits = DATASETS.get(cfg.dataset)(cfg)
    if not cfg.val_fraction:
        return splits
    train, val = split_validation(splits.train, cfg.val_fraction, seed)
    return replace(splits, train=train, val=val)
