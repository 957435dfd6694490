"""The serving image, built and run for real with podman (no Docker engine or image registry needed), for amd64
and, under qemu-user-static emulation, for arm64.

Needs podman, runc and debootstrap (`.ci/run` installs them with apt); skipped where they are missing. The arm64
image also needs qemu-user-static registered with binfmt_misc (the test registers it when it runs as root).
The base images are made once with debootstrap and kept in KDFORGE_PODMAN_ROOT (default /var/tmp/kdforge-podman).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdforge.cli import app as cli

REPO = Path(__file__).parents[1]
ROOT = Path(os.environ.get("KDFORGE_PODMAN_ROOT", "/var/tmp/kdforge-podman"))
BASE = "docker.io/library/debian:bookworm-slim"
IMAGE = "localhost/kdforge-serve-test"

pytestmark = [
    pytest.mark.container,
    pytest.mark.heavy,
    pytest.mark.skipif(not (shutil.which("podman") and shutil.which("debootstrap")),
                       reason="needs podman and debootstrap (apt-get install podman runc debootstrap; .ci/run does)"),
]


def podman(*args: str, timeout: float = 900, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(REPO / "deploy" / "containers.conf")}
    cmd = ["podman", "--root", str(ROOT / "storage"), "--runroot", str(ROOT / "run"), *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args[:3])} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# what makes Debian's official -slim images slim: no docs, man pages or locales, no apt caches
SLIM_DPKG = "\n".join(f"path-exclude {p}" for p in (
    "/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*", "/usr/share/lintian/*",
)) + "\npath-include /usr/share/doc/*/copyright\n"
SLIM_APT = 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'


def ensure_base_image(arch: str = "amd64") -> str:
    """debian:bookworm-slim for `arch` made with debootstrap (no registry needed), slimmed the way Debian's official
    slim image is, with the host's extra CA certificates (so pip inside a build trusts the same TLS proxy).
    Returns the image name to pass as BASE_IMAGE."""
    name = BASE if arch == "amd64" else f"localhost/base:bookworm-{arch}"
    if podman("image", "exists", name, check=False).returncode == 0:
        return name
    rootfs = ROOT / ("rootfs" if arch == "amd64" else f"rootfs-{arch}")
    if not (rootfs / "usr" / "bin" / "apt-get").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        # a foreign architecture's second stage runs its binaries through qemu (binfmt_misc)
        subprocess.run(["debootstrap", f"--arch={arch}", "--variant=minbase", "bookworm", str(rootfs)], check=True,
                       capture_output=True, timeout=1800)
    (rootfs / "etc" / "dpkg" / "dpkg.cfg.d" / "slim").write_text(SLIM_DPKG)
    (rootfs / "etc" / "apt" / "apt.conf.d" / "slim-clean").write_text(SLIM_APT)
    certificates = rootfs / "usr" / "local" / "share" / "ca-certificates"
    certificates.mkdir(parents=True, exist_ok=True)
    for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy(cert, certificates / cert.name)
    excluded = ["./var/lib/apt/lists/*", "./var/cache/apt/*", "./usr/share/doc/*", "./usr/share/man/*",
                "./usr/share/info/*", "./usr/share/locale/*"]
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), *(f"--exclude={e}" for e in excluded),
                            "-c", "."], stdout=subprocess.PIPE)
    podman("import", "--arch", arch, "-", f"localhost/base:bookworm-{arch}", stdin=tar.stdout)
    tar.wait()
    if arch == "amd64":
        podman("tag", "localhost/base:bookworm-amd64", BASE)
    return name


BINFMT = Path("/proc/sys/fs/binfmt_misc")


def arm64_emulation() -> str | None:
    """None when this machine can run arm64 binaries (qemu-user-static registered with binfmt_misc, with the F
    flag so that containers find the interpreter), registering it when run as root; else why it cannot."""
    if os.uname().machine == "aarch64":
        return None
    if not shutil.which("qemu-aarch64-static"):
        return "qemu-user-static is not installed (apt-get install qemu-user-static; .ci/run does)"
    if not (BINFMT / "register").exists():
        if os.geteuid() != 0:
            return "binfmt_misc is not mounted and this is not root: cannot register qemu for arm64"
        mounted = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True,
                                 text=True)
        if mounted.returncode != 0:
            return f"binfmt_misc cannot be mounted here ({mounted.stderr.strip()}): arm64 cannot be emulated"
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() and os.geteuid() == 0 and shutil.which("update-binfmts"):
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not entry.exists():
        return "qemu-aarch64 is not registered with binfmt_misc (update-binfmts --enable qemu-aarch64, as root)"
    text = entry.read_text()
    flags = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("flags:")), "")
    if "enabled" not in text or "F" not in flags:
        return f"qemu-aarch64 is registered without the F flag (flags {flags!r}): containers cannot find qemu"
    return None


def build_context(tmp_path: Path, export_dir: Path) -> Path:
    """What the Dockerfile copies, with the export as exports/model."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, context / name)
    shutil.copytree(REPO / "kdforge", context / "kdforge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(export_dir, context / "exports" / "model")
    return context


def wait_healthy(name: str, port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                assert json.loads(response.read()) == {"status": "ok"}
            return
        except OSError:
            state = podman("inspect", name, "--format", "{{.State.Status}}").stdout.strip()
            assert state == "running", podman("logs", name).stderr
            assert time.monotonic() < deadline, f"the container did not become healthy in {seconds:.0f} s"
            time.sleep(0.2)


def local_predictions(export_dir: Path, pngs: list[Path], *options: str) -> list[list[dict]]:
    """What `kdforge predict` answers here for the same files."""
    local = CliRunner().invoke(cli, ["predict", *map(str, pngs), "--model", str(export_dir), *options])
    assert local.exit_code == 0, local.output
    return [json.loads(line)["predictions"] for line in local.stdout.splitlines()]


def prune_old_layers() -> None:
    """Remove untagged layers of builds older than a day; newer ones are the build cache of the next run (the
    dependency layers of the Dockerfile stay valid until pyproject.toml changes)."""
    podman("image", "prune", "-f", "--filter", "until=24h", check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_png(port: int, path: Path) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=path.read_bytes(),
                                     headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def assert_probe_times(container: str, export_dir: Path, arch: str, *options: str) -> None:
    """`python -m kdforge.serve.probe` inside the running container (torch-free, as the image is) times every file
    of the baked-in export on that machine: latency.json names the machine's architecture and each file's sha256."""
    script = f"python -m kdforge.serve.probe /models --output /tmp/latency.json {' '.join(options)} >/dev/null " \
             f"&& cat /tmp/latency.json"
    profile = json.loads(podman("exec", container, "/bin/sh", "-c", script.replace("python", "/opt/venv/bin/python",
                                                                                    1)).stdout)
    recorded = json.loads((export_dir / "metadata.json").read_text())["formats"]
    assert profile["machine"]["arch"] == arch
    assert {row["format"]: row["sha256"] for row in profile["rows"]} == \
        {name: entry["sha256"] for name, entry in recorded.items()}
    assert all(row["latency_p50_ms"] > 0 for row in profile["rows"])


def assert_protocol_answers(port: int, export_dir: Path, pngs: list[Path]) -> None:
    """tritonclient.http against the container: ready, and the top-5 classes of an infer with encoded images are
    /predict's; /metrics counts those requests."""
    import numpy as np
    import tritonclient.http as triton

    name = json.loads((export_dir / "metadata.json").read_text())["recipe"]
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    assert client.is_server_ready() and client.is_model_ready(name)
    images = triton.InferInput("image", [len(pngs)], "BYTES")
    images.set_data_from_numpy(np.array([p.read_bytes() for p in pngs], dtype=np.object_))
    top = client.infer(name, [images], outputs=[triton.InferRequestedOutput("logits", class_count=5)])
    client.close()
    labels = [[s.decode().split(":")[2] for s in row] for row in top.as_numpy("logits")]
    assert labels == [[p["label"] for p in post_png(port, path)["predictions"]] for path in pngs]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert 'route="/v2/models/{model_name}/infer"' in response.read().decode()


def test_serving_image_builds_runs_answers_like_kdforge_predict_and_stops_fast(served_export, tmp_path):
    export_dir, pngs = served_export
    ROOT.mkdir(parents=True, exist_ok=True)
    ensure_base_image()
    context = build_context(tmp_path, export_dir)
    started = time.perf_counter()
    podman("build", "--format", "docker", "--pull=never", "--network=host", "--build-arg",
           "EXPORT_DIR=exports/model", "-t", IMAGE, str(context), timeout=1500)
    build_s = time.perf_counter() - started
    size = int(podman("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip())

    name, port = f"kdforge-test-{os.getpid()}", free_port()
    podman("rm", "-f", name, check=False)
    started = time.perf_counter()
    podman("run", "-d", "--network", "host", "--no-healthcheck", "--name", name,
           "-e", "KDFORGE_HOST=127.0.0.1", "-e", f"KDFORGE_PORT={port}", IMAGE)
    try:
        wait_healthy(name, port, 90)
        cold_start_s = time.perf_counter() - started

        # the image's own HEALTHCHECK command and user
        healthcheck = json.loads(podman("image", "inspect", IMAGE, "--format", "{{json .HealthCheck}}").stdout)
        assert podman("exec", name, *healthcheck["Test"][1:], check=False).returncode == 0
        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"  # not root

        # answers equal `kdforge predict` on the same test-split files
        assert [post_png(port, p)["predictions"] for p in pngs] == local_predictions(export_dir, pngs)
        # the device probe of the student search runs in the image and times the very files it serves
        assert_probe_times(name, export_dir, "x86_64")
        # Triton's client speaks the Open Inference Protocol to the container: the same classes as /predict
        assert_protocol_answers(port, export_dir, pngs)

        started = time.perf_counter()
        podman("stop", "-t", "10", name)
        stop_s = time.perf_counter() - started
        exit_code = podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
    finally:
        podman("rm", "-f", name, check=False)
        prune_old_layers()
    print(f"\ncontainer: image {size / 1e6:.0f} MB, build {build_s:.0f} s, cold start to healthy {cold_start_s:.1f} s, "
          f"stop {stop_s:.2f} s, exit code {exit_code}")
    assert stop_s < 2.0, f"the container took {stop_s:.1f} s to stop on SIGTERM"
    assert exit_code == "0"
    assert size < 400e6, f"image is {size / 1e6:.0f} MB, over the 400 MB target"


def test_serving_image_builds_for_arm64_and_answers_like_amd64(served_export, tmp_path):
    """The same Dockerfile built for linux/arm64 (every serving wheel exists for aarch64) and run under qemu:
    its answers on test-split PNGs are the amd64 answers (labels exact; probabilities within 1e-4, since ONNX
    Runtime's Arm kernels round differently)."""
    reason = arm64_emulation()
    if reason:
        pytest.skip(f"arm64 image not built: {reason}")
    export_dir, pngs = served_export
    ROOT.mkdir(parents=True, exist_ok=True)
    base = ensure_base_image("arm64")
    context = build_context(tmp_path, export_dir)
    image = f"{IMAGE}-arm64"
    started = time.perf_counter()
    podman("build", "--format", "docker", "--pull=never", "--network=host", "--platform", "linux/arm64",
           "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "EXPORT_DIR=exports/model", "-t", image,
           str(context), timeout=2400)
    build_s = time.perf_counter() - started
    arch, size = podman("image", "inspect", image, "--format", "{{.Architecture}} {{.Size}}").stdout.split()
    assert arch == "arm64"

    name, port = f"kdforge-test-arm64-{os.getpid()}", free_port()
    podman("rm", "-f", name, check=False)
    # under qemu-user the container sees this x86 machine's /sys/devices, and ONNX Runtime's CPU discovery (cpuinfo,
    # run at import since 1.29) crashes reading it; masked, it falls back to generic Arm kernels. On Arm hardware
    # /sys describes the real CPU and nothing is masked.
    # the FP32 ONNX: the comparison is of the platform, not of two INT8 kernel libraries (x86 and Arm INT8 kernels
    # round differently: 3.4e-3 at most in a probability here, the same top-1)
    podman("run", "-d", "--network", "host", "--no-healthcheck", "--name", name, "--security-opt",
           "mask=/sys/devices", "-e", "KDFORGE_HOST=127.0.0.1", "-e", f"KDFORGE_PORT={port}",
           "-e", "KDFORGE_FORMAT=onnx", image)
    try:
        wait_healthy(name, port, 300)  # emulated: python, numpy and ONNX Runtime start several times slower
        assert podman("exec", name, "uname", "-m").stdout.strip() == "aarch64"
        served = [post_png(port, p)["predictions"] for p in pngs[:4]]
        assert_probe_times(name, export_dir, "aarch64", "--repeats", "3", "--warmup", "1")
    finally:
        podman("rm", "-f", name, check=False)
        prune_old_layers()
    expected = local_predictions(export_dir, pngs[:4], "--format", "onnx")
    # the same classes with the same probabilities up to float rounding: top-1 exact; every class in both top-5
    # lists within 1e-4 (neighbours closer than that may swap places)
    differences = []
    for got, want in zip(served, expected, strict=True):
        assert got[0]["index"] == want[0]["index"]
        theirs = {p["index"]: p["probability"] for p in want}
        differences += [abs(p["probability"] - theirs[p["index"]]) for p in got if p["index"] in theirs]
    print(f"\narm64 container (qemu): image {int(size) / 1e6:.0f} MB, build {build_s:.0f} s; FP32 ONNX top-1 on "
          f"{len(served)} test images {[row[0]['label'] for row in served]} as on amd64; max |probability difference| "
          f"{max(differences):.1e} over {len(differences)} shared top-5 entries")
    assert max(differences) < 1e-4 and len(differences) >= 4 * len(served)
    assert int(size) < 400e6, f"arm64 image is {int(size) / 1e6:.0f} MB, over the 400 MB target"


DEVICE_EXTRAS = "serve,serve-litert,serve-ncnn"  # the runtimes a board runs: ONNX Runtime, LiteRT, NCNN


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_device_bundles_are_judged_inside_the_serving_image(device_bundles, every_format, tmp_path, arch):
    """The serving image built with the on-device runtimes (ONNX Runtime, LiteRT, NCNN; no torch) verifies the
    bundles of the small CNN and the small ViT with the probe; for arm64 under qemu: the aarch64 builds of those
    runtimes, real Arm kernels, emulated. A tampered file and a file exported for BGR input are caught there (exit
    1, each named)."""
    if arch == "arm64" and (reason := arm64_emulation()):
        pytest.skip(f"arm64 image not built: {reason}")
    ROOT.mkdir(parents=True, exist_ok=True)
    base = ensure_base_image(arch)
    image = f"{IMAGE}-device-{arch}"
    podman("build", "--format", "docker", "--pull=never", "--network=host", "--platform", f"linux/{arch}",
           "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"EXTRAS={DEVICE_EXTRAS}", "--build-arg",
           "EXPORT_DIR=exports/model", "-t", image, str(build_context(tmp_path, every_format[0].export_dir)),
           timeout=2400)
    shared = tmp_path / "bundles"
    shared.mkdir()
    shared.chmod(0o777)  # the image's user (10001) writes the reports here
    # under qemu-user the container sees this x86 machine's /sys/devices (see the arm64 serving test)
    masked = ["--security-opt", "mask=/sys/devices"] if arch == "arm64" else []
    machine = {"amd64": "x86_64", "arm64": "aarch64"}[arch]

    def probe_there(name: str) -> tuple[subprocess.CompletedProcess, dict]:
        shutil.copy(device_bundles[name].with_suffix(".tar"), shared / f"{name}.tar")
        done = podman("run", "--rm", "--network", "none", *masked, "-v", f"{shared}:/bundle", "--entrypoint",
                      "/opt/venv/bin/python", image, "-m", "kdforge.serve.probe", f"/bundle/{name}.tar", "--verify",
                      "--seconds", "1", "--device-name", f"{arch}-container", "--output",
                      f"/bundle/{name}-report.json", check=False, timeout=1500)
        report = shared / f"{name}-report.json"
        return done, json.loads(report.read_text()) if report.is_file() else {}

    try:
        assert podman("run", "--rm", "--network", "none", *masked, "--entrypoint", "/opt/venv/bin/python", image,
                      "-c", "import importlib.util as u; print(u.find_spec('torch'))").stdout.strip() == "None"
        lines = []
        for name in ("cnn", "vit"):
            done, report = probe_there(name)
            assert done.returncode == 0, done.stderr[-3000:]
            assert report["device"]["arch"] == machine
            judged = {row["format"] for row in report["rows"]}
            expected = {"onnx", "int8", "litert"} | ({"fp16", "litert_int8", "ncnn"} if name == "cnn" else set())
            assert expected <= judged, (name, judged, report["skipped"])
            for row in report["rows"]:
                assert row["passed"] and len(row["windows"]) == 6, (name, row["format"], row["failures"])
                lines.append(f"{arch} {name:<4} {row['format']:<12} top-1 {row['verdict']['candidate_top1']:.2%} "
                             f"(host {row['host_verdict']['candidate_top1']:.2%}) agreement with PyTorch "
                             f"{row['verdict']['agreement']:.2%} (host {row['host_verdict']['agreement']:.2%}), "
                             f"top-1 changed vs host {row['host']['top1_changed']}, max |Δlogit| vs host "
                             f"{row['host']['max_abs_diff']:.1e}, {row['memory_mb']:.0f} MB")
        done, report = probe_there("bad")
    finally:
        podman("rmi", "-f", image, check=False)
        prune_old_layers()
    assert done.returncode == 1
    assert "student.int8.onnx (int8) FAILED" in done.stderr and "student.onnx (onnx) FAILED" in done.stderr
    print("\n" + "\n".join(lines))
