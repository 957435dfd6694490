"""The verdict where the student runs: a device bundle (kdforge bundle), the torch-free probe judging it
(`python -m kdforge.serve.probe BUNDLE --verify`), and the host reading the report back (verify, serve, students,
report, probe over SSH). The same bundles inside the amd64 and arm64 serving images: tests/test_container.py."""

from __future__ import annotations

import getpass
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kdforge.cli import app as cli
from kdforge.device import DEVICE_REPORT, check_bundle, open_bundle, passed_on_device, read_device_report
from kdforge.errors import KdforgeError, ServingError
from kdforge.parity import compare
from kdforge.timing import sustained_ms
from tests.conftest import without_torch_env

REPO = Path(__file__).parents[1]


def probe(bundle: Path, tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    """The probe on `bundle` in a fresh process where torch, torchvision and timm cannot be imported."""
    output = tmp_path / f"{bundle.name}-{DEVICE_REPORT}"
    done = subprocess.run([sys.executable, "-m", "kdforge.serve.probe", str(bundle), "--verify", "--seconds", "0.6",
                           "--output", str(output), *options], capture_output=True, text=True, timeout=600,
                          env=without_torch_env(tmp_path), cwd=REPO)
    return done, json.loads(output.read_text()) if output.is_file() else {}


# ----------------------------------------------------------------------------------------------------------
# without training (the fast lane)


def test_sustained_timing_reports_each_window():
    calls = []
    windows = sustained_ms(lambda: calls.append(time.sleep(0.002)), seconds=0.3, windows=3)
    assert [w["window"] for w in windows] == [1, 2, 3]
    assert all(w["calls"] >= 5 and w["p95_ms"] >= w["p50_ms"] >= 1.9 for w in windows)
    assert sum(w["calls"] for w in windows) == len(calls)
    assert windows[-1]["ends_at_s"] >= 0.3


def test_stratified_images_cover_every_class_evenly():
    from kdforge.bundle import stratified

    labels = np.repeat(np.arange(10), [30, 30, 30, 30, 30, 30, 30, 30, 30, 3])
    chosen = stratified(labels, 100)
    counts = np.bincount(labels[chosen], minlength=10)
    assert len(chosen) == 100 and len(set(chosen.tolist())) == 100
    assert counts[9] == 3 and set(counts[:9]) <= {10, 11}  # the small class whole, the rest within one image
    assert len(stratified(labels, 10_000)) == len(labels)


def test_a_tar_that_is_not_a_bundle_is_refused(tmp_path):
    import tarfile

    (tmp_path / "x.txt").write_text("hello")
    with tarfile.open(tmp_path / "not.tar", "w") as archive:
        archive.add(tmp_path / "x.txt", arcname="x.txt")
    with pytest.raises(KdforgeError, match="not a kdforge bundle"), open_bundle(tmp_path / "not.tar"):
        pass
    with tarfile.open(tmp_path / "link.tar", "w") as archive:  # a member that would write outside the folder
        link = tarfile.TarInfo("bundle/evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    with pytest.raises(KdforgeError, match="not a plain file"), open_bundle(tmp_path / "link.tar"):
        pass
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 10)
    with pytest.raises(KdforgeError, match="not a readable bundle"), open_bundle(tmp_path / "junk.tar"):
        pass


def test_students_rank_by_the_sustained_p95_and_respect_max_memory():
    """A device profile with sustained timings: the budget is checked on the sustained p95 (not the cold p50),
    the order follows it, a candidate over max_memory_mb does not fit, and a file that failed there is dropped."""
    from kdforge.students import CandidateRow, apply_profile, rank

    def row(model, sha):
        return CandidateRow(model, 1, 1, 1000, 1.0, 1.1, "here", "here", sha256=sha)

    rows = [row("a", "1"), row("b", "2"), row("c", "3"), row("d", "4")]
    profile = {"machine": {"cpu": "Cortex-A76"}, "rows": [
        # a: fast when cold, throttled after a minute: over a 5 ms budget on its sustained p95
        {"sha256": "1", "runtime": "ort", "latency_p50_ms": 2.0, "latency_p95_ms": 2.5,
         "latency_sustained_p50_ms": 4.0, "latency_sustained_p95_ms": 6.0, "memory_mb": 10},
        {"sha256": "2", "runtime": "ort", "latency_p50_ms": 3.0, "latency_p95_ms": 3.2,
         "latency_sustained_p50_ms": 3.1, "latency_sustained_p95_ms": 3.3, "memory_mb": 10},
        {"sha256": "3", "runtime": "ort", "latency_p50_ms": 1.0, "latency_p95_ms": 1.1,
         "latency_sustained_p50_ms": 1.0, "latency_sustained_p95_ms": 1.2, "memory_mb": 900},
        {"sha256": "4", "runtime": "ort", "latency_p50_ms": 0.5, "latency_p95_ms": 0.6, "passed": False,
         "failures": ["top-1 agreement 80% is below the required 99.9%"]}]}
    kept, missing = apply_profile(rows, profile)
    assert "FAILED on Cortex-A76" in missing["d"]
    ranked = rank(kept, budget_ms=5.0, max_memory_mb=256)
    assert [(r.model, r.fits) for r in ranked] == [("c", False), ("b", True), ("a", False)]
    assert all(r.sustained and r.measured_on == "Cortex-A76" for r in ranked)


def test_max_memory_needs_a_device_profile(tmp_path):
    from kdforge.recipe import SearchConfig

    with pytest.raises(ValueError, match="device profile"):
        SearchConfig(budget_ms=2, max_memory_mb=100)


# ----------------------------------------------------------------------------------------------------------
# with the shared trained students' exports


def test_a_bundle_holds_what_the_device_needs_and_passes_on_this_machine(device_bundles, every_format, tmp_path):
    """The bundle's files match its manifest; its images are stratified test images at the input size; the probe,
    torch-free, judges every file exactly as the host did (the same session, the same arithmetic) and times it."""
    bundle = check_bundle(device_bundles["cnn"])
    manifest = bundle.manifest
    images, labels = bundle.array("images.npy"), bundle.array("labels.npy")
    size = manifest["input_size"]
    assert images.shape == (100, size, size, 3) and images.dtype == np.uint8
    assert len(np.unique(labels)) == min(100, manifest["num_classes"])
    assert bundle.array("reference.npy").shape == (100, manifest["num_classes"])
    verified = json.loads((every_format[0].export_dir / "verify.json").read_text())
    assert set(manifest["formats"]) == {name for name in ("onnx", "fp16", "int8", "openvino", "openvino_int8",
                                                          "litert", "litert_int8", "ncnn")
                                        if verified.get(name, {}).get("passed")}
    assert (device_bundles["cnn"].with_suffix(".tar")).stat().st_size > 0

    done, report = probe(device_bundles["cnn"].with_suffix(".tar"), tmp_path, "--device-name", "here")
    assert done.returncode == 0, done.stderr
    assert "importing torch" not in done.stdout + done.stderr
    assert report["device"]["name"] == "here" and report["device"]["arch"]
    by_format = {row["format"]: row for row in report["rows"]}
    assert set(by_format) == set(manifest["formats"])
    for name, row in by_format.items():
        entry = manifest["formats"][name]
        assert row["sha256"] == entry["sha256"] and row["passed"], (name, row["failures"])
        assert row["host"]["top1_changed"] == 0, name  # the same file on the same machine: the same answers
        # the device's verdict is the host's (parity.compare on the same logits)
        again = compare("pytorch", "x", bundle.array("reference.npy"), bundle.array(entry["host_logits"]),
                        labels, bundle.tolerance(entry["precision"]))
        assert row["verdict"]["agreement"] == again.agreement == entry["host_verdict"]["agreement"]
        assert len(row["windows"]) == 6 and row["latency_sustained_p95_ms"] > 0 and row["memory_mb"] >= 0
    assert by_format["openvino"]["execution"]["inference_precision_hint"] == "f32"
    assert by_format["ncnn"]["execution"]["use_fp16_arithmetic"] is False
    assert by_format["litert"]["execution"]["delegate"] == "XNNPACK"


def test_the_probe_names_a_tampered_file_and_one_for_the_wrong_layout(device_bundles, tmp_path):
    done, report = probe(device_bundles["bad"].with_suffix(".tar"), tmp_path)
    assert done.returncode == 1
    rows = {row["format"]: row for row in report["rows"]}
    assert not rows["int8"]["passed"] and "not the one bundled" in rows["int8"]["failures"][0]
    assert not rows["onnx"]["passed"] and "agreement" in " ".join(rows["onnx"]["failures"])
    assert rows["onnx"]["host"]["top1_changed"] > 0 and rows["onnx"]["host"]["images"]  # named, image by image
    assert rows["fp16"]["passed"]  # the others are still judged
    assert "student.int8.onnx (int8) FAILED" in done.stderr and "student.onnx (onnx) FAILED" in done.stderr


def test_the_host_records_the_device_verdict_and_serves_only_what_passed_there(device_bundles, every_format,
                                                                               tmp_path):
    from kdforge.serve.model import ServedModel

    export = tmp_path / "export"
    shutil.copytree(every_format[0].export_dir, export, ignore=shutil.ignore_patterns("bench.json"))
    _, report = probe(device_bundles["bad"], tmp_path, "--device-name", "board")
    path = tmp_path / "device-report.json"
    path.write_text(json.dumps(report))
    # the bad bundle's onnx is another file than the export's: its verdict is not this export's
    result = CliRunner().invoke(cli, ["verify", str(export), "--device-report", str(path)])
    assert result.exit_code == 1, result.output  # int8 (the export's own file) failed there
    devices = json.loads((export / "verify.json").read_text())
    assert list(devices["int8"]["devices"]) == ["board (" + report["device"]["cpu"] + ", "
                                                + report["device"]["arch"] + ")"]
    assert devices["int8"]["devices"][next(iter(devices["int8"]["devices"]))]["passed"] is False
    assert "devices" not in devices["onnx"]
    assert "student.onnx not recorded" in result.output

    with pytest.raises(ServingError, match="FAILED on board"):
        ServedModel.load(export, "int8", device_report=path)
    with pytest.raises(ServingError, match="not judged on board"):
        ServedModel.load(export, "onnx", device_report=path)
    served = ServedModel.load(export, "auto", device_report=path)
    passed_there = {row["format"] for row in passed_on_device(read_device_report(path)).values()}
    assert served.info["format"] in passed_there - {"onnx", "int8"}
    assert served.info["device"]["passed"]


def test_the_report_shows_host_and_device_side_by_side(device_bundles, every_format, tmp_path):
    from kdforge.report import device_section

    _, report = probe(device_bundles["cnn"], tmp_path, "--device-name", "pi")
    export = tmp_path / "export"
    shutil.copytree(every_format[0].export_dir, export, ignore=shutil.ignore_patterns("bench.json"))
    path = tmp_path / "device-report.json"
    path.write_text(json.dumps(report))
    assert CliRunner().invoke(cli, ["verify", str(export), "--device-report", str(path)]).exit_code == 0

    class Doc:
        md: list = []

        def heading(self, text):
            self.md.append(text)

        def paragraph(self, text):
            pass

        def table(self, header, rows):
            self.md += [header, rows]

    doc = Doc()
    meta = json.loads((export / "metadata.json").read_text())
    device_section(doc, meta, json.loads((export / "verify.json").read_text()), {})
    header, rows = doc.md[1], doc.md[2]
    assert doc.md[0] == "On devices" and "top-1 device" in header
    assert {row[1] for row in rows} == {row["format"] for row in report["rows"]}
    assert all(row[0].startswith("pi (") and row[-1] == "PASS" for row in rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.heavy
@pytest.mark.skipif(not Path("/usr/sbin/sshd").is_file() or not shutil.which("ssh"),
                    reason="needs OpenSSH's server and client (apt-get install openssh-server; .ci/run does)")
def test_kdforge_probe_over_ssh_verifies_on_the_host_and_imports_the_report(device_bundles, every_format, tmp_path):
    """An sshd on 127.0.0.1 with a throwaway host key and user key: `kdforge probe --ssh` copies the bundle, runs the
    probe there (this Python), brings the report back, records it in the export, and leaves nothing there."""
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    shutil.copy(keys / "user.pub", keys / "authorized_keys")
    port = free_port()
    (keys / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\nAuthorizedKeysFile {keys / 'authorized_keys'}"
        f"\nPidFile {keys / 'sshd.pid'}\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n"
        f"PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(keys / "sshd_config")], stderr=subprocess.PIPE)
    export = tmp_path / "export"
    shutil.copytree(every_format[0].export_dir, export, ignore=shutil.ignore_patterns("bench.json"))
    try:
        time.sleep(0.5)
        result = CliRunner().invoke(cli, [
            "probe", str(device_bundles["cnn"].with_suffix(".tar")), "--ssh", f"{getpass.getuser()}@127.0.0.1",
            "--port", str(port), "-o", f"IdentityFile={keys / 'user'}", "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={keys / 'known_hosts'}", "--python", sys.executable, "--seconds", "0.3",
            "--export", str(export), "--output", str(tmp_path / "report.json"), "--device-name", "over-ssh"])
    finally:
        sshd.send_signal(signal.SIGTERM)
        sshd.wait(10)
    assert result.exit_code == 0, result.output
    report = read_device_report(tmp_path / "report.json")
    assert report["device"]["name"] == "over-ssh" and all(row["passed"] for row in report["rows"])
    verified = json.loads((export / "verify.json").read_text())
    assert all(any(name.startswith("over-ssh") for name in verified[row["format"]]["devices"])
               for row in report["rows"])
    assert not list(Path("/tmp").glob("kdforge-probe.*"))  # the folder there was removed


def test_verification_fails_a_file_that_answers_one_image_per_call_unlike_its_batches():
    """The server's /predict runs one image per call; verification runs batches. A runtime whose batch-of-one path
    answers otherwise (OpenVINO 2026.4's INT8 CPU kernels did, on an AVX-512/AMX Xeon) fails verification, saying
    so, though its batched answers are the student's."""
    import torch

    from kdforge.data.dataset import ImageDataset
    from kdforge.data.transforms import InputSpec
    from kdforge.judge import verify_runner
    from kdforge.recipe import RuntimeConfig, VerifyConfig
    from kdforge.runners import TorchRunner
    from kdforge.runtime import runtime_scope

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    spec = InputSpec(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    data = ImageDataset(torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8), torch.arange(100) % 10,
                        tuple("abcdefghij"))

    class OddWhenAlone:  # the student in batches; a shifted answer when called with one image
        name = "odd"

        def __init__(self, runtime):
            self.spec, self.inner = spec, TorchRunner(student, spec, runtime)

        def predict(self, images):
            logits = self.inner.predict(images)
            return logits.roll(1, dims=1) if len(images) == 1 else logits

    with runtime_scope(RuntimeConfig(device="cpu")) as runtime:
        fine = verify_runner(TorchRunner(student, spec, runtime), lambda: student, data, VerifyConfig(), "fp32",
                             runtime, {}, 50, "same")
        odd = verify_runner(OddWhenAlone(runtime), lambda: student, data, VerifyConfig(), "fp32", runtime, {}, 50,
                            "odd")
    assert fine.passed and fine.one_per_call_agreement == 1.0
    assert odd.agreement == 1.0 and not odd.passed and odd.one_per_call_agreement < 0.9
    assert "one image per call" in odd.failures[0]
