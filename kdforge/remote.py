"""`kdforge probe BUNDLE --ssh USER@HOST`: the device verdict on a board over SSH, with the system's `ssh` and
`scp` (your keys, your ~/.ssh/config; never a password prompt: BatchMode). The bundle's .tar is copied to a
temporary folder there, the probe runs there (the installed `python3 -m kdforge.serve.probe`, or inside the serving
IMAGE with podman or docker), device-report.json is brought back, and the folder there is removed.

    report_path, exit_code = probe_over_ssh(Path("bundles/quickstart.tar"), "pi@raspberrypi.local",
                                            Path("device-report.json"), seconds=60)

The host then imports the report (`kdforge verify EXPORT --device-report`, done by `kdforge probe --export`).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from kdforge.device import DEVICE_REPORT
from kdforge.errors import KdforgeError

CONNECT_TIMEOUT_S = 15
IMAGE_PYTHON = "/opt/venv/bin/python"  # the serving image's interpreter (Dockerfile)


class RemoteError(KdforgeError):
    """The device could not be reached, or the probe could not run there."""


def ssh_base(target: str, port: int | None, options: list[str]) -> tuple[list[str], list[str]]:
    """The ssh and scp command prefixes for `target` (BatchMode: a missing key is an error, not a prompt)."""
    common = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}"]
    for option in options:
        common += ["-o", option]
    ssh = ["ssh", *common, *(["-p", str(port)] if port else []), target]
    scp = ["scp", "-q", *common, *(["-P", str(port)] if port else [])]
    return ssh, scp


def remote_probe_command(folder: str, tar_name: str, seconds: float, precision: str, image: str | None,
                         python: str, device_name: str | None) -> str:
    """The shell command run on the device: the probe on the copied bundle, its report in `folder`."""
    options = ["--verify", "--seconds", f"{seconds:g}", "--precision", precision,
               *(["--device-name", device_name] if device_name else [])]
    if image is None:
        return shlex.join([python, "-m", "kdforge.serve.probe", f"{folder}/{tar_name}", *options,
                           "--output", f"{folder}/{DEVICE_REPORT}"])
    # the image runs as a non-root user: it may write the report into the (temporary) folder
    inner = shlex.join(["run", "--rm", "-v", f"{folder}:/bundle", "--entrypoint", IMAGE_PYTHON, image,
                        "-m", "kdforge.serve.probe", f"/bundle/{tar_name}", *options,
                        "--output", f"/bundle/{DEVICE_REPORT}"])
    return (f"chmod a+rwx {shlex.quote(folder)} && tool=$(command -v podman || command -v docker) && "
            f"[ -n \"$tool\" ] || {{ echo 'neither podman nor docker is installed there' >&2; exit 127; }}; "
            f"\"$tool\" {inner}")


def run(command: list[str], what: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise RemoteError(f"{command[0]} is not installed here: install OpenSSH's client") from None
    except subprocess.TimeoutExpired:
        raise RemoteError(f"{what} took longer than {timeout:.0f} s") from None
    if check and done.returncode != 0:
        raise RemoteError(f"{what} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return done


def probe_over_ssh(bundle_tar: Path, target: str, output: Path, seconds: float = 60, precision: str = "fp32",
                   image: str | None = None, port: int | None = None, options: list[str] | None = None,
                   python: str = "python3", device_name: str | None = None,
                   timeout: float = 3600) -> tuple[Path, int]:
    """Copy `bundle_tar` to `target`, run the probe there, bring device-report.json back to `output`: (output,
    the probe's exit code there: 0 every file passed, 1 one failed)."""
    if not bundle_tar.is_file() or bundle_tar.suffix != ".tar":
        raise RemoteError(f"{bundle_tar}: give the bundle's .tar (kdforge bundle writes it beside the folder)")
    ssh, scp = ssh_base(target, port, options or [])
    folder = run([*ssh, "mktemp -d -t kdforge-probe.XXXXXX"], f"connecting to {target}", 60).stdout.strip()
    if not folder.startswith("/"):
        raise RemoteError(f"{target} answered {folder!r} for a temporary folder")
    try:
        run([*scp, str(bundle_tar), f"{target}:{folder}/"], f"copying {bundle_tar.name} to {target}", timeout)
        command = remote_probe_command(folder, bundle_tar.name, seconds, precision, image, python, device_name)
        done = run([*ssh, command], f"the probe on {target}", timeout, check=False)
        sys.stderr.write(done.stderr)
        if done.returncode not in (0, 1):
            raise RemoteError(f"the probe on {target} did not run (exit {done.returncode}): "
                              f"{done.stderr.strip()[-500:]}")
        output.parent.mkdir(parents=True, exist_ok=True)
        run([*scp, f"{target}:{folder}/{DEVICE_REPORT}", str(output)], f"bringing {DEVICE_REPORT} back", 120)
        return output, done.returncode
    finally:
        run([*ssh, shlex.join(["rm", "-rf", folder])], f"removing {folder} on {target}", 60, check=False)
