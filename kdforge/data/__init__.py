"""Datasets by name. Each loader takes the recipe's [data] section and returns train and test splits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kdforge.data.dataset import DataSplits, ImageDataset, epoch_order, eval_batches, split_validation
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
def _load_imagefolder(cfg: DataConfig) -> DataSplits:
    from kdforge.data import imagefolder

    return imagefolder.read_imagefolder(cfg.root, cfg.image_size)


def load_dataset(cfg: DataConfig, seed: int = 0) -> DataSplits:
    """The dataset's train and test splits, and the validation split `cfg.val_fraction` holds out of the
    training split (stratified, drawn with `seed`, the recipe's)."""
    splits = DATASETS.get(cfg.dataset)(cfg)
    if not cfg.val_fraction:
        return splits
    train, val = split_validation(splits.train, cfg.val_fraction, seed)
    return DataSplits(train=train, test=splits.test, val=val)
