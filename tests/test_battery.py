"""A hostile-but-fair battery: what a user (or an attacker, or a crash) can hand kdforge, and what must happen.

Every case asserts the documented exit code, ONE `error:` line naming the problem (no traceback) or the
server's 4xx `{"error": ...}`, and that finished work is untouched. Areas: recipes and the command line, data
files, checkpoints and exports, HTTP, crash safety (kill -9 / Ctrl-C, then --resume or a redo).
The count per area is printed by `pytest tests/test_battery.py -q` (one test id per case).
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from kdforge.cli import app

from .conftest import TINY_MODELS, synth_data_section
from .test_reliability import png_claiming, snapshot

runner = CliRunner()
FAST = ["--set", "train.max_steps=3", "--set", "train.limit_eval_batches=1", "--set", "verify.limit_batches=1"]


def one_error_line(result, exit_code: int, *words: str) -> None:
    """The command failed the documented way: its exit code, one `error:` line holding `words`, no traceback."""
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    flat = " ".join(result.stderr.split())
    for word in words:
        assert word in flat, (word, result.stderr)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


# ----------------------------------------------------------------------------------------------------------
# a finished chain (teacher -> student -> verified ONNX), made once; each case damages its own copy


@pytest.fixture(scope="session")
def chain(tmp_path_factory, synth_root):
    root = tmp_path_factory.mktemp("battery")
    recipe = root / "tiny.toml"
    recipe.write_text(synth_data_section(synth_root) + TINY_MODELS
                      + '\n[distill]\nbaseline = false\n\n[export]\nformats = ["onnx"]\n')
    result = invoke("distill", recipe, "--runs-dir", root / "runs", "--set", f"export.dir={root / 'exports'}", *FAST)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def copy(chain, tmp_path):
    """A private copy of the finished chain: (recipe, runs dir, exports dir, args that point the CLI at them)."""
    shutil.copytree(chain, tmp_path / "c", symlinks=True)
    root = tmp_path / "c"
    recipe = root / "tiny.toml"
    recipe.write_text(recipe.read_text())
    args = ["--runs-dir", str(root / "runs"), "--set", f"export.dir={root / 'exports'}", *FAST]
    return recipe, root / "runs", root / "exports", args


# ----------------------------------------------------------------------------------------------------------
# recipes and the command line: exit 2 for a bad recipe, nothing created


TEACHER, STUDENT = '[teacher]\nmodel = "test_resnet"\n', '[student]\nmodel = "test_convnext"\n'
MODELS = TEACHER + STUDENT
RECIPE_CASES = {
    # case: (recipe text, exit code, words the error must hold)
    "syntax-error": (MODELS + "[train]\nepochs = \n", 2, ["line 6"]),
    "not-utf8": (MODELS.encode() + b"[train]\nepochs = 1 # \xff\xfe\n", 2, ["UTF-8"]),
    "unknown-section": (MODELS + "[trian]\nepochs = 1\n", 2, ["trian"]),
    "unknown-key": (MODELS + "[train]\nepocs = 1\n", 2, ["epocs", "epochs"]),
    "wrong-type": (MODELS + '[train]\nepochs = "ten"\n', 2, ["train.epochs"]),
    "zero-batch": (MODELS + "[train]\nbatch_size = 0\n", 2, ["train.batch_size"]),
    "negative-lr": (MODELS + "[train]\nlr = -1.0\n", 2, ["train.lr"]),
    "unknown-model": (TEACHER + '[student]\nmodel = "resnet181"\n', 2, ["resnet181", "resnet18"]),
    "code-as-model": (TEACHER + '[student]\nmodel = "__import__(\'os\').system(\'touch PWNED\')"\n', 2,
                      ["unknown"]),
    "unknown-dataset": (MODELS + '[data]\ndataset = "imagenet22k"\n', 2, ["imagenet22k"]),
    "unknown-method": (MODELS + '[distill]\nmethod = "kdd"\n', 2, ["kdd"]),
    "path-in-name": ('name = "../../etc"\n' + MODELS, 2, ["name"]),
    "missing-teacher-checkpoint": (STUDENT + '[teacher]\nmodel = "test_resnet"\n'
                                   'checkpoint = "/nonexistent/teacher.safetensors"\n', 2,
                                   ["/nonexistent/teacher.safetensors"]),
    "huge-input-size": (TEACHER + '[student]\nmodel = "test_convnext"\ninput_size = 100000\n', 2,
                        ["input_size"]),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES), ids=list(RECIPE_CASES))
def test_bad_recipe(case, tmp_path, monkeypatch):
    text, code, words = RECIPE_CASES[case]
    path = tmp_path / "r.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    monkeypatch.chdir(tmp_path)
    result = invoke("distill", path, "--runs-dir", tmp_path / "runs")
    one_error_line(result, code, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]  # nothing created (and nothing executed)


CLI_CASES = {
    "recipe-missing": (lambda t, c: ["distill", t / "none.toml"], 2, ["none.toml"]),
    "recipe-is-a-folder": (lambda t, c: ["distill", t], 2, ["is a folder"]),
    "set-without-equals": (lambda t, c: ["distill", c[0], "--set", "train.epochs"], 2, ["dotted.key=value"]),
    "set-unknown-key": (lambda t, c: ["distill", c[0], "--set", "train.epoch=1"], 2, ["train.epoch"]),
    "set-wrong-type": (lambda t, c: ["distill", c[0], "--set", "train.epochs=many"], 2, ["train.epochs"]),
    "device-cuda-index": (lambda t, c: ["distill", c[0], *c[3], "--device", "cuda:x"], 1, ["cuda:x"]),
    "runs-dir-is-a-file": (lambda t, c: ["teacher", c[0], "--runs-dir", t / "afile"], 1, ["afile"]),
    "export-out-is-a-file": (lambda t, c: ["export", c[1] / "tiny", "--out", t / "afile"], 1, ["afile"]),
    "export-no-such-run": (lambda t, c: ["export", t / "nothing"], 1, ["nothing"]),
    "export-unknown-format": (lambda t, c: ["export", c[1] / "tiny", "--format", "tflite"], 2, ["tflite"]),
    "export-set-training-key": (lambda t, c: ["export", c[1] / "tiny", "--set", "train.epochs=3"], 2,
                                ["train.epochs"]),
    "verify-not-an-export": (lambda t, c: ["verify", t], 1, ["metadata.json"]),
    "bench-not-an-export": (lambda t, c: ["bench", t / "nothing"], 1, ["nothing"]),
    "report-no-such-run": (lambda t, c: ["report", t / "nothing"], 1, ["nothing"]),
    "serve-not-an-export": (lambda t, c: ["serve", t], 1, ["metadata.json"]),
    "serve-unknown-format": (lambda t, c: ["serve", c[2] / "tiny", "--format", "tflite"], 1, ["tflite"]),
    "predict-missing-image": (lambda t, c: ["predict", t / "none.png", "--model", c[2] / "tiny"], 1, ["none.png"]),
    "predict-not-an-image": (lambda t, c: ["predict", c[0], "--model", c[2] / "tiny"], 1, ["not a readable image"]),
    "predict-image-bomb": (lambda t, c: ["predict", t / "bomb.png", "--model", c[2] / "tiny"], 1,
                           ["13000x13000"]),
    "synth-out-is-a-file": (lambda t, c: ["data", "synth", "--out", t / "afile"], 1, ["afile"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES), ids=list(CLI_CASES))
def test_bad_command_line(case, copy, tmp_path):
    make_args, code, words = CLI_CASES[case]
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "bomb.png").write_bytes(png_claiming(13000, 13000))
    before = snapshot(tmp_path)
    result = invoke(*make_args(tmp_path, copy))
    one_error_line(result, code, *words)
    assert snapshot(tmp_path) == before  # nothing created, changed or deleted


def test_a_port_in_use_is_an_error_not_missing_hardware(copy):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = invoke("serve", copy[2] / "tiny", "--port", taken.getsockname()[1])
    one_error_line(result, 1, "in use", "--port")


# ----------------------------------------------------------------------------------------------------------
# data files


def cifar_copy(synth_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    return root


class Sneaky:
    """A pickle that runs a command when loaded (what a hostile dataset or state file would carry)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite_pickle(path: Path, change) -> None:
    with path.open("rb") as f:
        obj = pickle.load(f)
    path.write_bytes(pickle.dumps(change(obj)))


