import io
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.data import cifar, load_dataset, split_validation
from kdforge.data.dataset import epoch_order
from kdforge.data.synthetic import CLASSES, MANIFEST, generate_split, load_synthetic
from kdforge.data.transforms import InputSpec, augment_batch
from kdforge.errors import DataError
from kdforge.fileio import file_hash
from kdforge.recipe import load_recipe

from .conftest import SYNTH


def test_synthetic_files_are_official_cifar100_pickles(synth_root):
    folder = synth_root / "cifar-100-python"
    # read the way torchvision's CIFAR100 reads the real files
    with open(folder / "train", "rb") as f:
        train = pickle.load(f, encoding="latin1")  # noqa: S301 - our own freshly written test file
    with open(folder / "meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")  # noqa: S301
    assert set(train) == {"filenames", "batch_label", "fine_labels", "coarse_labels", "data"}
    assert train["data"].dtype == np.uint8 and train["data"].shape == (SYNTH["train"], 3072)
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 10
    assert sorted(set(train["fine_labels"])) == list(range(100))  # every class present


def test_synthetic_generation_is_deterministic_and_seeded(tmp_path):
    a, la = generate_split(200, seed=3, split="train")
    b, lb = generate_split(200, seed=3, split="train")
    c, _ = generate_split(200, seed=4, split="train")
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    test, _ = generate_split(200, seed=3, split="test")
    assert not np.array_equal(a, test)  # the test split is not a copy of the training split


def test_cifar_loader_decodes_planes_into_uint8_tensors(synth_root):
    data = cifar.read_cifar100(synth_root, md5=load_manifest_md5(synth_root))
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape == (SYNTH["train"], 3, 32, 32)
    assert data.test.labels.dtype == torch.int64 and len(data.test) == SYNTH["test"]
    assert data.train.classes == tuple(CLASSES)
    # the file stores the R, G and B planes one after another; the tensor must match pixel by pixel
    with open(synth_root / "cifar-100-python" / "train", "rb") as f:
        raw = cifar.RestrictedUnpickler(f, encoding="latin1").load()["data"][0]
    assert torch.equal(data.train.images[0, 1].flatten(), torch.from_numpy(raw[1024:2048].copy()))


def load_manifest_md5(root):
    import json

    return json.loads((root / "cifar-100-python" / MANIFEST).read_text())["md5"]


def test_corrupted_file_is_refused_by_md5(tmp_path, synth_root):
    shutil.copytree(synth_root, tmp_path / "copy")
    train = tmp_path / "copy" / "cifar-100-python" / "train"
    blob = bytearray(train.read_bytes())
    blob[5000] ^= 0xFF
    train.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="md5 mismatch"):
        load_synthetic(tmp_path / "copy", **SYNTH)


def test_official_checksums_guard_real_cifar(tmp_path, synth_root):
    # synthetic files placed where CIFAR-100 belongs are not the official files: refused, not silently used
    shutil.copytree(synth_root, tmp_path / "cifar")
    with pytest.raises(DataError, match=r"meta: md5 mismatch \(expected 7973b15100ade9c7d40fb424638fde48"):
        cifar.read_cifar100(tmp_path / "cifar")


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    payload = pickle.dumps({"data": Evil()})
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        cifar.RestrictedUnpickler(io.BytesIO(payload), encoding="latin1").load()
    path = tmp_path / "train"
    path.write_bytes(payload)
    with pytest.raises(DataError, match="not a CIFAR-100 python file"):
        cifar.read_pickle(path, file_hash(path, "md5"))


def test_missing_cifar_offline_names_the_folder_and_the_fix(tmp_path):
    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text(f'[data]\ndataset = "cifar100"\nroot = "{tmp_path / "nowhere"}"\n')
    with pytest.raises(DataError) as info:
        load_dataset(load_recipe(recipe_path).data)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in message and "data.download = true" in message


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="could not download CIFAR-100 .* network is unreachable"):
        cifar.download_cifar100(tmp_path)


def test_synthetic_root_with_other_parameters_is_not_silently_reused(synth_root):
    with pytest.raises(DataError, match="recipe asks for"):
        load_synthetic(synth_root, train=SYNTH["train"], test=SYNTH["test"], seed=99)


def test_data_synth_command_writes_the_dataset(tmp_path):
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path), "--train", "200", "--test", "100"])
    assert result.exit_code == 0, result.output
    data = load_synthetic(tmp_path, train=200, test=100, seed=0)
    assert len(data.train) == 200 and len(data.test) == 100


def test_imagefolder_reads_users_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text(f'[data]\ndataset = "imagefolder"\nroot = "{tmp_path}"\nimage_size = 16\n')
    data = load_dataset(load_recipe(recipe_path, ["data.val_fraction=0"]).data)
    assert data.train.classes == ("cat", "dog") and data.val is None
    assert data.train.images.shape == (6, 3, 16, 16) and data.train.images.dtype == torch.uint8
    assert data.test.labels.tolist() == [0, 0, 1, 1]
    held = load_dataset(load_recipe(recipe_path).data)  # the default holds one image of each class out
    assert held.train.labels.tolist() == [0, 0, 1, 1] and held.val.labels.tolist() == [0, 1]


def test_the_validation_split_is_stratified_seeded_disjoint_and_complete(synth_root):
    from kdforge.data.synthetic import load_synthetic

    from .conftest import SYNTH

    full = load_synthetic(synth_root, SYNTH["train"], SYNTH["test"], SYNTH["seed"]).train
    train, val = split_validation(full, 0.1, seed=0)
    assert len(train) + len(val) == len(full) == 1000
    for label in range(100):  # 10% of every class
        assert (val.labels == label).sum() == round((full.labels == label).sum().item() * 0.1)

    def rows(dataset):
        return {bytes(image.numpy().tobytes()) + bytes([int(label)]) for image, label in zip(dataset.images,
                                                                                             dataset.labels,
                                                                                             strict=True)}

    assert rows(train) | rows(val) == rows(full) and not rows(train) & rows(val)  # every image once
    again, other = split_validation(full, 0.1, seed=0)[1], split_validation(full, 0.1, seed=1)[1]
    assert torch.equal(again.images, val.images) and not torch.equal(other.images, val.images)


def test_augmentation_crops_and_flips_whole_batches():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).reshape(2, 3, 8, 8).to(torch.uint8)
    # no padding: only flips; each image is either itself or its mirror
    out = augment_batch(images, crop_padding=0, hflip=True, generator=torch.Generator().manual_seed(0))
    for original, augmented in zip(images, out, strict=False):
        assert torch.equal(augmented, original) or torch.equal(augmented, original.flip(-1))
    # padding: every output is an 8x8 window of the zero-padded image
    out = augment_batch(images, crop_padding=2, hflip=False, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for p, augmented in zip(padded, out, strict=False):
        windows = [p[:, y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(augmented, w) for w in windows)
    # same generator seed, same augmentation (what makes resume exact)
    again = augment_batch(images, crop_padding=2, hflip=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_input_spec_resizes_and_normalizes_with_the_models_statistics():
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    x = InputSpec(size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0)).prepare(images)
    assert x.shape == (2, 3, 64, 64)
    assert torch.allclose(x[:, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    batches = epoch_order(103, 10, seed=1, epoch=2)
    flat = torch.cat(batches)
    assert len(batches) == 10 and len(set(flat.tolist())) == 100  # full batches only, no repeats
    assert all(torch.equal(a, b) for a, b in zip(batches, epoch_order(103, 10, seed=1, epoch=2), strict=False))
    assert not torch.equal(flat, torch.cat(epoch_order(103, 10, seed=1, epoch=3)))
