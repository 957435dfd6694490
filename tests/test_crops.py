"""Training views of streamed photos (kdforge/data/crops.py): timm's RandomResizedCrop box drawn from the header,
the pixels decoded at the resolution the box needs, the same picture as cropping the fully decoded photo, and a
pure function of its seed."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data import crops
from kdforge.data.crops import crop_view, draw_box

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def photo(width: int, height: int, orientation: int = 1, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A smooth photo-like picture (gradients and a few discs), so resized crops compare closely."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 37 + y / 53)], axis=-1)
    for cx, cy, r in ((0.3, 0.4, 0.15), (0.7, 0.6, 0.2)):
        pixels[(x - cx * width) ** 2 + (y - cy * height) ** 2 < (r * min(width, height)) ** 2] = (250, 40, 30)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode)
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(out, fmt, quality=95, exif=exif) if fmt == "JPEG" else image.save(out, fmt)
    return out.getvalue()


def reference_view(data: bytes, box, size: int) -> np.ndarray:
    """What timm's transform does with that box: the whole photo decoded, upright, cropped and resized (bilinear)."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    left, top, w, h = box
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)))


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (64, 48), (4032, 3024)])
def test_the_box_is_timms_randomresizedcrop_box_for_the_same_draws(width, height):
    from timm.data.transforms import RandomResizedCropAndInterpolation

    image = Image.new("RGB", (width, height))
    for seed in range(200):
        random.seed(seed)
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(image, SCALE, RATIO)
        assert draw_box(random.Random(seed), width, height, SCALE, RATIO) == (left, top, w, h)
    # the fallback after 10 misses (a panorama outside the ratio range): timm's centred box
    random.seed(0)
    top, left, h, w = RandomResizedCropAndInterpolation.get_params(Image.new("RGB", (1000, 10)), (0.9, 1.0), RATIO)
    assert draw_box(random.Random(0), 1000, 10, (0.9, 1.0), RATIO) == (left, top, w, h)


def views_and_boxes(data: bytes, width: int, height: int, size: int, seeds, monkeypatch):
    """Each seed's view, the box it was cropped from and the size of the image the crop was taken from."""
    decoded = []
    real_pil, real_tensor = crops._finish_pil, crops._finish_tensor

    def pil(image, *args, **kwargs):
        decoded.append(image.size)
        return real_pil(image, *args, **kwargs)

    def tensor(pixels, *args, **kwargs):
        decoded.append((pixels.shape[2], pixels.shape[1]))
        return real_tensor(pixels, *args, **kwargs)

    monkeypatch.setattr(crops, "_finish_pil", pil)
    monkeypatch.setattr(crops, "_finish_tensor", tensor)
    out = []
    for seed in seeds:
        view = crop_view(data, random.Random(seed), size, SCALE, RATIO, hflip=False)
        out.append((view, draw_box(random.Random(seed), width, height, SCALE, RATIO), decoded[-1]))
    return out


def test_a_large_photo_is_decoded_at_the_resolution_its_crop_needs_and_shows_the_same_picture(monkeypatch):
    data = photo(2016, 1512)
    for view, box, decoded in views_and_boxes(data, 2016, 1512, 64, range(12), monkeypatch):
        reduced = 2016 // decoded[0]
        assert reduced in (2, 4, 8) and min(box[2], box[3]) / reduced >= 64  # reduced, still covering the output
        diff = np.abs(view.permute(1, 2, 0).numpy().astype(int) - reference_view(data, box, 64).astype(int))
        assert view.dtype == torch.uint8 and view.shape == (3, 64, 64)
        assert diff.mean() < 2.5 and np.percentile(diff, 99) < 40, (box, decoded, diff.mean())


def test_a_photo_whose_crop_needs_every_pixel_is_decoded_whole_and_shows_the_same_picture(monkeypatch):
    data = photo(500, 375)
    for view, box, decoded in views_and_boxes(data, 500, 375, 224, range(12), monkeypatch):
        assert decoded == (500, 375)
        diff = np.abs(view.permute(1, 2, 0).numpy().astype(int) - reference_view(data, box, 224).astype(int))
        assert diff.mean() < 2.5 and np.percentile(diff, 99) < 40, (box, diff.mean())


