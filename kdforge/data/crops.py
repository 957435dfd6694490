"""RandomResizedCrop + flip of a streamed image, with the crop drawn BEFORE the image is decoded.

timm's training transform decodes a whole photo, then crops a random part of it and resizes that part to the
model's size. Here the crop box is drawn from the size the file's header gives (the same algorithm as
torchvision's / timm's `RandomResizedCrop.get_params`), and then only as many pixels are decoded as the box needs:

- a JPEG whose box still covers the output size at 1/2, 1/4 or 1/8 of the resolution is decoded at that scale by
  libjpeg-turbo's DCT scaling (Pillow's `draft`): a 12-megapixel photo is decoded at up to 1/64 of its pixels;
- a JPEG the box needs at full resolution is decoded by libjpeg-turbo through TorchCodec's `decode_jpeg` (or
  torchvision's where TorchCodec is not installed), without Pillow's overhead (measured on a Xeon: 0.41 against
  1.0 ms for a smooth 500x375 photo; 1.0 against 1.1 ms for a grainy one, where entropy decoding dominates), and
  cropped and resized as a uint8 tensor (torch's antialiased uint8 kernels);
- every other image (PNG, WebP, a JPEG with an EXIF rotation, a decoder that refuses the file) is decoded by
  `kdforge.images.open_rgb` and cropped from the upright image.

Every random draw comes from one `random.Random` the caller seeds per (seed, epoch, image): nothing global is
seeded, saved or restored, and a view depends on nothing else.

    view = crop_view(ref.read(), random.Random(seed), size=224, scale=(0.08, 1), ratio=(3 / 4, 4 / 3))
"""

from __future__ import annotations

import functools
import io
import math
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdforge.errors import DataError
from kdforge.images import MAX_PIXELS, ImageError, ImageTooLarge, open_rgb

INTERPOLATIONS = ("bilinear", "bicubic")  # [data.augment] interpolation; "random" picks one per view
Box = tuple[int, int, int, int]  # left, top, width, height in the upright image's pixels


