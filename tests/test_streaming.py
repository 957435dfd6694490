"""Users' own data at real size: ImageFolder and WebDataset shards, in memory through the decode cache or
streamed by workers with timm's augmentations; mixup; the teacher cache on streamed data; resume and processes."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdforge.data import load_dataset
from kdforge.data.imagefolder import FolderIndex, SplitIndex, resolve_in_memory, scan_imagefolder
from kdforge.data.shards import scan_shards, write_shards
from kdforge.data.stream import FileImages, SampleRef
from kdforge.errors import RecipeError
from kdforge.recipe import load_recipe, validate_recipe
from kdforge.train.loop import BatchSource
from kdforge.train.stages import train_stage

PHOTOS = {"train": 48, "test": 16, "classes": 4, "size": (48, 36)}
QUIET: list = []


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A small ImageFolder of JPEG photos (4 classes, 48 x 36 pixels) and its shards beside it."""
    from kdforge.data.synthetic import write_photo_folder

    root = tmp_path_factory.mktemp("photos")
    write_photo_folder(root / "folder", **PHOTOS)
    write_shards(root / "folder", root / "shards", shard_size=10)
    return root


def photo_recipe(tmp_path: Path, root: Path, dataset: str = "imagefolder", body: str = "", name: str = "photos",
                 overrides: tuple[str, ...] = ()):
    path = tmp_path / f"{name}.toml"
    path.write_text(f'name = "{name}"\n[data]\ndataset = "{dataset}"\nroot = "{root}"\nimage_size = 32\nworkers = 2\n'
                    + body + '\n[runtime]\ndevice = "cpu"\nthreads = 1\n[train]\nepochs = 2\nbatch_size = 8\n'
                    'lr = 3e-3\nlog_every = 2\n[teacher]\nmodel = "test_resnet"\ninput_size = 32\n'
                    '[student]\nmodel = "test_convnext"\ninput_size = 32\n')
    return load_recipe(path, list(overrides))


def multiset(images: torch.Tensor, labels: torch.Tensor) -> list[tuple[bytes, int]]:
    return sorted((image.numpy().tobytes(), int(label)) for image, label in zip(images, labels, strict=True))


# ----------------------------------------------------------------------------------------------------------
# the two sources


def test_imagefolder_and_its_shards_stream_the_same_images_labels_and_views(photos, tmp_path):
    streamed = "in_memory = false\n"
    folder = load_dataset(photo_recipe(tmp_path, photos / "folder", body=streamed).data, seed=0)
    shards = load_dataset(photo_recipe(tmp_path, photos / "shards", "webdataset", streamed).data, seed=0)
    assert folder.streamed and shards.streamed and folder.train.classes == shards.train.classes
    for split in ("train", "val", "test"):
        a, b = getattr(folder, split), getattr(shards, split)
        everything = torch.arange(len(a))
        assert len(a) == len(b) > 0
        assert multiset(a.images[everything], a.labels) == multiset(b.images[everything], b.labels)
    # a training view is a pure function of (seed, epoch, image): the same crops from either source, any order
    idx = torch.tensor([5, 0, 17])
    views = folder.train.images.views(idx, 3, 1)
    assert views.dtype == torch.uint8 and views.shape == (3, 3, 32, 32)
    assert torch.equal(views, shards.train.images.views(idx, 3, 1))
    assert torch.equal(views[1:2], folder.train.images.views(torch.tensor([0]), 3, 1))
    assert not torch.equal(views, folder.train.images.views(idx, 3, 2))  # another epoch, other crops


