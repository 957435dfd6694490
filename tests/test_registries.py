"""Every entry of the registries has a test of its own: these tests walk METHODS, DATASETS and FORMATS (as timm's
tests walk `list_models`), so a new method, dataset or format fails here until it has its golden values or its
end-to-end run, instead of passing unseen."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdforge.data import DATASETS
from kdforge.distill.losses import METHODS
from kdforge.formats import FORMATS
from kdforge.recipe import DATASET_NAMES, METHOD_NAMES, DistillConfig, load_recipe

from .conftest import SYNTH, TINY_MODELS, count_reads, synth_data_section

S = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])  # student logits
T = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, -1.0]])  # teacher logits
LABELS = torch.tensor([2, 0])

# method -> (cross-entropy weight, {term: (weight, value)}) on S, T, LABELS at temperature 2, [distill] defaults
# otherwise; each value checked by hand (the formulas are written out in tests/test_distill.py)
GOLDEN = {
    "kd": (0.5, {"kd": (0.5, 1.6361172)}),  # alpha = 0.5: KL(softmax(t/2) || softmax(s/2)) x 4, batch mean
    "hard": (0.5, {"hard": (0.5, 2.8244586)}),  # CE against the teacher's argmax: (-log 0.0900 - log 0.0391) / 2
    "dkd": (1.0, {"tckd": (1.0, 0.4450171), "nckd": (8.0, 1.6765152)}),  # dkd_alpha 1, dkd_beta 8
    # dist_beta 1, dist_gamma 1: (1 - mean Pearson correlation) x 4 per image (inter) and per class (intra); two
    # images make each class's correlation +-1, and the teacher's third class is constant: correlation 0 (eps)
    "dist": (1.0, {"inter": (1.0, 7.8040814), "intra": (1.0, 6.6666641)}),
    # ofa_eps 1, ofa_temperature 1: the soft cross-entropy -sum softmax(t) log softmax(s), batch mean (the student's
    # intermediate stages add one such term each: tests/test_distill.py)
    "ofa": (1.0, {"ofa": (1.0, 2.2934716)}),
    # Hinton KD on the logits as "kd" (the feature hints are added by the objective: tests/test_distill.py)
    "fitnet": (0.5, {"kd": (0.5, 1.6361172)}),
}


def test_the_recipe_names_every_registered_dataset_and_method_and_nothing_else():
    assert sorted(DATASET_NAMES) == list(DATASETS)
    assert sorted(METHOD_NAMES) == list(METHODS)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_has_golden_values_through_the_objective(method):
    from kdforge.distill.objective import create_distill_objective

    assert method in GOLDEN, f"method {method!r} has no golden values: add them to GOLDEN"
    ce_weight, terms = GOLDEN[method]
    cfg = DistillConfig(method=method, temperature=2.0)
    computed = METHODS.get(method)(S, T, LABELS, cfg)
    assert set(computed) == set(terms)
    for name, (weight, value) in terms.items():
        assert computed[name][0] == weight and computed[name][1].item() == pytest.approx(value, rel=1e-6)
    images = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    loss, parts = create_distill_objective(cfg, None)(S, LABELS, images, teacher_logits=T)
    expected = ce_weight * F.cross_entropy(S, LABELS).item() + sum(w * v for w, v in terms.values())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(parts) == {"ce", *terms}


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory, synth_root) -> Path:
    """A runs folder whose one tiny teacher every method's student distills from (trained by the first)."""
    return tmp_path_factory.mktemp("methods")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_distills_a_student_through_the_chain(method, method_runs, synth_root):
    """The chain trains a student with each method; every one of the method's terms is logged, finite."""
    from kdforge.pipeline import run_distill

    path = method_runs / f"{method}.toml"
    path.write_text(synth_data_section(synth_root) + TINY_MODELS
                    + f'\n[distill]\nmethod = "{method}"\nbaseline = false\n\n[export]\nformats = []\n')
    summary = run_distill(load_recipe(path, ["train.max_steps=4", "train.log_every=2",
                                             "train.limit_eval_batches=1"]), method_runs, consumers=[])
    assert 0.0 <= summary.student["top1"] <= 1.0
    metrics = method_runs / method / "student" / "metrics.jsonl"
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    logged = [event for event in events if any(key.startswith("loss_") for key in event)]
    terms = set(METHODS.get(method)(S, T, LABELS, DistillConfig(method=method)))
    assert logged and all(math.isfinite(event[f"loss_{term}"]) for event in logged for term in {"ce", *terms})


# ----------------------------------------------------------------------------------------------------------
# every dataset: a student trained on it, exported, verified; the export reads the data once


def _cifar100(tmp_path: Path, synth_root: Path, monkeypatch) -> str:
    """CIFAR-100's own loader on files in the official format (generated: the real set cannot be downloaded
    here), its checksums replaced by the generated files' own."""
    from kdforge.data import cifar
    from kdforge.fileio import file_hash

    folder = synth_root / cifar.FOLDER
    monkeypatch.setattr(cifar, "OFFICIAL_MD5", {name: file_hash(folder / name, "md5") for name in cifar.OFFICIAL_MD5})
    return f'[data]\ndataset = "cifar100"\nroot = "{synth_root}"\n'


