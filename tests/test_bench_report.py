import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kdforge.bench import BenchSettings, bench_export
from kdforge.cli import app
from kdforge.errors import ExportError, KdforgeError
from kdforge.report import epoch_curves, write_report
from kdforge.timing import percentile

from .conftest import TINY_MODELS, without_torch_env
from .test_export import trained_student

pytestmark = pytest.mark.slow  # a distilled chain with exports, then bench and report

runner = CliRunner()


def assert_real_plot(path):
    """A PNG that opens, has a plot's size and more than a blank canvas: many colours, ink on a good part of it."""
    image = Image.open(path)
    assert image.format == "PNG" and image.width >= 500 and image.height >= 300
    pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert (pixels.min(axis=2) < 200).mean() > 0.01  # not (almost) all white


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory, synth_root):
    """A finished `kdforge distill` chain of tiny models with ONNX and INT8 exports (the quickstart's shape)."""
    root = tmp_path_factory.mktemp("chain")
    recipe = root / "chain.toml"
    recipe.write_text(
        f'name = "chain"\n[data]\ndataset = "synthetic"\nroot = "{synth_root}"\n'
        "synthetic = { train = 1000, test = 300, seed = 0 }\n" + TINY_MODELS
        + f'[export]\nformats = ["onnx"]\ndir = "{root / "exports"}"\n[quantize]\nenabled = true\ncalibration = 100\n'
        + "[verify]\nbatch_size = 100\n"
    )
    result = runner.invoke(app, ["distill", str(recipe), "--set", "train.epochs=2",
                                 "--runs-dir", str(root / "runs")])
    assert result.exit_code == 0, result.output
    return root / "runs" / "chain", root / "exports" / "chain", result


def test_distill_writes_a_report_with_the_summary_and_training_curves(distilled_run):
    run_dir, _, result = distilled_run
    assert "report: " in result.stdout
    markdown = (run_dir / "report" / "report.md").read_text()
    assert "| experiment | teacher | student | baseline -> distilled top-1 |" in markdown
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{summary['baseline']['top1'] * 100:.2f} -> {summary['student']['top1'] * 100:.2f}" in markdown
    assert "![loss and validation top-1 per epoch](curves.png)" in markdown  # 10% of the training split held out
    assert "The validation split (" in markdown and "chose each stage's `best` checkpoint" in markdown
    assert "run `kdforge bench`" in markdown  # no latency yet
    assert_real_plot(run_dir / "report" / "curves.png")
    assert_real_plot(run_dir / "report" / "size.png")
    curves = epoch_curves(run_dir / "student" / "metrics.jsonl")
    assert curves["split"] == "val" and curves["epoch"] == [1, 2] and len(curves["eval_top1"]) == 2


def test_bench_then_report_show_accuracy_latency_and_size_per_format(distilled_run):
    run_dir, export_dir, _ = distilled_run
    result = runner.invoke(app, ["bench", str(run_dir), "--repeats", "5", "--warmup", "1", "--batch-size", "16",
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    for name in ("pytorch", "onnx", "int8"):
        assert name in result.stdout
    bench = json.loads((export_dir / "bench.json").read_text())
    verified = json.loads((export_dir / "verify.json").read_text())
    rows = {row["format"]: row for row in bench["rows"]}
    assert list(rows) == ["pytorch", "onnx", "int8"]
    for row in rows.values():
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"] and row["throughput"] > 0 and row["bytes"] > 0
    assert rows["int8"]["top1"] == verified["int8"]["candidate_top1"]
    assert rows["pytorch"]["top1"] == verified["onnx"]["reference_top1"]
    assert rows["int8"]["bytes"] < rows["onnx"]["bytes"]
    assert bench["settings"]["threads"] == 1 and bench["settings"]["batch_size"] == 16

    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    report = run_dir / "report"
    markdown, page = (report / "report.md").read_text(), (report / "report.html").read_text()
    assert "![test top-1 against latency per format](accuracy_latency.png)" in markdown
    assert '<img src="accuracy_latency.png"' in page and "<table>" in page
    for name in ("pytorch", "onnx", "int8"):
        assert f"| {name} | {rows[name]['bytes'] / 1e6:.2f} |" in markdown
    for plot in ("curves.png", "accuracy_latency.png", "size.png"):
        assert_real_plot(report / plot)


def test_report_runs_without_torch_or_timm(distilled_run, tmp_path):
    """ARCHITECTURE.md: `kdforge report` never loads torch; run where torch and timm cannot be imported."""
    run_dir, _, _ = distilled_run
    (run_dir / "report" / "report.md").unlink()
    result = subprocess.run([sys.executable, "-m", "kdforge", "report", str(run_dir)], capture_output=True, text=True,
                            env=without_torch_env(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| onnx |" in (run_dir / "report" / "report.md").read_text()


def test_bench_refuses_formats_the_export_does_not_have(distilled_run):
    _, export_dir, _ = distilled_run
    with pytest.raises(ExportError, match="has no trt_fp16 export; it has: pytorch, onnx, int8"):
        bench_export(export_dir, BenchSettings(formats=("trt_fp16",)))
    with pytest.raises(KdforgeError, match="repeats must be at least 1"):
        BenchSettings(repeats=0)


def test_report_of_a_run_without_an_export_says_how_to_get_one(make_recipe, tmp_path):
    stage = trained_student(make_recipe, tmp_path)
    paths = write_report(stage.parent)
    assert "No export yet: run `kdforge export`" in paths.markdown.read_text()
    result = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no such run folder" in result.stderr


def test_percentiles_match_numpy():
    values = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0]
    for q in (0, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_the_html_report_renders_in_a_real_browser(distilled_run, tmp_path):
    """report.html in headless Chromium (Debian's package; .ci/run installs it): the rendered page holds its tables
    and plots and no raw Markdown, and a screenshot of it is a page with content, not a blank or an error page."""
    import shutil
    from html.parser import HTMLParser

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (.ci/run installs Debian's)")
    run_dir, _, _ = distilled_run
    assert runner.invoke(app, ["report", str(run_dir)]).exit_code == 0
    page = (run_dir / "report" / "report.html").resolve()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout

    class Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.text, self.tags, self.images = [], set(), []

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)
            if tag == "img":
                self.images.append(dict(attrs)["src"])

        def handle_data(self, data):
            self.text.append(data)

    parsed = Text()
    parsed.feed(dom)
    text = "".join(parsed.text)
    assert {"h1", "table", "img"} <= parsed.tags, parsed.tags
    assert all((page.parent / src).is_file() for src in parsed.images), parsed.images
    for raw in ("|---", "](", "**", "\n# ", "\n## "):  # Markdown the converter should have turned into HTML
        assert raw not in text, (raw, text[:2000])
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    assert_real_plot(shot)  # the plots drew: many colours, ink on a good part of the page
