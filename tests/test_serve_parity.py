"""One preprocessing contract: what the server feeds the model is what verification measured.

Serving (torch-free) decodes and resizes with Pillow (`images.decode_rgb`: bilinear, antialiased when reducing,
uint8 result) and normalizes with `images.normalize`; verification and training resize the decoded uint8 images
with torch (`InputSpec.prepare`: bilinear, antialiased when reducing, float result). At the model's own size both
are the same arithmetic; resized, they differ by Pillow's rounding to uint8: at most one uint8 step.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data import load_dataset
from kdforge.data.transforms import InputSpec
from kdforge.fileio import read_json, read_metadata
from kdforge.images import decode_rgb, normalize
from kdforge.recipe import load_recipe
from kdforge.runners import OnnxRunner
from kdforge.serve.model import ServedModel

ONE_STEP = 1 / 255  # one uint8 step of the [0, 1] pixel range


def png(pixels: np.ndarray, size: int | None = None) -> bytes:
    """A PNG of `pixels` (H, W, 3), resized first (bicubic, like a photo editor) when `size` is given."""
    image = Image.fromarray(pixels)
    if size is not None and size != image.width:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def test_split(served_export):
    export_dir, _ = served_export
    return load_dataset(load_recipe(read_metadata(export_dir)["run"] + "/recipe.toml").data).test


@pytest.mark.parametrize("size", [16, 24, 32, 48, 64, 100, 224])
def test_serving_and_verification_prepare_an_image_alike(test_split, size):
    """Images of several sizes (made from test-split images and decoded from PNG) prepared for a 32x32 model both
    ways agree within one uint8 step of the pixel range, exactly at the model's own size."""
    spec = InputSpec(32, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25))
    std = np.asarray(spec.std, np.float32).reshape(3, 1, 1)
    worst = 0.0
    for image in test_split.images[:50]:
        data = png(image.permute(1, 2, 0).numpy(), size)
        served = normalize(decode_rgb(data, spec.size), spec.mean, spec.std)
        decoded = torch.from_numpy(decode_rgb(data, size)).permute(2, 0, 1)[None]  # as a dataset holds it
        verified = spec.prepare(decoded)[0].numpy()
        worst = max(worst, float((np.abs(served - verified) * std).max()))  # in [0, 1] pixel units
    if size == spec.size:
        assert worst < 1e-6
    else:
        assert worst <= ONE_STEP * 1.01


@pytest.mark.parametrize("fmt", ["onnx", "int8"])
def test_the_server_answers_what_verification_measured(served_export, test_split, fmt):
    """Every test-split image sent as a PNG: the served model's logits are verification's runner's on the same
    decoded images (same class for every image), and its test top-1 is the one verify.json recorded."""
    export_dir, _ = served_export
    served = ServedModel.load(export_dir, fmt)
    pngs = [png(image.permute(1, 2, 0).numpy()) for image in test_split.images]
    served_logits = np.concatenate([served.run(np.stack([served.preprocess(p) for p in pngs[i:i + 100]]))
                                    for i in range(0, len(pngs), 100)])
    entry = read_metadata(export_dir)["formats"][fmt]
    verified_logits = OnnxRunner(export_dir / entry["file"]).predict(test_split.images).numpy()

    assert np.abs(served_logits - verified_logits).max() < 1e-4
    assert (served_logits.argmax(1) == verified_logits.argmax(1)).all()
    report = read_json(export_dir / "verify.json")[fmt]
    assert report["count"] == len(test_split) and report["passed"]
    served_top1 = float((served_logits.argmax(1) == test_split.labels.numpy()).mean())
    assert served_top1 == pytest.approx(report["candidate_top1"], abs=1e-6)  # verification keeps float32
    assert served.info["verified"] is True and served.info["test_top1"] == report["candidate_top1"]


def test_ties_rank_the_same_in_verification_training_and_serving():
    """Equal top logits (frequent in INT8 outputs) go to the lower class index everywhere: verification's and the
    training loop's top-k, argmax (agreement, McNemar) and the server's ranking."""
    from kdforge.metrics import topk_accuracy, topk_hits

    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 5.0, 5.0]])
    labels = torch.tensor([2, 0, 2])
    assert topk_hits(logits, labels, (1,))[1].tolist() == (logits.argmax(1) == labels).tolist() == [False, True, True]
    assert topk_accuracy(logits, labels, (1, 2))["top2"] == 1.0
    served = ServedModel(run=lambda batch: logits.numpy(), size=1, mean=np.zeros((3, 1, 1), np.float32),
                         std=np.ones((3, 1, 1), np.float32), labels=["a", "b", "c", "d"], info={})
    served.preprocess = lambda data: np.zeros((3, 1, 1), np.float32)
    ranked = served.predict([b"x", b"y", b"z"], top_k=1)
    assert [r[0]["index"] for r in ranked] == logits.argmax(1).tolist() == [1, 0, 2]
