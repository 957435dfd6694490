from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from kdforge.data.synthetic import write_synthetic

SYNTH = {"train": 1000, "test": 300, "seed": 0}


def synth_data_section(root: Path) -> str:
    """The [data] section of a recipe on the small synthetic dataset at `root`."""
    return (f'[data]\ndataset = "synthetic"\nroot = "{root}"\n'
            f"synthetic = {{ train = {SYNTH['train']}, test = {SYNTH['test']}, seed = {SYNTH['seed']} }}\n")


# Fixtures that train (once per session or module): a test that asks for one, directly or through another fixture,
# is slow whatever its own marks say, and `make test-fast` leaves it out.
TRAINED_FIXTURES = frozenset({"trained_students", "every_format", "served_export", "export_copy",  # conftest
                              "vit_export", "device_bundles",
                              "chain", "distilled_run", "auto_chain", "searched", "method_runs"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def refuse_training(patch: pytest.MonkeyPatch, why: str) -> None:
    """Make the training loop (`fit`, wherever it is imported) raise AssertionError(`why`)."""
    import kdforge.train.assemble
    from kdforge.train import loop

    def refuse(*args, **kwargs):
        raise AssertionError(why)

    real = loop.fit
    for module in (loop, kdforge.train.assemble):  # every training run is assembled there
        if getattr(module, "fit", None) is real:
            patch.setattr(module, "fit", refuse)


@pytest.fixture(scope="session", autouse=True)
def fast_lane_trains_nothing(request):
    """In the lane without slow tests (`make test-fast`), nothing trains, fixtures included."""
    if "not slow" not in (request.config.getoption("markexpr") or ""):
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        refuse_training(patch, "a test or fixture of the fast lane trains a model: mark the test slow (a fixture "
                               "that trains: add it to TRAINED_FIXTURES in tests/conftest.py)")
        yield


@pytest.fixture(autouse=True)
def unmarked_tests_train_nothing(request, monkeypatch):
    """In any lane: a test without the slow or heavy mark that trains fails, naming itself."""
    if not (request.node.get_closest_marker("slow") or request.node.get_closest_marker("heavy")):
        refuse_training(monkeypatch, f"{request.node.nodeid} trains a model: mark it slow, or use a shared trained "
                                     "fixture")


@pytest.fixture(scope="session", autouse=True)
def decode_cache(tmp_path_factory) -> Path:
    """The decode cache of ImageFolder/WebDataset data lives in the session's temporary folder, not ~/.cache."""
    root = tmp_path_factory.mktemp("decode-cache")
    os.environ["KDFORGE_CACHE_DIR"] = str(root)
    return root


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic dataset in the official CIFAR-100 format, generated once per test session."""
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, **SYNTH)
    return root


@pytest.fixture
def make_recipe(tmp_path, synth_root):
    """Write a recipe on the small synthetic dataset with tiny models; `body` adds or replaces sections."""

    def make(body: str = "", name: str = "tiny", data: bool = True) -> Path:
        data_section = synth_data_section(synth_root) if data else ""
        path = tmp_path / f"{name}.toml"
        path.write_text(data_section + textwrap.dedent(body))
        return path

    return make


TINY_MODELS = """
[runtime]
device = "cpu"
threads = 2

[train]
epochs = 1
batch_size = 50
lr = 3e-3
log_every = 5

[teacher]
model = "test_resnet"
input_size = 32

[student]
model = "test_convnext"
input_size = 32
"""


@pytest.fixture(scope="session")
def trained_students(tmp_path_factory, synth_root):
    """A small CNN and a small ViT trained on the small synthetic dataset (a few seconds each), shared by the
    INT8 tests: {"cnn": stage folder, "vit": stage folder}."""
    from kdforge.recipe import load_recipe
    from kdforge.train.stages import train_stage

    root = tmp_path_factory.mktemp("trained")
    vit_at_32 = ["student.model_kwargs.img_size=32", "student.model_kwargs.patch_size=4"]
    students = {"cnn": ('model = "test_convnext"', []), "vit": ('model = "test_vit"', vit_at_32)}
    stages = {}
    for kind, (model_line, extra) in students.items():
        path = root / f"{kind}.toml"
        path.write_text(synth_data_section(synth_root) + TINY_MODELS.replace('model = "test_convnext"', model_line))
        recipe = load_recipe(path, ["train.epochs=3", "train.lr=4e-3", f"export.dir={root / 'exports'}",
                                    "verify.batch_size=100", "quantize.calibration=200", *extra])
        stages[kind] = Path(train_stage(recipe, "baseline", runs_dir=root / "runs", consumers=[]).stage_dir)
    return stages


def count_reads(monkeypatch, name: str) -> list[int]:
    """Every read of dataset `name` (through any import of load_dataset) appends to the returned list."""
    from kdforge.data import DATASETS

    reads: list[int] = []
    loader = DATASETS.get(name)
    monkeypatch.setitem(DATASETS._items, name, lambda cfg: reads.append(1) or loader(cfg))
    return reads


@pytest.fixture(scope="session")
def every_format(trained_students, tmp_path_factory):
    """One export of every format this machine can make, from the shared small CNN (the dataset read once):
    (ExportResult, the formats it could not make -> why, the number of dataset reads). Shared by the registry's
    per-format tests and the on-device formats' tests; a test that writes into it writes only bench.json."""
    from kdforge.export.artifacts import export_run, unbuildable_here
    from kdforge.formats import FORMATS

    unavailable = unbuildable_here(list(FORMATS))
    with pytest.MonkeyPatch.context() as patch:
        reads = count_reads(patch, "synthetic")
        result = export_run(trained_students["cnn"], [n for n in FORMATS if n not in unavailable],
                            exports_dir=tmp_path_factory.mktemp("every-format"))
    return result, unavailable, len(reads)


@pytest.fixture(scope="session")
def served_export(trained_students, tmp_path_factory):
    """An export folder with verified ONNX and INT8 students, and test-split images as PNG files."""
    from PIL import Image

    from kdforge.data import load_dataset
    from kdforge.export.artifacts import export_run
    from kdforge.recipe import load_recipe

    out = tmp_path_factory.mktemp("served")
    result = export_run(trained_students["cnn"], ["onnx", "int8"], exports_dir=out)
    data = load_dataset(load_recipe(trained_students["cnn"] / "recipe.toml").data)
    pngs = []
    for i in range(6):
        path = out / f"test_{i}.png"
        Image.fromarray(data.test.images[i].permute(1, 2, 0).numpy()).save(path)
        pngs.append(path)
    return result.export_dir, pngs


@pytest.fixture(scope="session")
def vit_export(tmp_path_factory, synth_root):
    """A small ViT at a fixed input size (20 steps; timm's dynamic_img_size resamples the position embedding with an
    operator LiteRT's converter lacks) exported to ONNX, INT8 ONNX and, where litert-torch is installed, LiteRT (a
    ViT's LiteRT file runs one image per call): the export folder."""
    from kdforge.export.artifacts import export_run, unbuildable_here
    from kdforge.recipe import load_recipe
    from kdforge.train.stages import train_stage

    root = tmp_path_factory.mktemp("vit-export")
    path = root / "vit.toml"
    path.write_text(synth_data_section(synth_root) + TINY_MODELS.replace('model = "test_convnext"',
                                                                         'model = "test_vit"'))
    recipe = load_recipe(path, ["student.model_kwargs.img_size=32", "student.model_kwargs.patch_size=4",
                                "student.model_kwargs.dynamic_img_size=false", "student.model_kwargs.depth=2",
                                "train.max_steps=20", "verify.batch_size=100", "quantize.calibration=200"])
    stage = train_stage(recipe, "baseline", runs_dir=root / "runs", consumers=[]).stage_dir
    formats = [name for name in ("onnx", "int8", "litert") if name not in unbuildable_here([name])]
    return export_run(Path(stage), formats, exports_dir=root / "exports").export_dir


@pytest.fixture(scope="session")
def device_bundles(every_format, vit_export, trained_students, tmp_path_factory):
    """Device bundles (kdforge bundle) of 100 test images: "cnn" (every servable format of the shared small CNN),
    "vit" (the small ViT's) and "bad": the CNN's with its INT8 ONNX changed after bundling (tampered: its sha256 no
    longer matches) and its FP32 ONNX replaced, manifest and all, by one exported for BGR input (the wrong channel
    layout: hashes match, answers do not). {name: bundle folder}; each has its .tar beside it."""
    from kdforge.bundle import make_bundle

    root = tmp_path_factory.mktemp("bundles")
    bundles = {"cnn": make_bundle(every_format[0].export_dir, root / "cnn", images=100).folder,
               "vit": make_bundle(vit_export, root / "vit", images=100).folder}
    bundles["bad"] = spoil_bundle(bundles["cnn"], trained_students["cnn"], root / "bad")
    return bundles


def spoil_bundle(bundle: Path, stage_dir: Path, out: Path) -> Path:
    """A copy of `bundle` with student.int8.onnx tampered with and student.onnx exported for BGR input (see
    `device_bundles`), packed as out.tar too."""
    import json
    import shutil
    import tarfile

    import torch

    from kdforge.export.converters import torch_to_onnx
    from kdforge.fileio import file_hash
    from kdforge.models import load_stage_model

    shutil.copytree(bundle, out)
    manifest = json.loads((out / "bundle.json").read_text())
    with (out / "student.int8.onnx").open("ab") as f:  # changed on the way to the device
        f.write(b"\0" * 64)
    student = load_stage_model(stage_dir, manifest["num_classes"])

    class ExpectsBGR(torch.nn.Module):  # a file exported for the other channel order
        def __init__(self) -> None:
            super().__init__()
            self.student = student

        def forward(self, x):
            return self.student(x.flip(1))

    torch_to_onnx(ExpectsBGR(), manifest["input_size"], out / "student.onnx", 17, {})
    entry = manifest["formats"]["onnx"]
    entry["sha256"], entry["bytes"] = file_hash(out / "student.onnx"), (out / "student.onnx").stat().st_size
    manifest["files"]["student.onnx"] = entry["sha256"]
    (out / "bundle.json").write_text(json.dumps(manifest))
    with tarfile.open(out.with_suffix(".tar"), "w") as archive:
        archive.add(out, arcname=out.name)
    return out


@pytest.fixture
def export_copy(served_export, tmp_path):
    """A private copy of the served export (without bench.json) that a test may damage or extend."""
    import shutil

    export_dir, _ = served_export
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy, ignore=shutil.ignore_patterns("bench.json"))
    return copy


# A sitecustomize module that makes torch, torchvision and timm unimportable in a subprocess: what a command that
# promises not to need them is run under. With KDFORGE_REPORT_IMPORTS set it lets the import through instead and
# first prints one line, "importing <name>", so a test can see what the command said before it needed torch.
_BLOCKER = '''
import os, sys

HEAVY = ("torch", "torchvision", "timm")


class _Heavy:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in HEAVY:
            return None
        if os.environ.get("KDFORGE_REPORT_IMPORTS"):
            print(f"importing {name}", flush=True)
            sys.meta_path.remove(self)
            return None
        raise ImportError(f"{name} is made unimportable by this test")


sys.meta_path.insert(0, _Heavy())
'''


def without_torch_env(folder: Path, report: bool = False) -> dict[str, str]:
    """The environment of a subprocess in which torch, torchvision and timm cannot be imported (`report`: they can,
    after the line "importing <name>"); the index of timm's model names is already in the session's cache."""
    from kdforge.model_names import timm_model_names

    timm_model_names()  # writes the index for this timm into $KDFORGE_CACHE_DIR (the session's) when missing
    (folder / "sitecustomize.py").write_text(_BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}
    env.pop("KDFORGE_REPORT_IMPORTS", None)
    return {**env, "KDFORGE_REPORT_IMPORTS": "1"} if report else env