def test_shards_are_webdataset_shards_written_whole_and_resumed(photos, tmp_path):
    import webdataset

    out = photos / "shards"
    train = sorted((out / "train").glob("*.tar"))
    assert len(train) == 5 and (out / "classes.txt").read_text().split() == list(scan_imagefolder(
        photos / "folder").classes)
    samples = list(webdataset.WebDataset([str(p) for p in train], shardshuffle=False))
    assert len(samples) == PHOTOS["train"] and {int(s["cls"]) for s in samples} == set(range(PHOTOS["classes"]))
    assert all(s["jpg"][:2] == b"\xff\xd8" for s in samples)  # the photo's own JPEG bytes

    copy = tmp_path / "shards"
    first = write_shards(photos / "folder", copy, shard_size=10)
    original = (copy / "train" / "shard-000002.tar").read_bytes()
    (copy / "train" / "shard-000002.tar").unlink()  # as if the run was killed while writing it
    (copy / "train" / ".shard-000002.tar.tmp-99999999").write_bytes(b"half")
    again = write_shards(photos / "folder", copy, shard_size=10)
    assert (first.written, again.written, again.kept) == (7, 1, 6)
    assert (copy / "train" / "shard-000002.tar").read_bytes() == original
    assert not list(copy.glob("*/.*tmp*"))
    from kdforge.errors import DataError

    with pytest.raises(DataError, match="another folder, file list, --shard-size or --max-size"):
        write_shards(photos / "folder", copy, shard_size=12)  # would mix two shardings
    with pytest.raises(DataError, match="another folder, file list, --shard-size or --max-size"):
        write_shards(photos / "folder", copy, shard_size=10, max_size=40)


def test_max_size_stores_large_images_resized_upright_and_small_ones_as_they_are(tmp_path):
    import webdataset
    from PIL import Image, ImageOps

    from kdforge.data.synthetic import write_photo_folder
    from kdforge.errors import DataError

    folder = write_photo_folder(tmp_path / "folder", train=6, test=2, classes=2, size=(120, 90))
    small = sorted((folder / "train").rglob("*.jpg"))[0]
    stream = io.BytesIO()
    ImageOps.fit(Image.open(small), (50, 30)).save(stream, "JPEG")
    small.write_bytes(stream.getvalue())  # below --max-size: stored as it is
    rotated = sorted((folder / "train").rglob("*.jpg"))[1]
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: 90 x 120 upright
    Image.open(rotated).save(rotated, exif=exif)
    with pytest.raises(DataError, match="--max-size must be at least 32"):
        write_shards(folder, tmp_path / "bad", max_size=16)
    assert not (tmp_path / "bad").exists()

    write_shards(folder, tmp_path / "shards", max_size=60)
    samples = list(webdataset.WebDataset(sorted(str(p) for p in (tmp_path / "shards" / "train").glob("*.tar")),
                                         shardshuffle=False))
    sizes = [Image.open(io.BytesIO(sample["jpg"])).size for sample in samples]
    assert sizes.count((50, 30)) == 1 and sizes.count((45, 60)) == 1 and sizes.count((60, 45)) == 4, sizes
    assert small.read_bytes() in [sample["jpg"] for sample in samples]  # its own bytes
    data = load_dataset(photo_recipe(tmp_path, tmp_path / "shards", "webdataset", "in_memory = false\n").data)
    assert data.train.images.views(torch.arange(3), 0, 0).shape == (3, 3, 32, 32)


def test_a_damaged_shard_is_one_clear_error(photos, tmp_path):
    import shutil

    from kdforge.errors import DataError

    copy = tmp_path / "shards"
    shutil.copytree(photos / "shards", copy)
    (copy / "train" / "shard-000001.tar").write_bytes(b"not a tar")
    with pytest.raises(DataError, match="shard-000001.tar: not a readable tar shard"):
        scan_shards(copy)
    (copy / "classes.txt").unlink()
    with pytest.raises(DataError, match="classes.txt is missing"):
        scan_shards(copy)


# ----------------------------------------------------------------------------------------------------------
# one decision: in memory or streamed


def index_of(count: int) -> FolderIndex:
    return FolderIndex(("a",), {"train": SplitIndex([SampleRef("x")] * count, [0] * count)}, "ImageFolder")