def _synthetic(tmp_path: Path, synth_root: Path, monkeypatch) -> str:
    return synth_data_section(synth_root)


def _imagefolder(tmp_path: Path, synth_root: Path, monkeypatch) -> str:
    from kdforge.data.synthetic import write_photo_folder

    write_photo_folder(tmp_path / "photos", train=24, test=12, classes=3, size=(40, 30))
    return f'[data]\ndataset = "imagefolder"\nroot = "{tmp_path / "photos"}"\nimage_size = 32\nworkers = 1\n'


def _webdataset(tmp_path: Path, synth_root: Path, monkeypatch) -> str:
    from kdforge.data.shards import write_shards
    from kdforge.data.synthetic import write_photo_folder

    write_photo_folder(tmp_path / "photos", train=24, test=12, classes=3, size=(40, 30))
    write_shards(tmp_path / "photos", tmp_path / "shards", shard_size=10)
    return f'[data]\ndataset = "webdataset"\nroot = "{tmp_path / "shards"}"\nimage_size = 32\nworkers = 1\n'


DATA_SECTIONS = {"cifar100": _cifar100, "synthetic": _synthetic, "imagefolder": _imagefolder,
                 "webdataset": _webdataset}


@pytest.mark.slow
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_every_dataset_trains_exports_and_verifies_reading_the_data_once_per_export(dataset, tmp_path, synth_root,
                                                                                   monkeypatch):
    from kdforge.export.artifacts import export_run
    from kdforge.train.stages import train_stage

    assert dataset in DATA_SECTIONS, f"dataset {dataset!r} has no end-to-end test: add it to DATA_SECTIONS"
    path = tmp_path / "recipe.toml"
    path.write_text(DATA_SECTIONS[dataset](tmp_path, synth_root, monkeypatch) + TINY_MODELS)
    recipe = load_recipe(path, ["train.max_steps=3", "train.batch_size=8", "train.limit_eval_batches=1",
                                f"export.dir={tmp_path / 'exports'}", "verify.batch_size=50"])
    stage = train_stage(recipe, "baseline", runs_dir=tmp_path / "runs", consumers=[])
    assert stage.steps >= 2  # at most 3; an epoch of the small folders is 2 batches of 8

    reads = count_reads(monkeypatch, dataset)
    result = export_run(Path(stage.stage_dir), ["onnx", "int8"], recipe=recipe)
    assert len(reads) == 1  # the export and the verification of both formats share one read
    expected = SYNTH["test"] if dataset in ("cifar100", "synthetic") else 12
    assert result.reports["onnx"].count == expected and result.reports["onnx"].passed
    assert result.reports["int8"].count == expected


# ----------------------------------------------------------------------------------------------------------
# every format: made, verified, opened by its runner (and by the server when it is served)


@pytest.mark.heavy  # the on-device formats' conversions: about a minute on 2 cores
def test_one_export_of_every_format_reads_the_data_once(every_format):
    result, unavailable, reads = every_format
    assert reads == 1 and set(result.artifacts) | set(unavailable) == set(FORMATS)


@pytest.mark.heavy
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_is_verified_and_opened_by_its_runner(every_format, name, tmp_path):
    import numpy as np

    from kdforge.fileio import read_metadata
    from kdforge.runners import open_export

    result, unavailable, _ = every_format
    if name in unavailable:
        assert FORMATS.get(name).needs_gpu or FORMATS.get(name).requires, unavailable[name]
        pytest.skip(f"{name} cannot be made on this machine: {unavailable[name]} (tests/test_tensorrt.py, gpu)")
    report = result.reports[name]
    assert report.passed, report.failures
    meta = read_metadata(result.export_dir)
    runner, entry = open_export(result.export_dir, name, meta)
    assert entry["precision"] == FORMATS.get(name).precision and runner.spec.size == meta["input_size"]
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    logits = runner.predict(images)
    assert logits.shape == (4, meta["num_classes"]) and bool(torch.isfinite(logits).all())
    if FORMATS.get(name).serve_rank is not None:  # the server's own runtime (numpy, no torch) gives the same answers
        # in a process of its own, as a server runs: OpenVINO's serving session in this process followed by the
        # forked DataLoader workers of later tests crashed the test process
        np.save(tmp_path / "batch.npy", runner.spec.prepare(images).numpy())
        code = ("import sys, numpy as np; from pathlib import Path; from kdforge.serve.model import ServedModel; "
                "served = ServedModel.load(Path(sys.argv[1]), sys.argv[2]); "
                "np.save(sys.argv[4], served.run(np.load(sys.argv[3])))")
        subprocess.run([sys.executable, "-c", code, str(result.export_dir), name, str(tmp_path / "batch.npy"),
                        str(tmp_path / "served.npy")], check=True, capture_output=True, timeout=120)
        np.testing.assert_allclose(np.load(tmp_path / "served.npy"), logits.numpy(), rtol=1e-4, atol=1e-4)
    assert math.isfinite(report.max_abs_diff)
