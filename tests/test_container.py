"""The serving image, built and run for real with podman (no Docker engine or image registry needed).

Needs podman, runc and debootstrap (`.ci/run` installs them with apt); skipped where they are missing.
The base image is made once with debootstrap and kept in KDFORGE_PODMAN_ROOT (default /var/tmp/kdforge-podman).
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


def ensure_base_image() -> None:
    """debian:bookworm-slim made with debootstrap (no registry needed), slimmed the way Debian's official slim
    image is, with the host's extra CA certificates (so pip inside a build trusts the same TLS proxy)."""
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return
    rootfs = ROOT / "rootfs"
    if not (rootfs / "usr" / "bin" / "apt-get").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs)], check=True,
                       capture_output=True, timeout=900)
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
    podman("import", "-", "localhost/base:bookworm", stdin=tar.stdout)
    tar.wait()
    podman("tag", "localhost/base:bookworm", BASE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_png(port: int, path: Path) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=path.read_bytes(),
                                     headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_serving_image_builds_runs_answers_like_kdforge_predict_and_stops_fast(served_export, tmp_path):
    export_dir, pngs = served_export
    ROOT.mkdir(parents=True, exist_ok=True)
    ensure_base_image()

    # build context: what the Dockerfile copies, with the export as exports/model
    context = tmp_path / "context"
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, context / name)
    shutil.copytree(REPO / "kdforge", context / "kdforge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(export_dir, context / "exports" / "model")
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
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                    assert json.loads(response.read()) == {"status": "ok"}
                break
            except OSError:
                state = podman("inspect", name, "--format", "{{.State.Status}}").stdout.strip()
                assert state == "running", podman("logs", name).stderr
                assert time.monotonic() < deadline, "the container did not become healthy in 90 s"
                time.sleep(0.2)
        cold_start_s = time.perf_counter() - started

        # the image's own HEALTHCHECK command and user
        healthcheck = json.loads(podman("image", "inspect", IMAGE, "--format", "{{json .HealthCheck}}").stdout)
        assert podman("exec", name, *healthcheck["Test"][1:], check=False).returncode == 0
        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"  # not root

        # answers equal `kdforge predict` on the same test-split files
        local = CliRunner().invoke(cli, ["predict", *map(str, pngs), "--model", str(export_dir)])
        assert local.exit_code == 0, local.output
        expected = [json.loads(line)["predictions"] for line in local.stdout.splitlines()]
        assert [post_png(port, p)["predictions"] for p in pngs] == expected

        started = time.perf_counter()
        podman("stop", "-t", "10", name)
        stop_s = time.perf_counter() - started
        exit_code = podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
    finally:
        podman("rm", "-f", name, check=False)
        podman("image", "prune", "-f", check=False)  # layers of earlier builds of the test image
    print(f"\ncontainer: image {size / 1e6:.0f} MB, build {build_s:.0f} s, cold start to healthy {cold_start_s:.1f} s, "
          f"stop {stop_s:.2f} s, exit code {exit_code}")
    assert stop_s < 2.0, f"the container took {stop_s:.1f} s to stop on SIGTERM"
    assert exit_code == "0"
    assert size < 400e6, f"image is {size / 1e6:.0f} MB, over the 400 MB target"
