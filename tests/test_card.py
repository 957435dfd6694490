"""The model card of an export (exports/NAME/README.md) parsed by huggingface_hub's own card parser, its numbers
those of verify.json; `kdforge publish` uploads exactly the verified files, the card, the records and the recipe,
and without a reachable Hub fails with one line and nothing uploaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kdforge.card import CARD, card_text, publish_files, write_model_card
from kdforge.cli import app

pytestmark = pytest.mark.slow  # the trained and exported fixtures


def test_the_card_parses_and_states_what_verify_json_holds(export_copy):
    from huggingface_hub import ModelCard

    write_model_card(export_copy)
    card = ModelCard.load(export_copy / CARD)
    verified = json.loads((export_copy / "verify.json").read_text())
    results = {(r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    for name, report in verified.items():
        assert results[("accuracy", f"test top-1 ({name}, {report['candidate']})")] == \
            round(100 * report["candidate_top1"], 2)
        assert results[("agreement", f"top-1 agreement with the PyTorch student ({name})")] == \
            round(100 * report["agreement"], 2)
    assert card.data.pipeline_tag == "image-classification" and "kdforge" in card.data.tags
    meta = json.loads((export_copy / "metadata.json").read_text())
    assert f"# {meta['recipe']}: {meta['model']}" in card.text


def test_a_file_that_did_not_pass_is_neither_on_the_card_nor_published(export_copy):
    verified = json.loads((export_copy / "verify.json").read_text())
    verified["int8"]["passed"] = False
    (export_copy / "verify.json").write_text(json.dumps(verified))
    assert "student.int8.onnx" not in card_text(export_copy)
    files = publish_files(export_copy)
    assert set(files) == {"README.md", "metadata.json", "verify.json", "student.onnx", "recipe.toml"}
    run = json.loads((export_copy / "metadata.json").read_text())["run"]
    assert files["recipe.toml"].parent == type(files["recipe.toml"])(run)  # the recipe alone from the runs folder
    assert all(path.parent == export_copy for name, path in files.items() if name != "recipe.toml")


def test_publish_lists_its_files_and_without_the_hub_uploads_nothing(export_copy, tmp_path):
    listed = CliRunner().invoke(app, ["publish", str(export_copy), "--repo", "org/student", "--dry-run"])
    assert listed.exit_code == 0, listed.output
    assert [line.split()[0] for line in listed.stdout.splitlines()] == \
        ["README.md", "metadata.json", "verify.json", "student.onnx", "student.int8.onnx", "recipe.toml"]
    # the Hub unreachable (a closed port on this machine): one error line naming what was ready, exit 1
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_not_a_real_token",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    done = subprocess.run([sys.executable, "-m", "kdforge", "publish", str(export_copy), "--repo", "org/student"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nothing was uploaded to org/student" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "student.onnx" in done.stderr
    refused = CliRunner().invoke(app, ["publish", str(export_copy), "--repo", "no-slash"])
    assert refused.exit_code == 1 and "ORG/NAME" in refused.output