def _fix_manifest(root: Path) -> None:
    """Record the damaged files' md5 in the synthetic manifest, so the content checks (not the md5) are tested."""
    from kdforge.fileio import file_hash

    manifest = root / "cifar-100-python" / "kdforge-synthetic.json"
    meta = json.loads(manifest.read_text())
    meta["md5"] = {name: file_hash(root / "cifar-100-python" / name, "md5") for name in meta["md5"]}
    manifest.write_text(json.dumps(meta))


def _damage_data(case: str, root: Path, tmp_path: Path) -> None:
    folder = root / "cifar-100-python"
    if case == "truncated-file":
        (folder / "train").write_bytes((folder / "train").read_bytes()[:5000])
    elif case == "pickle-with-side-effect":
        (folder / "train").write_bytes(pickle.dumps({b"data": Sneaky(tmp_path / "PWNED")}))
        _fix_manifest(root)
    elif case == "meta-not-a-dict":
        (folder / "meta").write_bytes(pickle.dumps([1, 2, 3]))
        _fix_manifest(root)
    elif case == "data-wrong-shape":
        _rewrite_pickle(folder / "test", lambda o: {**o, "data": o["data"][:, :100]})
        _fix_manifest(root)
    elif case == "labels-out-of-range":
        _rewrite_pickle(folder / "test", lambda o: {**o, "fine_labels": [500] * len(o["fine_labels"])})
        _fix_manifest(root)
    elif case == "test-file-missing":
        (folder / "test").unlink()
    elif case == "manifest-damaged":
        (folder / "kdforge-synthetic.json").write_text('{"generator": ')