def test_in_memory_auto_decides_from_size_and_augmentations_and_says_why(tmp_path):
    def data(**keys):
        return validate_recipe({"name": "r", "data": {"dataset": "imagefolder", "image_size": 224, **keys}}).data

    ten_k = index_of(10_000)  # 1.5 GB decoded at 224
    assert resolve_in_memory(data(), ten_k, free=16e9) == (True, "1.51 GB decoded at 224x224 fits in the 16.0 GB "
                                                                  "of memory available")
    in_memory, why = resolve_in_memory(data(), ten_k, free=4e9)
    assert not in_memory and "more than 25% of the 4.0 GB" in why
    in_memory, why = resolve_in_memory(data(augment={"auto_augment": "rand-m9-mstd0.5"}), index_of(10), free=16e9)
    assert not in_memory and "auto_augment crop from the source images" in why
    assert resolve_in_memory(data(in_memory=True), ten_k, free=1e9)[0]
    assert not resolve_in_memory(data(in_memory=False), index_of(10), free=16e9)[0]
    # what cannot work is refused before anything runs
    with pytest.raises(RecipeError, match="synthetic dataset is always held in memory"):
        validate_recipe({"name": "r", "data": {"in_memory": False}})
    with pytest.raises(RecipeError, match="in_memory = true with augment.scale"):
        validate_recipe({"name": "r", "data": {"dataset": "imagefolder", "in_memory": True,
                                               "augment": {"scale": [0.5, 1.0]}}})
    with pytest.raises(RecipeError, match="auto_augment policy 'bogus'"):
        validate_recipe({"name": "r", "data": {"dataset": "imagefolder", "augment": {"auto_augment": "bogus"}}})
    with pytest.raises(RecipeError, match="batch_size must be even"):
        validate_recipe({"name": "r", "data": {"augment": {"mixup": 0.2}}, "train": {"batch_size": 7},
                         "student": {"model": "resnet18"}})


def test_the_decode_cache_decodes_each_image_once_for_every_later_load(photos, tmp_path, monkeypatch):
    import kdforge.data.stream as stream

    monkeypatch.setenv("KDFORGE_CACHE_DIR", str(tmp_path / "cache"))
    decoded = []
    real = stream.decode_rgb
    monkeypatch.setattr(stream, "decode_rgb", lambda source, size: decoded.append(source) or real(source, size))
    recipe = photo_recipe(tmp_path, photos / "folder", body="in_memory = true\n", overrides=("data.workers=0",))
    first = load_dataset(recipe.data, recipe.seed)
    assert len(decoded) == PHOTOS["train"] + PHOTOS["test"] and not first.streamed
    assert "decoded once" in first.description and len(list((tmp_path / "cache" / "decoded").glob("*.npy"))) == 2
    second = load_dataset(recipe.data, recipe.seed)  # the next stage, the export, verification: read, not decoded
    assert len(decoded) == PHOTOS["train"] + PHOTOS["test"]
    everything = torch.arange(len(first.test))
    assert torch.equal(first.test.images[everything], second.test.images[everything])
    # the same pixels the streamed path and the server decode
    files = FileImages(scan_imagefolder(photos / "folder").splits["test"].refs, 32)
    assert torch.equal(second.test.images[everything], files[everything])
    # a changed image is a changed key: decoded again
    victim = Path(scan_imagefolder(photos / "folder").splits["test"].refs[0].path)
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 1_000_000))
    before = len(decoded)
    load_dataset(recipe.data, recipe.seed)
    assert len(decoded) - before == PHOTOS["test"]  # the test split's cache only


# ----------------------------------------------------------------------------------------------------------
# [data] decode = "gpu": the workers plan, the training process decodes (tested on the CPU up to the device call)


@pytest.fixture(scope="module")
def big_photos(tmp_path_factory) -> Path:
    from kdforge.data.synthetic import write_photo_folder

    root = tmp_path_factory.mktemp("big-photos")
    write_photo_folder(root, train=12, test=2, classes=2, size=(320, 240))
    return root


@pytest.mark.parametrize("size", [224, 32])
def test_views_decoded_in_one_batch_on_the_device_are_the_workers_views(big_photos, size):
    """The same crop and flip from the same seeded draws; at 224 the boxes need the whole resolution and both
    paths decode it with libjpeg-turbo: the same pixels. At 32 the workers decode at 1/2-1/8 (DCT scaling), the
    device path at full size: the same views within resampling (mean under 2 of 255)."""
    import random

    from kdforge.data.crops import ViewPlan, crop_view, finish_views, plan_view

    files = sorted((big_photos / "train").rglob("*.jpg"))
    plans = [plan_view(f.read_bytes(), random.Random(i), size, (0.08, 1.0), (0.75, 4 / 3)) for i, f in enumerate(files)]
    assert all(isinstance(plan, ViewPlan) for plan in plans)  # nothing decoded in the worker
    made = finish_views(plans, size, "cpu")
    workers = torch.stack([crop_view(f.read_bytes(), random.Random(i), size, (0.08, 1.0), (0.75, 4 / 3))
                           for i, f in enumerate(files)])
    assert made.shape == workers.shape == (len(files), 3, size, size) and made.dtype == torch.uint8
    difference = (made.int() - workers.int()).abs().float()
    if size == 224:
        assert difference.max() == 0
    else:
        assert difference.flatten(1).mean(1).max() < 2


