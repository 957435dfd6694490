"""Every random draw of training and export comes from one place: `rng_stream(seed, purpose, index)`.

Each purpose is its own stream, a pure function of (recipe seed, purpose, index), so a batch order, an
augmentation or a calibration sample never depends on what else was drawn before it, and a run resumed from a
checkpoint draws exactly what an uninterrupted one would. The formulas are kept as they were when each stream
was introduced: finished runs, their fingerprints and `make demo`'s numbers depend on them (so "epoch_order" and
"augment" share a formula: one generator seed serves both, each drawing something different from it). The one
draw outside these streams is a model's initial weights: torch's global RNG, seeded per stage by
`runtime.seed_everything`, restored from the checkpoint on resume.

    generator = rng_stream(recipe.seed, "augment", step)
"""

from __future__ import annotations

import torch

_PRIME = 1_000_003

# purpose -> the generator seed for (recipe seed, index)
STREAMS = {
    "epoch_order": lambda seed, index: seed * _PRIME + index,  # index: the epoch
    "augment": lambda seed, index: seed * _PRIME + index,  # index: the step (online augmentation of one batch)
    "cache_view": lambda seed, index: (seed * _PRIME + index) * 7_919 + 104_729,  # index: the teacher cache's view
    "cache_start_view": lambda seed, index: seed * _PRIME + 15_485_863,  # each image's first view (index unused)
    "validation_split": lambda seed, index: seed,  # the images held out for validation
    "calibration": lambda seed, index: seed,  # INT8 calibration and held-out images; QAD's calibration batches
    "bench_images": lambda seed, index: seed,  # the random images latency is timed on (`kdforge bench`)
    # index: epoch * 2**32 + the image's index in its split (a streamed image's training view)
    "image_view": lambda seed, index: (seed * _PRIME + index) * 6_700_417 + 2_147_483_647,
    # index: the teacher cache's view * 2**32 + the image's index (a streamed image's cached view)
    "cache_image_view": lambda seed, index: (seed * _PRIME + index) * 6_700_417 + 433_494_437,
    "mixup": lambda seed, index: seed * _PRIME + index + 982_451_653,  # index: the step (mixup / CutMix draw)
}


def stream_seed(seed: int, purpose: str, index: int = 0) -> int:
    try:
        return STREAMS[purpose](seed, index)
    except KeyError:
        raise ValueError(f"unknown random stream {purpose!r}; known: {', '.join(STREAMS)}") from None


def rng_stream(seed: int, purpose: str, index: int = 0) -> torch.Generator:
    """A CPU generator for `purpose`'s draw number `index` under the recipe's `seed`."""
    return torch.Generator().manual_seed(stream_seed(seed, purpose, index))
