"""Decoding a user's image file into the model's square RGB input, the same way everywhere: the server's
/predict and `kdforge predict`, and ImageFolder datasets. Torch-free (Pillow and numpy), so the serving
image needs nothing else.

    pixels = decode_rgb(png_bytes, size=224)   # uint8 (224, 224, 3)
    x = normalize(pixels, mean, std)           # float32 (3, 224, 224), what the model reads

What it accepts and how (the README's "Serving" section says the same):
- raster formats only: PNG, JPEG, WebP, BMP, GIF (first frame), TIFF. Pillow hands EPS/PS to Ghostscript where it
  is installed, so other formats are refused before anything decodes them;
- at most `max_pixels` pixels (default 4096 x 4096), checked from the header BEFORE decoding: a 20 KB PNG can
  declare 13000 x 13000 pixels (0.8 GB decoded). A JPEG is first reduced while it decodes (`Image.draft`, the DCT
  scaling by 1/2, 1/4 or 1/8 that keeps it at least `size` pixels a side), so a 48-megapixel photo is accepted
  and costs a fraction of its full decode;
- 16-bit greyscale is scaled to 8 bits (not clipped to white); CMYK and palette images are converted to RGB;
  transparency (RGBA, LA, palette with a transparent colour) is composited onto WHITE, the page a transparent
  picture is usually seen on;
- then resized to `size` x `size` with Pillow's bilinear filter (antialiased when reducing).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from kdforge.errors import KdforgeError

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
MAX_PIXELS = 4096 * 4096
BACKGROUND = (255, 255, 255)  # under transparent pixels


class ImageError(KdforgeError, ValueError):
    """The bytes are not an image kdforge reads."""


class ImageTooLarge(ImageError):
    """The image declares more pixels than the decode budget allows."""


def decode_rgb(source: bytes | Path, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image bytes or file -> uint8 array (size, size, 3). Raises ImageError (ImageTooLarge over the budget)."""

    return resize_rgb(open_rgb(source, size, max_pixels), size)


def resize_rgb(image, size: int) -> np.ndarray:
    """A Pillow RGB image (or a uint8 (H, W, 3) array) -> uint8 (size, size, 3), resized as the server resizes
    every decoded image: Pillow's bilinear filter, antialiased when reducing."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    rgb = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(rgb, dtype=np.uint8)  # owned and writable (torch.from_numpy needs that)


def open_rgb(source: bytes | Path, draft_size: int, max_pixels: int = MAX_PIXELS):
    """Image bytes or file -> a Pillow RGB image at (about) its source resolution: the checks and conversions of
    `decode_rgb` without its final resize, for transforms that crop from the source (training augmentation). A
    JPEG is decoded reduced while it stays at least `draft_size` pixels a side. Raises ImageError."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, bytes) and not source:
        raise ImageError("empty image")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=IMAGE_FORMATS) as image:
            if image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))  # decode at 1/2, 1/4 or 1/8 scale when still >= size
            if image.width * image.height > max_pixels:
                raise ImageTooLarge(f"image of {image.width}x{image.height} pixels is larger than the "
                                    f"{max_pixels:,} pixels decoded here; send it smaller")
            image.load()  # decoded now: the image stays valid after the file closes
            image = _upright(image)
            return image if image.mode == "RGB" else _to_rgb(image)
    except ImageError:  # ours, raised above (it is a ValueError: let it through unchanged)
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, met before ours by some headers
        raise ImageTooLarge(f"image larger than the {max_pixels:,} pixels decoded here ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"not a readable image: {exc}") from None


def _upright(image):
    """The image as its EXIF orientation says it is seen (a phone photo taken sideways is stored sideways with an
    orientation tag): rotated or flipped by Pillow's `exif_transpose`; unchanged without the tag."""
    from PIL import ImageOps

    if image.getexif().get(0x0112, 1) == 1:  # Orientation: 1 = as stored (or no tag)
        return image
    return ImageOps.exif_transpose(image)


def normalize(pixels: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W): scaled to [0, 1], minus `mean`, over `std` (per channel), the same
    arithmetic as `InputSpec.prepare` (data/transforms.py), which verification and training use."""
    return normalize_batch(pixels[None], mean, std)[0]


def normalize_batch(pixels: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), each image as `normalize` does it (the device bundle's images)."""
    x = pixels.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def _to_rgb(image):
    """Any Pillow mode -> RGB (see the module docstring for 16-bit and transparency)."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: scale to 8 bits, not clip to white
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
