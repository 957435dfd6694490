"""The built-in synthetic dataset: 100 learnable classes of procedurally drawn 32x32 images.

Class = shape (10) x hue (10). Each image has a random background (colour and gradient), the class shape at a
random position, rotation and scale, a distractor blob of random colour, and pixel noise. Everything is
drawn from a seed, so the same arguments always give byte-identical files.

It is written in the official CIFAR-100 python format (train/test/meta), so the real CIFAR loader reads it;
a manifest (`kdforge-synthetic.json`) beside the files records the arguments and the files' md5 sums.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdforge.data import cifar
from kdforge.data.dataset import DataSplits
from kdforge.errors import DataError, KdforgeError
from kdforge.fileio import check_can_create, read_json, write_json

SHAPES = ("disk", "square", "triangle", "ring", "plus", "bar", "star", "crescent", "frame", "dots")
HUES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "blue", "purple", "pink")
CLASSES = [f"{hue}_{shape}" for shape in SHAPES for hue in HUES]  # label = shape * 10 + hue
MANIFEST = "kdforge-synthetic.json"
SIZE = 32
_SUPERSAMPLE = 2  # shapes are drawn at 64x64 and averaged down: smooth edges
_CHUNK = 1000


def _shape_masks(shape_ids: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean masks of each image's shape, in shape-local coordinates u, v (the shape spans about [-1, 1])."""
    r = np.hypot(u, v)
    phi = np.arctan2(v, u)
    a, b = np.abs(u), np.abs(v)
    box = np.maximum(a, b)
    triangle = (v >= -0.5) & (v <= 1.0 - 1.7320508 * a)  # pointing up, apex at v = 1
    masks = {
        "disk": r <= 0.9,
        "square": box <= 0.75,
        "triangle": triangle,
        "ring": (r <= 1.0) & (r >= 0.6),
        "plus": ((a <= 0.28) & (b <= 1.0)) | ((b <= 0.28) & (a <= 1.0)),
        "bar": (a <= 1.0) & (b <= 0.32),
        "star": r <= 0.55 + 0.45 * np.cos(5 * phi),
        "crescent": (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.75),
        "frame": (box <= 0.9) & (box >= 0.55),
        "dots": (np.hypot(u - 0.5, v) <= 0.42) | (np.hypot(u + 0.5, v) <= 0.42),
    }
    stacked = np.stack([masks[name] for name in SHAPES])  # (10, N, H, W)
    return np.take_along_axis(stacked, shape_ids[None, :, None, None], axis=0)[0]


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; inputs broadcast together, output has a trailing axis of 3."""
    h6 = (h % 1.0) * 6.0
    channel = [np.clip(np.abs((h6 + k) % 6.0 - 3.0) - 1.0, 0.0, 1.0) for k in (0.0, 4.0, 2.0)]
    return np.stack([v * (1.0 - s + s * c) for c in channel], axis=-1)


def draw_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one image per label: (N, 32, 32, 3) uint8."""
    n = len(labels)
    shape_ids, hue_ids = labels // len(HUES), labels % len(HUES)

    # shape-local coordinates: translate, rotate and scale a supersampled pixel grid
    side = SIZE * _SUPERSAMPLE
    grid = (np.arange(side) + 0.5) / _SUPERSAMPLE  # pixel centres in 32x32 units
    y, x = np.meshgrid(grid, grid, indexing="ij")
    cx, cy = rng.uniform(10, 22, n), rng.uniform(10, 22, n)
    scale = rng.uniform(6.0, 11.0, n)
    theta = rng.uniform(0, 2 * np.pi, n)
    dx = (x[None] - cx[:, None, None]) / scale[:, None, None]
    dy = (y[None] - cy[:, None, None]) / scale[:, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    mask = _shape_masks(shape_ids, u, v).astype(np.float32)
    mask = mask.reshape(n, SIZE, _SUPERSAMPLE, SIZE, _SUPERSAMPLE).mean(axis=(2, 4))[..., None]

    # background: a muted colour with a linear gradient
    yy, xx = np.meshgrid(np.linspace(-1, 1, SIZE), np.linspace(-1, 1, SIZE), indexing="ij")
    base = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0, 0.35, n), rng.uniform(0.15, 0.85, n))
    gx, gy = rng.uniform(-0.2, 0.2, (2, n))
    gradient = gx[:, None, None] * xx[None] + gy[:, None, None] * yy[None]
    image = np.clip(base[:, None, None, :] + gradient[..., None], 0, 1)

    # the class colour: one of ten hues, saturated and bright, jittered a little
    hue = hue_ids / len(HUES) + rng.uniform(-0.02, 0.02, n)
    colour = _hsv_to_rgb(hue, rng.uniform(0.65, 1.0, n), rng.uniform(0.7, 1.0, n))
    shading = 1.0 + rng.normal(0, 0.06, (n, SIZE, SIZE, 1))  # a little texture inside the shape
    image = image * (1 - mask) + np.clip(colour[:, None, None, :] * shading, 0, 1) * mask

    # a distractor blob of random colour somewhere in the image
    bx, by = rng.uniform(0, SIZE, (2, n))
    sigma = rng.uniform(1.5, 3.5, n)
    px = np.arange(SIZE) + 0.5
    blob = np.exp(
        -((px[None, None, :] - bx[:, None, None]) ** 2 + (px[None, :, None] - by[:, None, None]) ** 2)
        / (2 * sigma[:, None, None] ** 2)
    )[..., None] * rng.uniform(0.4, 0.8, n)[:, None, None, None]
    blob_colour = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.3, 1.0, n), rng.uniform(0.3, 1.0, n))
    image = image * (1 - blob) + blob_colour[:, None, None, :] * blob

    image = image + rng.normal(0, 1, (n, 1, 1, 1)) ** 2 * 0.03 * rng.normal(0, 1, image.shape)
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def generate_split(count: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`count` images with balanced labels; train and test come from independent streams of the same seed."""
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}[split]])
    labels = rng.permutation(np.arange(count) % len(CLASSES))
    images = np.concatenate([draw_images(labels[i : i + _CHUNK], rng) for i in range(0, count, _CHUNK)])
    return images, labels


def write_synthetic(root: str | Path, train: int = 10_000, test: int = 2_000, seed: int = 0) -> Path:
    """Generate the dataset into `root/cifar-100-python/` (official format) plus its manifest."""
    folder = Path(root) / cifar.FOLDER
    check_can_create(folder, "dataset folder")
    md5 = cifar.write_cifar100(
        root,
        train=generate_split(train, seed, "train"),
        test=generate_split(test, seed, "test"),
        fine_names=CLASSES,
        coarse_of_fine=[i // len(HUES) for i in range(len(CLASSES))],
        coarse_names=list(SHAPES),
    )
    manifest = {"generator": "kdforge-synthetic-v1", "train": train, "test": test, "seed": seed, "md5": md5}
    write_json(folder / MANIFEST, manifest)  # written last: its presence means the files are complete
    return folder


def load_synthetic(root: str | Path, train: int, test: int, seed: int) -> DataSplits:
    """Read the synthetic dataset at `root`, generating it first if it is not there."""
    manifest_path = Path(root) / cifar.FOLDER / MANIFEST
    if not manifest_path.is_file():
        write_synthetic(root, train, test, seed)
    try:
        manifest = read_json(manifest_path)
    except KdforgeError:
        manifest = {}
    if not isinstance(manifest.get("md5"), dict):  # only kdforge writes this folder: generating it again is safe
        raise DataError(f"{manifest_path}: damaged manifest of the synthetic dataset; delete {root} and it is "
                        f"generated again")
    wanted = {"train": train, "test": test, "seed": seed}
    found = {key: manifest.get(key) for key in wanted}
    if found != wanted:
        raise DataError(
            f"{root} holds a synthetic dataset made with {found}, but the recipe asks for {wanted}; "
            f"point data.root elsewhere or delete {root}"
        )
    return cifar.read_cifar100(root, md5=manifest["md5"])


def write_photo_folder(root: str | Path, train: int, test: int, classes: int = 10, size: tuple[int, int] = (500, 375),
                       seed: int = 0, quality: int = 90) -> Path:
    """The synthetic images as an ImageFolder of JPEG "photos" (`root/{train,test}/<class>/NNNNNN.jpg`), each
    drawn at 32x32, enlarged to `size` (width, height) and given per-pixel grain so it weighs and decodes like a
    photo (500x375 at quality 90: about 70 KB). The first `classes` classes; for the streaming data path's tests
    and benchmarks (users bring their own photos)."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng([seed, 2])
    for split, count in (("train", train), ("test", test)):
        images, labels = generate_split(count * len(CLASSES) // classes + len(CLASSES), seed, split)
        keep = np.flatnonzero(labels < classes)[:count]
        for number, i in enumerate(keep):
            folder = root / split / CLASSES[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            photo = np.asarray(Image.fromarray(images[i]).resize(size, Image.Resampling.BILINEAR), dtype=np.int16)
            photo = np.clip(photo + rng.integers(-24, 25, photo.shape), 0, 255).astype(np.uint8)
            Image.fromarray(photo).save(folder / f"{number:06d}.jpg", quality=quality)
    return root