def draw_box(rng: random.Random, width: int, height: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> Box:
    """RandomResizedCrop's box: a share `scale` of the area with aspect ratio in `ratio` (log-uniform), 10 tries,
    then the largest centred box within `ratio` (torchvision's and timm's `get_params`, drawn from `rng`)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)  # (top before left, as torchvision and timm draw them)
            return rng.randint(0, width - w), top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def crop_view(source: bytes | Path, rng: random.Random, size: int, scale: tuple[float, float],
              ratio: tuple[float, float], hflip: bool = True, interpolation: str = "bilinear") -> torch.Tensor:
    """One training view of the image in `source`: uint8 (3, size, size). Raises ImageError."""
    from PIL import Image

    data = source.read_bytes() if isinstance(source, Path) else source
    if not data:
        raise ImageError("empty image")
    header = _jpeg_header(data)
    if header is None:  # not a plain upright JPEG: decoded whole, upright, then cropped
        image = open_rgb(data, size)
        box = draw_box(rng, image.width, image.height, scale, ratio)
        return _finish_pil(image, box, (1.0, 1.0), rng, size, hflip, interpolation)
    width, height, mode = header
    box = draw_box(rng, width, height, scale, ratio)
    reduce = min(1.0, size / min(box[2], box[3]))  # the share of the resolution the box needs
    if reduce > 0.5 and mode in ("RGB", "L") and width * height <= MAX_PIXELS:
        pixels = _decode_jpeg(data)  # DCT scaling cannot help: libjpeg-turbo at full resolution, without Pillow
        if pixels is not None and tuple(pixels.shape[1:]) == (height, width):
            return _finish_tensor(pixels, box, rng, size, hflip, interpolation)
    with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:  # decoded at 1/2, 1/4 or 1/8 where it suffices
        image.draft("RGB", (math.ceil(width * reduce), math.ceil(height * reduce)))
        if image.width * image.height > MAX_PIXELS:
            raise ImageTooLarge(f"image of {width}x{height} pixels is larger than the {MAX_PIXELS:,} pixels decoded "
                                f"here; send it smaller")
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"not a readable image: {exc}") from None
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # greyscale, CMYK (as kdforge.images does)
        return _finish_pil(rgb, box, (rgb.width / width, rgb.height / height), rng, size, hflip, interpolation)


def _jpeg_header(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, mode) of a JPEG stored upright (no EXIF rotation), from its header alone; None for anything
    else (open_rgb decodes it, or says what is wrong with it)."""
    from PIL import Image

    if data[:2] != b"\xff\xd8":
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            if image.getexif().get(0x0112, 1) != 1 or image.mode not in ("RGB", "L", "CMYK"):
                return None
            return image.width, image.height, image.mode
    except (OSError, ValueError, SyntaxError):
        return None


@functools.cache
def jpeg_decoder() -> Callable[[bytes], torch.Tensor] | None:
    """bytes -> uint8 (3, H, W) by libjpeg-turbo: TorchCodec's decoder where it loads (the `data` extra; PyTorch's
    image decoders since torchvision 0.29 deprecated its own), else torchvision's; None without either."""
    try:
        from torchcodec.decoders import decode_jpeg as torchcodec_jpeg

        def decode_with_torchcodec(data: bytes) -> torch.Tensor:
            return torchcodec_jpeg(data, mode="RGB")

        return decode_with_torchcodec
    except Exception:  # not installed, or built for another torch (it loads its native library on import)
        pass
    try:
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as torchvision_jpeg
    except ImportError:
        return None

    def decode_with_torchvision(data: bytes) -> torch.Tensor:
        with warnings.catch_warnings():  # its deprecation, on every call; the decoder itself is fine
            warnings.simplefilter("ignore", DeprecationWarning)
            return torchvision_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    return decode_with_torchvision


def _decode_jpeg(data: bytes) -> torch.Tensor | None:
    """The photo decoded whole (`jpeg_decoder`), or None where it cannot (Pillow decodes it then)."""
    decode = jpeg_decoder()
    try:
        return decode(data) if decode is not None else None
    except (RuntimeError, ValueError):
        return None


def _interpolation(rng: random.Random, interpolation: str) -> str:
    return rng.choice(INTERPOLATIONS) if interpolation == "random" else interpolation


def _finish_tensor(pixels: torch.Tensor, box: Box, rng: random.Random, size: int, hflip: bool,
                   interpolation: str) -> torch.Tensor:
    mode = _interpolation(rng, interpolation)  # drawn before the flip, as plan_view draws them
    return crop_resize(pixels, box, size, mode, hflip and rng.random() < 0.5).contiguous()


def crop_resize(pixels: torch.Tensor, box: Box, size: int, interpolation: str, flip: bool) -> torch.Tensor:
    """`box` of uint8 (3, H, W) `pixels` (on any device) resized to size x size by torch's antialiased kernels,
    mirrored when `flip`."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    left, top, w, h = box
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    view = F.resize(pixels[:, top:top + h, left:left + w], [size, size], interpolation=mode, antialias=True)
    return view.flip(-1) if flip else view


def _finish_pil(image, box: Box, factor: tuple[float, float], rng: random.Random, size: int, hflip: bool,
                interpolation: str) -> torch.Tensor:
    """Crop `box` (in full-resolution pixels; the image holds them scaled by `factor` in x and y) resized to
    `size`."""
    from PIL import Image

    left, top, w, h = box
    resample = Image.Resampling.BICUBIC if _interpolation(rng, interpolation) == "bicubic" else \
        Image.Resampling.BILINEAR
    fx, fy = factor
    scaled = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
    view = image.resize((size, size), resample, box=scaled)
    if hflip and rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(view, dtype=np.uint8)).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------------
# decoding on the GPU ([data] decode = "gpu"): the workers plan, the training process decodes a batch at once


@dataclass(frozen=True)
class ViewPlan:
    """A view whose JPEG is decoded on the device: the file's bytes and what `crop_view` would draw for it (the
    same box, interpolation and flip from the same seeded generator)."""

    data: torch.Tensor  # the JPEG's bytes, uint8 (n,)
    box: Box
    interpolation: str
    flip: bool


def plan_view(source: bytes | Path, rng: random.Random, size: int, scale: tuple[float, float],
              ratio: tuple[float, float], hflip: bool = True,
              interpolation: str = "bilinear") -> ViewPlan | torch.Tensor:
    """In a decoding worker: a plain upright JPEG becomes a ViewPlan (nothing decoded); anything else is made here
    as `crop_view` makes it (the finished uint8 view)."""
    data = source.read_bytes() if isinstance(source, Path) else source
    header = _jpeg_header(data) if data else None
    if header is None or header[2] not in ("RGB", "L") or header[0] * header[1] > MAX_PIXELS:
        return crop_view(data, rng, size, scale, ratio, hflip, interpolation)
    box = draw_box(rng, header[0], header[1], scale, ratio)
    mode = _interpolation(rng, interpolation)
    return ViewPlan(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, mode, hflip and rng.random() < 0.5)


def finish_views(plans: list[ViewPlan | torch.Tensor], size: int, device: torch.device | str) -> torch.Tensor:
    """The views of a batch, uint8 (n, 3, size, size) on `device`: the planned JPEGs decoded together by
    `torchvision.io.decode_jpeg(device=...)` (nvJPEG on CUDA), each cropped, resized (antialiased) and flipped
    there; the views the workers finished are moved there."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [i for i, plan in enumerate(plans) if isinstance(plan, ViewPlan)]
    views: list[torch.Tensor | None] = [None if isinstance(p, ViewPlan) else p.to(device) for p in plans]
    if jpegs:
        with warnings.catch_warnings():  # torchvision's decoders' deprecation notice (TorchCodec has no GPU batch)
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                decoded = decode_jpeg([plans[i].data for i in jpegs], mode=ImageReadMode.RGB, device=device)
            except RuntimeError as exc:
                raise DataError(f"a JPEG of this batch cannot be decoded on {device} ({exc}); set [data] decode = "
                                f"\"cpu\" to find which (the workers name the file)") from None
        for i, pixels in zip(jpegs, decoded, strict=True):
            views[i] = crop_resize(pixels, plans[i].box, size, plans[i].interpolation, plans[i].flip)
    return torch.stack(views).contiguous()
