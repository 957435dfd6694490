"""Nothing is lost when a command fails: a stage's finished run is only replaced after every input of the new
run (device, data, model, teacher) has been checked."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kdforge.cli import app

from .conftest import TINY_MODELS

runner = CliRunner()


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_teacher(make_recipe, tmp_path):
    recipe = make_recipe(TINY_MODELS)
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["teacher", str(recipe), "--runs-dir", str(runs), "--set", "train.max_steps=3",
                                 "--set", "train.limit_eval_batches=1"])
    assert result.exit_code == 0, result.output
    return recipe, runs, runs / "tiny" / "teacher"


@pytest.mark.parametrize(("extra", "exit_code", "message"), [
    (["--device", "cuda"], 3, "CUDA is not available here"),
    (["--set", "data.dataset=cifar100", "--set", "data.root=/nonexistent/data"], 1, "/nonexistent/data"),
    (["--device", "tpu"], 1, "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
], ids=["no-gpu", "missing-data", "bad-device"])
@pytest.mark.slow
def test_a_changed_recipe_that_fails_validation_leaves_the_finished_teacher_untouched(finished_teacher, extra,
                                                                                      exit_code, message):
    import torch

    if extra == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda does not fail here")
    recipe, runs, stage_dir = finished_teacher
    before = snapshot(stage_dir)
    # a changed teacher setting: the finished teacher is stale and would be retrained...
    result = runner.invoke(app, ["distill", str(recipe), "--runs-dir", str(runs), "--set", "train.max_steps=4",
                                 "--set", "train.limit_eval_batches=1", *extra])
    assert result.exit_code == exit_code, result.output
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.output
    assert snapshot(stage_dir) == before  # ...but nothing was deleted or rewritten before the failure


@pytest.mark.slow
def test_a_retrained_stage_keeps_the_earlier_run_until_the_new_one_finishes(finished_teacher, monkeypatch):
    import kdforge.train.assemble as assemble

    recipe, runs, stage_dir = finished_teacher
    before = snapshot(stage_dir)
    changed = ["--set", "train.max_steps=4", "--set", "train.limit_eval_batches=1"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the retraining is interrupted before it finishes

    monkeypatch.setattr(assemble, "fit", killed)
    result = runner.invoke(app, ["distill", str(recipe), "--runs-dir", str(runs), *changed])
    assert result.exit_code == 130, result.output
    kept = list((runs / "tiny" / ".stale").glob("teacher-*"))
    assert len(kept) == 1 and snapshot(kept[0]) == before  # the finished run survived, byte for byte
    assert str(kept[0]) in "".join(result.stderr.split())  # named in the output (however the terminal wraps it)

    monkeypatch.undo()
    result = runner.invoke(app, ["distill", str(recipe), "--runs-dir", str(runs), *changed])
    assert result.exit_code == 0, result.output
    assert not list((runs / "tiny" / ".stale").glob("teacher-*"))  # removed once its successor finished


# ----------------------------------------------------------------------------------------------------------
# the server decodes only what it can bound, and serves only what was verified


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares width x height pixels (an image bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_image_bombs_and_non_raster_formats_are_refused_before_decoding(export_copy, served_export):
    import io

    from PIL import Image

    from kdforge.serve.model import ImageError, ServedModel

    pngs = served_export[1]
    model = ServedModel.load(export_copy)
    with pytest.raises(ImageError, match="13000x13000 pixels is larger than the 16,777,216 pixels"):
        model.preprocess(png_claiming(13000, 13000))
    with pytest.raises(ImageError, match="not a readable image"):
        model.preprocess(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    # a 16-bit grey PNG at about half intensity is half grey, not white
    buffer = io.BytesIO()
    Image.new("I;16", (40, 40), 30000).save(buffer, format="PNG")
    pixels = model.preprocess(buffer.getvalue()) * model.std + model.mean
    assert abs(float(pixels.mean()) - 30000 / 65535) < 0.01
    assert model.predict([pngs[0].read_bytes()])[0]  # ordinary images still answered


def test_the_server_refuses_a_replaced_artifact_and_never_serves_an_unverified_int8_on_its_own(export_copy):
    import json
    import shutil

    from kdforge.serve.model import ServedModel, ServingError

    export_dir = export_copy
    shutil.copyfile(export_dir / "student.onnx", export_dir / "student.int8.onnx")  # swapped behind its back
    with pytest.raises(ServingError, match="student.int8.onnx changed since it was exported"):
        ServedModel.load(export_dir, "int8")
    verified = json.loads((export_dir / "verify.json").read_text())
    del verified["int8"]  # as after `kdforge export --int8 --no-verify`
    (export_dir / "verify.json").write_text(json.dumps(verified))
    served = ServedModel.load(export_dir)
    assert served.info["format"] == "onnx" and served.info["verified"]
    del verified["onnx"]
    (export_dir / "verify.json").write_text(json.dumps(verified))
    served = ServedModel.load(export_dir)
    assert served.info["format"] == "onnx" and not served.info["verified"]
    # /metadata tells any client it is unverified, never where this host keeps its files
    assert "kdforge verify" in served.info["warning"] and str(export_dir) not in served.info["warning"]
    assert str(export_dir.parent) not in json.dumps(served.info)
    assert "no format passed verification" in served.info["chosen_because"]


def test_unknown_paths_and_methods_answer_with_the_documented_error_body(export_copy):
    from fastapi.testclient import TestClient

    from kdforge.serve.app import create_app

    client = TestClient(create_app(export_copy))
    missing, wrong_method = client.get("/nothing"), client.get("/predict")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_files_half_written_by_a_killed_export_are_removed_by_the_next_one(trained_students, tmp_path):
    import os

    from kdforge.export.artifacts import export_run
    from kdforge.fileio import remove_leftovers

    export_dir = tmp_path / "cnn"
    export_dir.mkdir()
    dead = export_dir / ".student.int8.onnx.pre-999999999"  # no such process
    alive = export_dir / f".student.onnx.tmp-{os.getpid()}"  # a writer that still runs
    mine = export_dir / "notes.tmp-1"  # not a name kdforge writes
    for path in (dead, alive, mine):
        path.write_bytes(b"partial")
    assert remove_leftovers(export_dir) == [dead]
    assert alive.exists() and mine.exists()
    dead.write_bytes(b"partial")
    result = export_run(trained_students["cnn"], ["onnx"], exports_dir=tmp_path, verify=False)
    assert result.export_dir == export_dir and not dead.exists()


def test_a_phone_photo_is_decoded_upright_as_its_exif_orientation_says():
    """A photo taken sideways is stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view):
    the one decoder (training, verification, serving) turns it upright."""
    import io

    from PIL import Image

    from kdforge.images import decode_rgb, open_rgb

    stored = Image.new("RGB", (40, 20), (255, 0, 0))  # stored 40 wide, 20 high: red left half, blue right half
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif)
    upright = open_rgb(buffer.getvalue(), 64)
    assert upright.size == (20, 40)  # viewed: 20 wide, 40 high; the stored left half (red) is now on top
    pixels = decode_rgb(buffer.getvalue(), 16).astype(int)
    assert pixels[2, 8, 0] > 200 and pixels[2, 8, 2] < 60  # top: red
    assert pixels[13, 8, 2] > 200 and pixels[13, 8, 0] < 60  # bottom: blue
    plain = io.BytesIO()
    stored.save(plain, "JPEG", quality=95)  # no tag: as stored
    assert open_rgb(plain.getvalue(), 64).size == (40, 20)


@pytest.mark.slow
def test_logging_checkpointing_and_evaluation_limits_neither_change_the_weights_nor_retrain(finished_teacher,
                                                                                            tmp_path):
    """The fingerprint leaves out what cannot change the final weights: a finished stage is reused when only
    log_every, checkpoint_every or limit_eval_batches change, and training with other values gives the same
    weights bit for bit."""
    recipe, runs, stage_dir = finished_teacher
    before = snapshot(stage_dir)
    other = ["--set", "train.max_steps=3", "--set", "train.limit_eval_batches=2", "--set", "train.log_every=1",
             "--set", "train.checkpoint_every=1"]
    result = runner.invoke(app, ["teacher", str(recipe), "--runs-dir", str(runs), *other])
    assert result.exit_code == 0 and "already trained with these settings" in result.stdout, result.output
    assert snapshot(stage_dir) == before
    fresh = tmp_path / "fresh"
    result = runner.invoke(app, ["teacher", str(recipe), "--runs-dir", str(fresh), *other])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    weights = "last/model.safetensors"
    trained, reused = load_file(fresh / "tiny" / "teacher" / weights), load_file(stage_dir / weights)
    assert trained.keys() == reused.keys() and all(trained[k].equal(reused[k]) for k in trained)  # bit for bit

    # a stage finished before, whose fingerprint hashed log_every as set, is still reused (not retrained)
    import json

    from kdforge.recipe import load_recipe
    from kdforge.train.stages import stage_fingerprints

    now, earlier = stage_fingerprints(load_recipe(recipe, [o for o in other if o != "--set"]), "teacher")
    result_file = stage_dir / "result.json"
    result_file.write_text(json.dumps({**json.loads(result_file.read_text()), "fingerprint": earlier}))
    result = runner.invoke(app, ["teacher", str(recipe), "--runs-dir", str(runs), *other])
    assert result.exit_code == 0 and "already trained with these settings" in result.stdout, result.output