DATA_CASES = {
    "truncated-file": ["train", "md5"],
    "pickle-with-side-effect": ["refusing to load posix.system"],
    "meta-not-a-dict": ["meta", "expected a dict"],
    "data-wrong-shape": ["test", "shape"],
    "labels-out-of-range": ["labels outside"],
    "test-file-missing": ["test"],
    "manifest-damaged": ["kdforge-synthetic.json"],
}


@pytest.mark.parametrize("case", list(DATA_CASES), ids=list(DATA_CASES))
def test_damaged_cifar_format_data(case, copy, synth_root, tmp_path):
    recipe, runs, _, args = copy
    root = cifar_copy(synth_root, tmp_path)
    _damage_data(case, root, tmp_path)
    before = snapshot(runs)
    result = invoke("distill", recipe, *args, "--set", f"data.root={root}")
    one_error_line(result, 1, *DATA_CASES[case])
    assert snapshot(runs) == before and not (tmp_path / "PWNED").exists()
    if case == "truncated-file":  # the file may be the user's own data: never tell them to delete it
        assert "Delete it" not in result.stderr


def test_missing_cifar_data_creates_nothing(tmp_path, monkeypatch):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\ndataset = "cifar100"\nroot = "{tmp_path / "nodata"}"\n' + TINY_MODELS)
    monkeypatch.chdir(tmp_path)
    result = invoke("teacher", recipe, "--runs-dir", tmp_path / "runs")
    one_error_line(result, 1, "nodata", "download")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


def write_png(path: Path, size: int = 12, color=(200, 30, 30), mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), color).save(path)


def imagefolder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for name, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            for i in range(3):
                write_png(root / split / name / f"{i}.png", color=color)
    return root