@pytest.mark.parametrize("kind", ["exif-rotated-jpeg", "png", "greyscale-jpeg", "cmyk-jpeg"])
def test_other_images_are_cropped_from_the_upright_rgb_picture(kind):
    data = {"exif-rotated-jpeg": lambda: photo(300, 200, orientation=6), "png": lambda: photo(300, 200, fmt="PNG"),
            "greyscale-jpeg": lambda: photo(300, 200, mode="L"),
            "cmyk-jpeg": lambda: photo(300, 200, mode="CMYK")}[kind]()
    upright = (200, 300) if kind == "exif-rotated-jpeg" else (300, 200)  # orientation 6: rotated 90 degrees
    view = crop_view(data, random.Random(5), 48, (1.0, 1.0), (upright[0] / upright[1],) * 2, hflip=False)
    box = draw_box(random.Random(5), *upright, (1.0, 1.0), (upright[0] / upright[1],) * 2)
    assert box == (0, 0, *upright)  # the whole upright picture
    diff = np.abs(view.permute(1, 2, 0).numpy().astype(int) - reference_view(data, box, 48).astype(int))
    assert view.shape == (3, 48, 48) and diff.mean() < 3, diff.mean()


def test_a_view_is_a_pure_function_of_its_seed_and_touches_no_global_random_state():
    data = photo(500, 375)
    states = random.getstate(), torch.get_rng_state(), np.random.get_state()[1].copy()
    first = crop_view(data, random.Random(7), 96, SCALE, RATIO)
    random.random(), torch.rand(3), np.random.rand()  # whatever else happens between two views ...
    states = random.getstate(), torch.get_rng_state(), np.random.get_state()[1].copy()
    assert torch.equal(first, crop_view(data, random.Random(7), 96, SCALE, RATIO))  # ... the same view
    assert not torch.equal(first, crop_view(data, random.Random(8), 96, SCALE, RATIO))
    assert random.getstate() == states[0] and torch.equal(torch.get_rng_state(), states[1])
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_flip_mirrors_the_crop():
    data = photo(500, 375)
    seed = next(s for s in range(50) if (lambda r: (draw_box(r, 500, 375, SCALE, RATIO), r.random())[1])(
        random.Random(s)) < 0.5)  # a seed whose flip draw says flip
    flipped = crop_view(data, random.Random(seed), 64, SCALE, RATIO, hflip=True)
    plain = crop_view(data, random.Random(seed), 64, SCALE, RATIO, hflip=False)
    assert torch.equal(flipped, plain.flip(-1))


@pytest.mark.parametrize("fails", ["missing", "built-for-another-torch"])
def test_without_torchcodec_torchvisions_decoder_gives_the_same_view(monkeypatch, fails):
    import sys
    import types

    data = photo(500, 375)
    with_torchcodec = crop_view(data, random.Random(3), 224, SCALE, RATIO)
    assert crops.jpeg_decoder().__name__ == "decode_with_torchcodec"  # the dev install has it: it decoded that view
    if fails == "missing":
        monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # `from torchcodec.decoders import` fails
    else:  # importing it raises what a native library of another torch raises
        broken = types.ModuleType("torchcodec.decoders")
        broken.__getattr__ = lambda name: (_ for _ in ()).throw(OSError("undefined symbol: _ZN3c10..."))
        monkeypatch.setitem(sys.modules, "torchcodec.decoders", broken)
    crops.jpeg_decoder.cache_clear()
    try:
        assert crops.jpeg_decoder().__name__ == "decode_with_torchvision"
        assert torch.equal(crop_view(data, random.Random(3), 224, SCALE, RATIO), with_torchcodec)
    finally:
        crops.jpeg_decoder.cache_clear()
