"""Which training images calibrate INT8: one draw for post-training quantization (`export/quantize.py`) and the
QAD stage (`train/qad.py`), so a QAD model and a PTQ model of the same student calibrate on the same images.

    draw = draw_calibration(len(data.train), qcfg, seed)   # draw.batches: index batches into the training split
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdforge.errors import ExportError
from kdforge.recipe import QuantizeConfig
from kdforge.rng import rng_stream


@dataclass(frozen=True)
class CalibrationDraw:
    batches: list[torch.Tensor]  # index batches into the training split, all of one size
    count: int  # images calibrated on
    heldout: torch.Tensor  # up to cfg.sensitivity_images more training indices, disjoint from the calibration ones
    notes: list[str]  # adjustments made to the request, reported to the user


def draw_calibration(available: int, cfg: QuantizeConfig, seed: int) -> CalibrationDraw:
    """`cfg.calibration` training images in batches of `cfg.batch_size`, drawn from the seed's calibration stream:
    fewer when the split is smaller, one smaller batch when they are fewer than a batch, else a whole number of
    batches (histogram calibrators need batches of one shape)."""
    if available == 0:
        raise ExportError("the training split is empty: INT8 calibration needs training images")
    notes = []
    count = cfg.calibration
    if count > available:
        notes.append(f"asked for {count} calibration images, the training split has {available}: using {available}")
        count = available
    batch_size = cfg.batch_size
    if count < batch_size:
        notes.append(f"{count} calibration images are fewer than one batch of {batch_size}: "
                     f"calibrating on a single batch of {count}")
        batch_size = count
    elif count % batch_size:
        notes.append(f"using {count - count % batch_size} of {count} calibration images: a whole number of "
                     f"batches of {batch_size}")
        count -= count % batch_size
    order = torch.randperm(available, generator=rng_stream(seed, "calibration"))
    return CalibrationDraw(list(order[:count].split(batch_size)), count,
                           order[count : count + cfg.sensitivity_images], notes)
