"""Reading batches ahead in worker processes: `prefetch(load, items, workers)` yields `load(item)` for each item,
in order, computed by torch `DataLoader` workers while the caller works on the previous ones (decoding images
is what they do; each worker runs one torch thread, so the workers and the training threads share the cores
without contending inside each other). With no workers, or images already in memory, it is a plain loop.

    for images in prefetch(lambda idx: dataset.images[idx], batches, workers=2): ...
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from kdforge.errors import KdforgeError

T = TypeVar("T")


def default_workers() -> int:
    """Decoding workers when the recipe does not say: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class _Calls(torch.utils.data.Dataset):
    def __init__(self, load: Callable[[Any], Any], items: Sequence[Any]) -> None:
        self.load, self.items = load, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return self.load(self.items[i])
        except KdforgeError as exc:  # sent back as it is (a DataLoader would wrap it in its traceback text)
            return _Failed(exc)


class _Failed:
    def __init__(self, exc: KdforgeError) -> None:
        self.exc = exc


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)


def prefetch(load: Callable[[Any], T], items: Sequence[Any], workers: int, ahead: int = 2) -> Iterator[T]:
    """`load(item)` for each of `items`, in order; up to `workers * ahead` items are loaded ahead. An error in a
    worker is raised here, as it was raised there (a DataError stays one)."""
    if workers <= 0 or len(items) <= 1:
        yield from map(load, items)
        return
    loader = torch.utils.data.DataLoader(
        _Calls(load, items), batch_size=None, shuffle=False, num_workers=min(workers, len(items)),
        prefetch_factor=ahead, worker_init_fn=_one_thread, collate_fn=_as_is,
    )
    batches = iter(loader)
    try:
        for number in range(len(items)):
            item = next(batches)
            if isinstance(item, _Failed):
                raise item.exc
            if number == len(items) - 1:
                next(batches, None)  # the loader's own end: its workers exit now, not when this is collected
            yield item
    finally:  # also when the caller stops early (an error, Ctrl-C): the workers end here, in their parent
        del batches


def read_batches(images, batches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """`images[idx]` for each index batch, in order: decoded ahead by the images' workers when reading them
    decodes files (`FileImages.workers`), else indexed in place."""
    return prefetch(images.__getitem__, batches, getattr(images, "workers", 0))


def _as_is(item):
    return item