IMAGEFOLDER_CASES = {
    "no-class-folders": ("no class folders", lambda r: [shutil.rmtree(p) for p in (r / "train").iterdir()]),
    "empty-class": ("dog", lambda r: [p.unlink() for p in (r / "train" / "dog").iterdir()]),
    "corrupt-image": ("1.png", lambda r: (r / "train" / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")),
    "decode-bomb": ("13000x13000", lambda r: (r / "train" / "cat" / "1.png").write_bytes(png_claiming(13000, 13000))),
    "eps-as-jpg": ("2.jpg", lambda r: (r / "train" / "cat" / "2.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n")),
    "test-class-not-in-train": ("bird", lambda r: write_png(r / "test" / "bird" / "0.png")),
    "no-test-split": ("test", lambda r: shutil.rmtree(r / "test")),
}


@pytest.mark.parametrize("case", list(IMAGEFOLDER_CASES), ids=list(IMAGEFOLDER_CASES))
def test_damaged_imagefolder_data(case, tmp_path, monkeypatch):
    word, damage = IMAGEFOLDER_CASES[case]
    root = imagefolder(tmp_path)
    damage(root)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\ndataset = "imagefolder"\nroot = "{root}"\nimage_size = 32\n' + TINY_MODELS)
    monkeypatch.chdir(tmp_path)
    result = invoke("teacher", recipe, "--runs-dir", tmp_path / "runs")
    one_error_line(result, 1, word)
    assert not (tmp_path / "runs").exists()


def test_an_imagefolder_ignores_files_that_are_not_images(tmp_path):
    from kdforge.data.imagefolder import scan_imagefolder

    root = imagefolder(tmp_path)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / ".DS_Store").write_bytes(b"\0\0")
    index = scan_imagefolder(root)
    assert len(index.splits["train"].refs) == 6 and index.classes == ("cat", "dog")


# ----------------------------------------------------------------------------------------------------------
# checkpoints and exports: the run or export a user has is damaged or not ours


def _student_last(runs: Path) -> Path:
    return (runs / "tiny" / "student" / "last").resolve()


def _damage_run(case: str, runs: Path, exports: Path, tmp_path: Path) -> None:
    last = _student_last(runs)
    if case == "weights-of-another-model":
        import torch
        from safetensors.torch import save_file

        save_file({"stem.weight": torch.zeros(3, 3)}, last / "model.safetensors")
    elif case == "state-with-side-effect":
        (last / "state.pt").write_bytes(pickle.dumps({"optimizer": Sneaky(tmp_path / "PWNED")}))
        (runs / "tiny" / "student" / "result.json").unlink()
    elif case == "dangling-last":
        shutil.rmtree(last)
        (runs / "tiny" / "student" / "result.json").unlink()
    elif case == "run-recipe-damaged":
        (runs / "tiny" / "student" / "recipe.toml").write_text("[train\nepochs = 1")
    elif case == "result-json-damaged":
        (runs / "tiny" / "student" / "result.json").write_text("{")
    elif case == "teacher-weights-truncated":
        weights = (runs / "tiny" / "teacher" / "last").resolve() / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "foreign-state":
        (last / "state.pt").write_bytes(pickle.dumps({"optimizer": print}))  # not tensors: the safe loader refuses
        (runs / "tiny" / "student" / "result.json").unlink()
    elif case == "teacher-checkpoint-damaged":
        weights = (runs / "tiny" / "teacher" / "last").resolve() / "model.safetensors"
        weights.write_bytes(b"\0" * 100)
    elif case == "last-leaves-the-stage":  # the student's `last` made to lead to another stage's checkpoint
        link = runs / "tiny" / "student" / "last"
        other = (runs / "tiny" / "teacher" / "last").resolve()
        link.unlink()
        link.symlink_to(os.path.relpath(other, link.parent))
    elif case == "weights-replaced-by-a-fitting-file":  # same model, other values: it loads, but it is not ours
        from safetensors.torch import load_file, save_file

        tensors = load_file(last / "model.safetensors")
        save_file({name: t + 1 if t.is_floating_point() else t for name, t in tensors.items()},
                  last / "model.safetensors")


RUN_CASES = {
    # case: (command, extra args, exit code, words)
    # result.json recorded the final weights' sha256: any other file is refused before it is loaded
    "weights-of-another-model": ("export", [], 1, ["model.safetensors", "not the file this stage finished with"]),
    "weights-replaced-by-a-fitting-file": ("export", [], 1, ["not the file this stage finished with", "--overwrite"]),
    "last-leaves-the-stage": ("export", [], 1, ["points outside its stage's checkpoints folder"]),
    "state-with-side-effect": ("distill", ["--resume"], 1, ["not a kdforge training state"]),
    "foreign-state": ("distill", ["--resume"], 1, ["not a kdforge training state", "--overwrite"]),
    # the student is stale (temperature changed), so the teacher's weights are read: damaged, they are an error
    "teacher-weights-truncated": ("distill", ["--set", "distill.temperature=2"], 1,
                                  ["damaged weights file", "--overwrite"]),
    "dangling-last": ("distill", ["--resume"], 0, []),  # nothing to resume: trained from the start
    "run-recipe-damaged": ("export", [], 2, ["recipe.toml"]),
    "result-json-damaged": ("distill", [], 1, ["result.json"]),
    "teacher-checkpoint-damaged": ("teacher-checkpoint", [], 1, ["model.safetensors"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RUN_CASES), ids=list(RUN_CASES))
def test_damaged_run(case, copy, tmp_path):
    recipe, runs, exports, args = copy
    command, extra, code, words = RUN_CASES[case]
    _damage_run(case, runs, exports, tmp_path)
    before = snapshot(exports)
    if command == "export":
        result = invoke("export", runs / "tiny", "--runs-dir", runs)
    elif command == "teacher-checkpoint":
        weights = (runs / "tiny" / "teacher" / "last").resolve()
        result = invoke("distill", recipe, *args, "--set", f"teacher.checkpoint={weights}",
                        "--set", "name=other")
    else:
        result = invoke(command, recipe, *args, *extra)
    if code == 0:
        assert result.exit_code == 0 and (runs / "tiny" / "student" / "result.json").is_file(), result.output
        return
    one_error_line(result, code, *words)
    assert snapshot(exports) == before and not (tmp_path / "PWNED").exists()


def _damage_export(case: str, export: Path) -> None:
    meta_path = export / "metadata.json"
    meta = json.loads(meta_path.read_text())
    if case == "metadata-incomplete":
        del meta["input_size"]
        meta_path.write_text(json.dumps(meta))
    elif case == "metadata-not-an-object":
        meta_path.write_text("[1, 2]")
    elif case == "verify-json-not-an-object":
        (export / "verify.json").write_text('"passed"')
    elif case == "onnx-replaced":
        onnx_path = export / "student.onnx"
        import onnx

        model = onnx.load(onnx_path)
        model.producer_name = "someone else"
        onnx.save(model, onnx_path)
    elif case.endswith("-truncated"):
        path = export / {"metadata": "metadata.json", "verify": "verify.json", "onnx": "student.onnx"}[
            case.split("-")[0]]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "onnx-missing":
        (export / "student.onnx").unlink()
    elif case == "onnx-is-a-folder":
        (export / "student.onnx").unlink()
        (export / "student.onnx").mkdir()


EXPORT_CASES = {
    "metadata-truncated": ["metadata.json"],
    "verify-truncated": ["verify.json"],
    "onnx-truncated": ["student.onnx"],
    "metadata-incomplete": ["input_size"],
    "metadata-not-an-object": ["metadata.json"],
    "verify-json-not-an-object": ["verify.json"],
    "onnx-replaced": ["student.onnx", "changed since it was exported"],
    "onnx-missing": ["student.onnx"],
    "onnx-is-a-folder": ["student.onnx"],
}


@pytest.mark.parametrize("command", ["serve", "verify", "bench", "predict"])
@pytest.mark.parametrize("case", list(EXPORT_CASES), ids=list(EXPORT_CASES))
def test_damaged_export(case, command, copy, tmp_path):
    export = copy[2] / "tiny"
    _damage_export(case, export)
    write_png(tmp_path / "x.png")
    before = snapshot(export)
    args = {"serve": ["serve", export, "--port", "1"], "verify": ["verify", export],
            "bench": ["bench", export, "--repeats", "1", "--warmup", "0", "--batch-size", "2"],
            "predict": ["predict", tmp_path / "x.png", "--model", export]}[command]
    result = invoke(*args)
    one_error_line(result, 1, *EXPORT_CASES[case])
    assert snapshot(export) == before


def test_a_damaged_bench_json_falls_back_to_the_verified_choice(copy):
    from kdforge.serve.model import ServedModel

    export = copy[2] / "tiny"
    (export / "bench.json").write_text('{"rows": [{"format": ')
    served = ServedModel.load(export)
    assert served.info["format"] == "onnx" and served.info["verified"]
    assert "bench.json" in served.info["chosen_because"]


@pytest.mark.slow
def test_leftovers_of_a_killed_checkpoint_write_are_removed_and_resume_finishes(copy):
    recipe, runs, _, args = copy
    stage = runs / "tiny" / "student"
    (stage / "result.json").unlink()
    leftover = stage / ".tmp-step-2-999999999"  # a checkpoint write whose process was killed
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 10)
    result = invoke("distill", recipe, *args, "--resume")
    assert result.exit_code == 0, result.output
    assert not leftover.exists() and (stage / "result.json").is_file()


@pytest.mark.slow
def test_a_damaged_teacher_cache_is_rebuilt_not_trusted(copy):
    recipe, runs, _, args = copy
    cached = ["--set", "distill.teacher_cache.views=1"]
    assert invoke("distill", recipe, *args, *cached).exit_code == 0
    caches = [p for p in (runs / "tiny").rglob("*") if p.is_file() and "cache" in p.name and p.stat().st_size > 0]
    assert caches, sorted(str(p) for p in (runs / "tiny").rglob("*"))
    for path in caches:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = invoke("distill", recipe, *args, *cached, "--set", "distill.temperature=3")
    assert result.exit_code == 0, result.output
    assert "is damaged, running the teacher" in " ".join(result.output.split())


# ----------------------------------------------------------------------------------------------------------
# HTTP: the server answers 4xx JSON and keeps serving


@pytest.fixture(scope="module")
def client(served_export):
    from fastapi.testclient import TestClient

    from kdforge.serve.app import create_app

    export_dir, pngs = served_export
    with TestClient(create_app(export_dir, max_bytes=1_000_000, max_batch=4)) as test_client:
        yield test_client, pngs


def image_bytes(mode: str, fmt: str, size=(40, 30), **save) -> bytes:
    from PIL import Image

    color = {"RGB": (10, 200, 10), "RGBA": (10, 200, 10, 0), "LA": (100, 0), "L": 100, "P": 3, "CMYK": (0, 50, 50, 0),
             "I;16": 30000, "1": 1}[mode]
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def gif_two_frames() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    frames = [Image.new("P", (20, 20), i) for i in (1, 2)]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


GOOD_IMAGES = {
    "jpeg-cmyk": lambda: image_bytes("CMYK", "JPEG"),
    "png-rgba": lambda: image_bytes("RGBA", "PNG"),
    "png-la": lambda: image_bytes("LA", "PNG"),
    "png-palette-transparency": lambda: image_bytes("P", "PNG", transparency=3),
    "png-16bit": lambda: image_bytes("I;16", "PNG"),
    "bmp-1bit": lambda: image_bytes("1", "BMP"),
    "gif-animated": gif_two_frames,
    "webp": lambda: image_bytes("RGB", "WEBP"),
    "jpeg-large-drafted": lambda: image_bytes("RGB", "JPEG", size=(6000, 4000), quality=20),
}


@pytest.mark.parametrize("case", list(GOOD_IMAGES), ids=list(GOOD_IMAGES))
def test_images_a_camera_or_editor_makes_are_answered(case, client):
    test_client, _ = client
    body = GOOD_IMAGES[case]()
    response = test_client.post("/predict", content=body, headers={"content-type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 5


def _bmp_claiming(width: int, height: int) -> bytes:
    import struct

    header = struct.pack("<2sIHHI", b"BM", 54, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return header + info


def _jpeg_claiming(width: int, height: int) -> bytes:
    import struct

    data = image_bytes("RGB", "JPEG", size=(16, 16))
    index = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    return data[: index + 5] + struct.pack(">HH", height, width) + data[index + 9:]


def _gif_claiming(width: int, height: int) -> bytes:
    import struct

    data = gif_two_frames()
    return data[:6] + struct.pack("<HH", width, height) + data[10:]


BAD_REQUESTS = {
    # case: (body, content type, status, words)
    "empty-body": (b"", "image/png", 400, "empty"),
    "text-body": (b"hello", "image/png", 400, "not a readable image"),
    "truncated-png": (None, "image/png", 400, "not a readable image"),
    "eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "image/png", 400,
            "not a readable image"),
    "pdf": (b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n", "application/pdf", 415, "content type"),
    "png-bomb": (png_claiming(13000, 13000), "image/png", 413, "13000x13000"),
    "bmp-bomb": (_bmp_claiming(20000, 20000), "image/bmp", 413, "pixels"),
    "jpeg-bomb-undraftable": (_jpeg_claiming(65000, 65000), "image/jpeg", 413, "pixels"),
    "gif-bomb": (_gif_claiming(60000, 60000), "image/gif", 413, "pixels"),
    "too-large-body": (b"\0" * 2_000_000, "image/png", 413, "exceeds"),
    "json-body": (b'{"image": "x"}', "application/json", 415, "content type"),
    "multipart-wrong-field": (None, "multipart", 400, "file"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(case, client):
    test_client, pngs = client
    body, content_type, status, words = BAD_REQUESTS[case]
    if case == "truncated-png":
        body = pngs[0].read_bytes()[:60]
    if content_type == "multipart":
        response = test_client.post("/predict", files={"image": ("x.png", pngs[0].read_bytes(), "image/png")})
    else:
        response = test_client.post("/predict", content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and words in response.json()["error"]
    again = test_client.post("/predict", content=pngs[0].read_bytes(), headers={"content-type": "image/png"})
    assert again.status_code == 200


def test_a_batch_with_one_bad_image_names_it(client):
    test_client, pngs = client
    files = [("files", (f"{i}.png", pngs[i].read_bytes(), "image/png")) for i in range(2)]
    files.append(("files", ("bad.png", b"nope", "image/png")))
    response = test_client.post("/predict/batch", files=files)
    assert response.status_code == 400 and "image 3" in response.json()["error"]
    too_many = [("files", (f"{i}.png", pngs[0].read_bytes(), "image/png")) for i in range(5)]
    assert test_client.post("/predict/batch", files=too_many).status_code == 413


# ----------------------------------------------------------------------------------------------------------
# the operating system says no: a full disk, a read-only folder, permissions, the open-file limit -> one line, exit 1


OS_FAILURES = {  # errno, what the line says, the command (its writes fail)
    "export-disk-full": (errno.ENOSPC, "free some space", lambda t, c: ["export", c[1] / "tiny", "--out", t / "x"]),
    "export-quota": (errno.EDQUOT, "quota", lambda t, c: ["export", c[1] / "tiny", "--out", t / "x"]),
    "synth-read-only": (errno.EROFS, "read-only", lambda t, c: ["data", "synth", "--out", t / "synth"]),
    # (verify and bench on a read-only folder still measure: READ_ONLY_COMMANDS below; a full disk is an error)
    "verify-disk-full": (errno.ENOSPC, "free some space", lambda t, c: ["verify", c[2] / "tiny"]),
    "export-permission": (errno.EACCES, "permission denied", lambda t, c: ["export", c[1] / "tiny", "--out", t / "x"]),
    "export-open-files": (errno.EMFILE, "ulimit -n", lambda t, c: ["export", c[1] / "tiny", "--out", t / "x"]),
}


@pytest.mark.parametrize("case", list(OS_FAILURES), ids=list(OS_FAILURES))
def test_operating_system_failures_are_one_line_and_leave_nothing_trusted(case, copy, tmp_path, monkeypatch):
    """Every atomic write ends in a rename; here the rename fails as the OS would, and the command prints one
    error line naming the file and what to do (no traceback), and no file it would have written appears."""
    code, advice, make_args = OS_FAILURES[case]
    real = Path.replace

    def refuse(self, target):
        if str(target).startswith(str(tmp_path)):
            raise OSError(code, os.strerror(code), str(target))
        return real(self, target)

    before = snapshot(tmp_path / "c")
    monkeypatch.setattr(Path, "replace", refuse)
    result = invoke(*make_args(tmp_path, copy))
    one_error_line(result, 1, os.strerror(code), advice)
    assert snapshot(tmp_path / "c") == before  # the finished chain is untouched
    assert not [p for p in tmp_path.rglob(".*.tmp-*")]  # no temporary file left behind


READ_ONLY_COMMANDS = {  # what still works once a finished chain's folders are read-only; the record it cannot update
    "report": (lambda c: ["report", c[1] / "tiny"], None),
    "distill-again": (lambda c: ["distill", c[0], *c[3]], None),
    "verify": (lambda c: ["verify", c[2] / "tiny"], "verify.json"),
    "bench": (lambda c: ["bench", c[2] / "tiny", "--repeats", "2", "--batch-size", "4"], "bench.json"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(READ_ONLY_COMMANDS), ids=list(READ_ONLY_COMMANDS))
def test_commands_that_only_read_work_on_a_read_only_run_and_export(case, copy, monkeypatch):
    """A finished chain whose folders became read-only (a shared volume, a mounted archive): the report of the
    unchanged run and the chain run again write nothing and succeed (the export is reused, like the training
    stages); verify and bench measure, print, and say in one warning that they could not record it. Read-only
    here: every atomic write ends in a rename, refused with EROFS; the folder's bytes are compared too, which
    catches any write that bypasses the rename."""
    make_args, record = READ_ONLY_COMMANDS[case]
    done = invoke("distill", copy[0], *copy[3])  # brings the copied chain's records up to date at their new path
    assert done.exit_code == 0, done.output
    recorded = copy[2] / "tiny" / str(record)
    if record and recorded.is_file():  # an outdated record, so the command has something to update (a record that
        # came out byte for byte the same, timings included, would rightly be left alone without a warning)
        recorded.write_text(recorded.read_text().replace('"seconds": ', '"seconds": 1000'))
    before = snapshot(copy[0].parent)
    real = Path.replace

    def refuse(self, target):
        if str(target).startswith(str(copy[0].parent)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))
        return real(self, target)

    monkeypatch.setattr(Path, "replace", refuse)
    result = invoke(*make_args(copy))
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert snapshot(copy[0].parent) == before
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    expected = f"warning: {copy[2] / 'tiny' / str(record)} not updated (Read-only file system): the results above " \
               f"are not recorded"
    assert warnings == ([expected] if record else []), result.stderr
    if case == "distill-again":
        assert "export: finished earlier with these settings, reused" in result.output


@pytest.mark.slow
def test_a_chain_run_again_reuses_its_export_only_while_nothing_it_holds_changed(copy):
    recipe, _, exports, args = copy
    reused = "export: finished earlier with these settings, reused"
    assert reused not in invoke("distill", recipe, *args).output  # the copy's records name their old folder
    assert reused in invoke("distill", recipe, *args).output
    changed = invoke("distill", recipe, *args, "--set", "verify.fp32.min_agreement=0.99")  # a setting changed
    assert changed.exit_code == 0 and reused not in changed.output
    assert reused in invoke("distill", recipe, *args, "--set", "verify.fp32.min_agreement=0.99").output
    onnx = exports / "tiny" / "student.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")  # the file was changed after export: made and verified again
    again = invoke("distill", recipe, *args, "--set", "verify.fp32.min_agreement=0.99")
    assert again.exit_code == 0 and reused not in again.output and not onnx.read_bytes().endswith(b"\0")


@pytest.mark.slow
def test_a_checkpoint_write_on_a_full_disk_is_one_line_and_resumable(copy, tmp_path, monkeypatch):
    """torch reports a failed write as RuntimeError ("unexpected pos"); on a full disk it is the full-disk line."""
    import kdforge.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 320 vs 256")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=0))
    result = invoke("teacher", copy[0], "--runs-dir", tmp_path / "runs", *FAST[:2])
    one_error_line(result, 1, "No space left on device", "--resume")
    assert not list((tmp_path / "runs").rglob(".tmp-step-*"))  # the half-written checkpoint is gone


def test_messages_print_verbatim_and_huge_values_are_shortened(copy, tmp_path):
    odd = tmp_path / ":smile: [bold]run[/bold]"
    one_error_line(invoke("export", odd), 1, ":smile: [bold]run[/bold]")  # no emoji, no markup
    huge = "9" * 50_000
    result = invoke("distill", copy[0], "--set", f"train.epochs={huge}x")
    one_error_line(result, 2, "train.epochs", "more characters")
    assert max(len(line) for line in result.stderr.splitlines()) < 2_500


@pytest.mark.parametrize("target", ["run", "export folder"])
def test_a_second_kdforge_on_the_same_folder_exits_naming_the_first_and_a_dead_ones_lock_is_taken_over(copy, target):
    recipe, runs, exports, args = copy
    folder = runs / "tiny" if target == "run" else exports / "tiny"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kdforge.fileio import folder_lock\n"
         "with folder_lock(sys.argv[1], 'x'):\n    print('held', flush=True); time.sleep(120)", str(folder)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        command = ["distill", recipe, *args] if target == "run" else ["export", runs / "tiny", "--out", exports]
        before = snapshot(folder)
        one_error_line(invoke(*command), 1, f"{target} {folder} is in use by another kdforge process",
                       f"pid {holder.pid}")
        assert snapshot(folder) == before
    finally:
        holder.kill()
        holder.wait()
    result = invoke(*command)  # the holder died: its lock went with it
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------------------------------------
# crash safety: a killed process leaves nothing that the next command trusts, and --resume finishes


def start(args: list, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "kdforge", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(process: subprocess.Popen, condition, timeout: float = 120) -> str:
    """Read the process's output until `condition(output so far)` holds; returns the output."""
    import selectors

    output, deadline = "", time.monotonic() + timeout
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline and not condition(output):
        if selector.select(timeout=0.5):
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            output += line
    assert condition(output), output
    return output


@pytest.mark.slow
def test_a_training_killed_mid_run_resumes_to_the_end_and_the_teacher_is_untouched(copy, tmp_path):
    """kill -9 in the middle of the student's training (Ctrl-C: tests/test_reliability.py, in process)."""
    recipe, runs, _, _ = copy
    teacher = snapshot(runs / "tiny" / "teacher")
    args = ["distill", recipe, "--runs-dir", runs, "--set", "train.limit_eval_batches=1",
            "--set", "verify.limit_batches=1", "--set", f"export.dir={tmp_path / 'exports'}",
            "--set", "train.max_steps=3",  # the teacher as it was
            "--set", "student.train.epochs=3", "--set", "student.train.max_steps=50",
            "--set", "student.train.log_every=2", "--set", "student.train.checkpoint_every=3"]
    process = start(args, tmp_path)
    wait_for(process, lambda out: "student test_convnext step 8/" in out)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    stage = runs / "tiny" / "student"
    assert (stage / "last").resolve().is_dir() and not (stage / "result.json").exists()
    resumed = start([*args, "--resume"], tmp_path)
    output = wait_for(resumed, lambda out: resumed.poll() is not None, timeout=300)
    assert resumed.returncode == 0, output
    assert "resum" in output and (stage / "result.json").is_file()
    assert snapshot(runs / "tiny" / "teacher") == teacher


@pytest.mark.slow
def test_an_export_killed_mid_int8_is_never_served_and_the_next_export_finishes(copy, tmp_path):
    _, runs, exports, _ = copy
    export = exports / "tiny"
    args = ["export", runs / "tiny", "--runs-dir", runs, "--out", exports, "--int8", "--calibration", "300"]
    process = start(args, tmp_path)
    wait_for(process, lambda out: "calibrat" in out)
    process.kill()
    process.wait(timeout=60)
    from kdforge.serve.model import ServedModel

    served = ServedModel.load(export)
    # the INT8 file was never finished: the verified FP32 ONNX (its sha256 checked against metadata.json) is served
    assert served.info["format"] == "onnx" and served.info["verified"]
    finished = start(args, tmp_path)
    output = wait_for(finished, lambda out: finished.poll() is not None, timeout=300)
    assert finished.returncode == 0, output
    assert not [p for p in export.iterdir() if p.name.startswith(".")]  # the killed export's temp files are gone
    assert ServedModel.load(export, "int8").info["verified"]


@pytest.mark.slow
def test_a_teacher_cache_build_killed_midway_is_rebuilt(copy, tmp_path):
    recipe, runs, _, args = copy
    cached = [*args, "--set", "distill.teacher_cache.views=1", "--set", "distill.temperature=3",
              "--set", "train.log_every=1"]
    process = start(["distill", recipe, *cached], tmp_path)
    wait_for(process, lambda out: "cach" in out.lower())
    process.kill()
    process.wait(timeout=60)
    finished = start(["distill", recipe, *cached], tmp_path)
    output = wait_for(finished, lambda out: finished.poll() is not None, timeout=300)
    assert finished.returncode == 0, output
    assert (runs / "tiny" / "student" / "result.json").is_file()


@pytest.mark.slow
def test_server_memory_stays_bounded_under_image_bombs_and_returns_to_idle(served_export):
    """benchmarks/decode_memory.py, smaller: 6 clients at once send 13000x13000 bombs (a few KB each), then
    images of exactly the pixel budget. Bombs are refused from their header; at most DEFAULT_MAX_CONCURRENT
    budget-sized images are decoded at once (each at most 4 bytes a pixel in Pillow), and the memory is given back."""
    import importlib.util

    from kdforge.images import MAX_PIXELS
    from kdforge.serve.app import DEFAULT_MAX_CONCURRENT

    script = Path(__file__).parents[1] / "benchmarks" / "decode_memory.py"
    spec = importlib.util.spec_from_file_location("decode_memory", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    server = bench.Server(served_export[0])
    try:
        bombs = bench.load(server, bench.bilevel_png(13000, 13000), clients=6, rounds=2, settle_s=0.5)
        budget = bench.load(server, bench.bilevel_png(4096, 4096), clients=6, rounds=2, settle_s=2.0)
    finally:
        server.stop()
    assert bombs["statuses"] == {413: 12} and bombs["rss_peak_mb"] - bombs["rss_before_mb"] < 50, bombs
    bound_mb = DEFAULT_MAX_CONCURRENT * 4 * MAX_PIXELS * 1.5 / 2**20  # 1.5: Pillow's mode conversions overlap
    assert budget["statuses"] == {200: 12} and budget["rss_peak_mb"] - budget["rss_before_mb"] < bound_mb, budget
    assert budget["rss_after_mb"] - bombs["rss_before_mb"] < 40, budget  # back to (about) where it started