def test_decode_on_the_device_decodes_each_batch_in_one_call_on_the_training_device(photos, tmp_path,
                                                                                     monkeypatch):
    """The loop hands torchvision's batched decoder every JPEG of a batch at once, with the training device (CUDA
    when there is one; the CPU here: the call a GPU machine makes, short of nvJPEG itself)."""
    import torchvision.io

    calls = []
    real = torchvision.io.decode_jpeg

    def recording(data, *args, device="cpu", **kwargs):
        calls.append((len(data), str(device)))
        return real(data, *args, device=device, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", recording)
    recipe = photo_recipe(tmp_path, photos / "folder", body='in_memory = false\ndecode = "gpu"\n')
    data = load_dataset(recipe.data, recipe.seed)
    source = BatchSource(recipe.data.augment, seed=0)
    order = source.batch_indices(len(data.train), 8, epoch=0, index=0)
    images, _ = source.images(data.train, order, slice(None), order, step=0, epoch=0)
    assert calls == [(8, "cpu")] and images.shape == (8, 3, 32, 32)
    cpu = photo_recipe(tmp_path, photos / "folder", body="in_memory = false\n", name="cpu")
    plain = BatchSource(cpu.data.augment, seed=0)
    assert torch.equal(plain.batch_indices(len(data.train), 8, epoch=0, index=0), order)
    same, _ = plain.images(load_dataset(cpu.data, cpu.seed).train, order, slice(None), order, step=0, epoch=0)
    assert (images.int() - same.int()).abs().float().mean() < 2  # the workers' views of the same draws


def test_decode_on_the_device_is_refused_where_it_cannot_make_the_views(photos, tmp_path):
    with pytest.raises(RecipeError, match="set in_memory = false"):
        photo_recipe(tmp_path, photos / "folder", body='decode = "gpu"\n')
    with pytest.raises(RecipeError, match='augment.auto_augment is made by timm on the CPU: use decode = "cpu"'):
        photo_recipe(tmp_path, photos / "folder",
                     body='in_memory = false\ndecode = "gpu"\naugment = { auto_augment = "rand-m9-mstd0.5" }\n')


# ----------------------------------------------------------------------------------------------------------
# training on streamed data


@pytest.mark.slow
def test_streamed_training_resumes_exactly_mid_epoch(photos, tmp_path):
    body = 'in_memory = false\naugment = { auto_augment = "rand-m9-mstd0.5", re_prob = 0.5, cutmix = 1.0 }\n'
    recipe = photo_recipe(tmp_path, photos / "folder", body=body, overrides=("train.checkpoint_every=3",))
    whole = train_stage(recipe, "teacher", runs_dir=tmp_path / "a", consumers=QUIET)
    assert whole.steps == 10  # 2 epochs of 43 training images (5 validation) at batch 8: 5 full batches each

    # the same run stopped after its step-3 checkpoint (mid-epoch: 5 steps an epoch), then resumed
    class Stop(Exception):
        pass

    def stop_at_step_4(event):
        if event["event"] == "step" and event["step"] == 4:
            raise Stop

    stopped = tmp_path / "b" / "photos" / "teacher"
    with pytest.raises(Stop):
        train_stage(recipe, "teacher", runs_dir=tmp_path / "b", consumers=[stop_at_step_4])
    assert not (stopped / "result.json").exists()
    events = []
    resumed = train_stage(recipe, "teacher", runs_dir=tmp_path / "b", resume=True, consumers=[events.append])
    assert [e["step"] for e in events if e["event"] == "start"] == [3]
    assert resumed.steps == 10
    a = load_file(tmp_path / "a" / "photos" / "teacher" / "last" / "model.safetensors")
    b = load_file(stopped / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [e for e in events if e["event"] == "log"]
    assert logs and all(0 <= e["data_wait"] <= 1 for e in logs)  # the data path's share of step time is shown
    assert any("waiting for the first batch" in e.get("message", "") for e in events)


def test_each_process_decodes_only_its_share_of_every_global_batch(photos, tmp_path):
    recipe = photo_recipe(tmp_path, photos / "folder", body="in_memory = false\n", overrides=("data.workers=0",))
    data = load_dataset(recipe.data, recipe.seed)  # no workers: the spy below records in this process
    read: dict[int, list[int]] = {0: [], 1: []}
    epoch = []
    for rank in (0, 1):
        source = BatchSource(recipe.data.augment, recipe.seed)
        views = data.train.images.base.views

        def spy(idx, *args, rank=rank, views=views):
            read[rank].extend(int(i) for i in idx)
            return views(idx, *args)

        data.train.images.base.views = spy  # the validation split's subset reads through its base
        mine = slice(rank, None, 2)
        for index in range(5):
            batch = source.batch_indices(len(data.train), 8, 0, index)
            epoch += batch.tolist() if rank == 0 else []
            source.images(data.train, batch, mine, batch[mine], index, 0, index, 5 - index)
        del data.train.images.base.views
    base_index = data.train.images.index
    assert not set(read[0]) & set(read[1])
    assert sorted(read[0] + read[1]) == sorted(int(base_index[i]) for i in epoch) and len(epoch) == 40


@pytest.mark.heavy
def test_two_gloo_processes_on_streamed_data_train_what_one_process_trains(photos, tmp_path):
    """Each process decodes its half of every global batch: the averaged gradients are those of the whole batch."""
    recipe = tmp_path / "ddp.toml"
    recipe.write_text(
        f'name = "ddp"\n[data]\ndataset = "webdataset"\nroot = "{photos / "shards"}"\nimage_size = 32\n'
        'in_memory = false\nworkers = 1\naugment = { scale = [0.5, 1.0] }\n[runtime]\ndevice = "cpu"\nthreads = 1\n'
        '[train]\nepochs = 1\nbatch_size = 8\nlr = 3e-3\nlog_every = 5\n[teacher]\nmodel = "test_convnext"\n'
        'input_size = 32\n[student]\nmodel = "test_convnext"\ninput_size = 32\n')
    weights = {}
    for nproc in (1, 2):
        runs = tmp_path / f"runs{nproc}"
        command = [sys.executable, "-m", "kdforge", "teacher", str(recipe), "--runs-dir", str(runs), "--nproc",
                   str(nproc)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert done.returncode == 0, done.stderr[-3000:]
        weights[nproc] = load_file(str(runs / "ddp" / "teacher" / "last" / "model.safetensors"))
        assert json.loads((runs / "ddp" / "teacher" / "result.json").read_text())["steps"] == 5
    assert max((weights[1][k].float() - weights[2][k].float()).abs().max().item() for k in weights[1]) < 1e-3


@pytest.mark.slow
def test_mixup_mixes_what_the_teacher_and_the_student_both_see(photos, tmp_path):
    from kdforge.data.transforms import mix_batch

    recipe = photo_recipe(tmp_path, photos / "folder", body="augment = { mixup = 0.4 }\n",
                          overrides=("data.in_memory=true",))
    data = load_dataset(recipe.data, recipe.seed)
    images, labels = data.train.images[torch.arange(8)], data.train.labels[:8]
    mixed, targets = mix_batch(images, labels, recipe.data.augment, 4, seed=11)
    again, _ = mix_batch(images, labels, recipe.data.augment, 4, seed=11)
    assert torch.equal(mixed, again) and mixed.dtype == torch.uint8 and not torch.equal(mixed, images)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    lam = targets[0, labels[0]].item() if labels[0] != labels[7] else None
    if lam is not None:  # image 0 is mixed with image 7, the batch's mirror
        expected = (images[0].float() * lam + images[7].float() * (1 - lam)).round()
        assert (mixed[0].float() - expected).abs().max() <= 1

    # through distillation: the objective (and so the teacher) gets the mixed batch the student trains on
    seen = []
    from kdforge.distill import objective as objective_module

    real = objective_module.create_distill_objective

    def spying(cfg, teacher, label_smoothing=0.0, projectors=None):
        def wrapped(images, *args, **kwargs):
            seen.append(images)
            return teacher(images, *args, **kwargs)
        inner = real(cfg, wrapped if teacher is not None else None, label_smoothing, projectors)
        return inner

    with pytest.MonkeyPatch.context() as patch:
        import kdforge.train.assemble as assemble

        patch.setattr(assemble, "create_distill_objective", spying)
        train_stage(recipe, "teacher", runs_dir=tmp_path / "runs", consumers=QUIET)
        result = train_stage(recipe, "student", runs_dir=tmp_path / "runs", consumers=QUIET)
    assert result.steps == 10 and len(seen) == 10
    source = BatchSource(recipe.data.augment, recipe.seed)
    batch = source.batch_indices(len(data.train), 8, 0, 0)
    unmixed, _ = source.images(data.train, batch, slice(None), batch, 0, 0)
    expected, _ = source.mix(unmixed, data.train.labels[batch], 4, 0)
    assert torch.equal(seen[0], expected)


@pytest.mark.slow
def test_the_teacher_cache_on_streamed_data_answers_for_the_view_the_student_sees(photos, tmp_path):
    body = "in_memory = false\n[distill]\nbaseline = false\nteacher_cache = { views = 2 }\n"
    recipe = photo_recipe(tmp_path, photos / "shards", "webdataset", body=body)
    train_stage(recipe, "teacher", runs_dir=tmp_path / "runs", consumers=QUIET)
    notes = []
    result = train_stage(recipe, "student", runs_dir=tmp_path / "runs", consumers=[notes.append])
    assert result.steps == 10
    assert any("running the teacher on 2 view(s)" in e.get("message", "") for e in notes)

    from kdforge.distill.cache import TeacherCache
    from kdforge.distill.teacher import load_frozen_teacher
    from kdforge.runtime import runtime_scope

    data = load_dataset(recipe.data, recipe.seed)
    stored = load_file(tmp_path / "runs" / "photos" / "teacher_cache.safetensors")
    with runtime_scope(recipe.runtime) as runtime:
        cache = TeacherCache(stored, len(data.train), recipe.seed, recipe.data.augment, runtime.device, True)
        source = BatchSource(recipe.data.augment, recipe.seed, cache)
        batch = source.batch_indices(len(data.train), 8, 1, 2)
        images, logits = source.images(data.train, batch, slice(None), batch, 7, 1, 2, 3)
        teacher = load_frozen_teacher(recipe.model_for("teacher"), tmp_path / "runs" / "photos" / "teacher" / "last"
                                      / "model.safetensors", 4)
        fresh = teacher(images)
    torch.testing.assert_close(logits, fresh, atol=2e-2, rtol=0)  # stored as FP16


def test_data_shard_command_writes_shards_and_refuses_a_folder_that_is_not_an_imagefolder(photos, tmp_path):
    from typer.testing import CliRunner

    from kdforge.cli import app

    done = CliRunner().invoke(app, ["data", "shard", str(photos / "folder"), "--out", str(tmp_path / "s"),
                                    "--shard-size", "20"])
    assert done.exit_code == 0, done.output
    assert "wrote 4 shard(s) (0 kept from an earlier run) of 48 train + 16 test images" in done.output
    assert len(scan_shards(tmp_path / "s").splits["train"].refs) == PHOTOS["train"]
    bad = CliRunner().invoke(app, ["data", "shard", str(tmp_path / "nowhere"), "--out", str(tmp_path / "t")])
    assert bad.exit_code == 1 and "is not a folder" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "t").exists()  # nothing is created before the input is checked


def test_the_verification_batch_follows_the_input_size():
    from kdforge.recipe import ModelConfig
    from kdforge.verify import resolve_verify_batch

    assert resolve_verify_batch(None, ModelConfig(model="resnet18", input_size=32)) == 256
    assert resolve_verify_batch(None, ModelConfig(model="resnet18", input_size=224)) == 20
    assert resolve_verify_batch(64, ModelConfig(model="resnet18", input_size=224)) == 64  # as the recipe says


def test_mixup_with_a_teacher_cache_is_refused_the_cache_answers_for_unmixed_views():
    with pytest.raises(RecipeError, match="answers for unmixed views"):
        validate_recipe({"name": "r", "data": {"augment": {"cutmix": 1.0}}, "distill": {"teacher_cache": {"views": 2}}})
