"""The device bundle and the device report, read and checked without torch: what the probe on a device reads, and
what the host reads back from it (`kdforge verify --device-report`, `kdforge serve --device-report`, `kdforge
students --device-profile`, `kdforge report`).

A bundle (`kdforge bundle EXPORT_DIR`, made by kdforge/bundle.py) is a folder, also packed as BUNDLE.tar:

    bundle.json              the manifest: the student, its input spec and classes, the [verify] tolerances per
                             precision, each servable file's metadata.json entry, the host's run of each file, and
                             every other file's sha256
    images.npy               uint8 (N, size, size, 3): test-split images as the server holds them after decoding
    labels.npy, indices.npy  their labels and their positions in the test split
    reference.npy            float32 (N, classes): the PyTorch student's FP32 logits on exactly those images
    host/<format>.npy        the same file run on the build machine through the same session: where the device's
                             top-1 differs from the host's, the report names the images
    student.onnx, ...        the servable files under their export names (OpenVINO's and NCNN's .bin beside them)

Arrays are .npy read with `allow_pickle=False`: a bundle cannot run code. The report the probe writes there:

    device-report.json       the device (CPU and board lines, architecture, CPU features, kernel), the runtimes'
                             versions, and per file: its sha256, the settings the runtime used, the verdict
                             against the PyTorch student (parity.compare, as `kdforge verify`), the images whose
                             top-1 changed from the host's run, cold and sustained latency, the memory it added

    bundle = open_bundle(Path("bundles/quickstart.tar"))    # extracted to a temporary folder when a .tar
    report = read_device_report(Path("device-report.json"))
    passed = passed_on_device(report)                       # {sha256: row} of the files that passed there
"""

from __future__ import annotations

import contextlib
import hashlib
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdforge.errors import KdforgeError
from kdforge.fileio import file_hash, read_json

MANIFEST = "bundle.json"
IMAGES = "images.npy"
LABELS = "labels.npy"
INDICES = "indices.npy"
REFERENCE = "reference.npy"
HOST = "host"  # host/<format>.npy
DEVICE_REPORT = "device-report.json"
BUNDLE_KIND = "kdforge device bundle"
REPORT_KIND = "kdforge device report"
VERSION = 1
MAX_TAR_BYTES = 4 << 30  # a bundle of 1,000 images at 224 with every format is ~0.2 GB


class BundleError(KdforgeError):
    """The bundle is incomplete, damaged or not a kdforge bundle."""


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @property
    def formats(self) -> dict[str, dict[str, Any]]:
        return self.manifest["formats"]

    def array(self, name: str) -> np.ndarray:
        """One of the bundle's arrays (IMAGES, LABELS, INDICES, REFERENCE, host/<format>.npy), never unpickled."""
        return np.load(self.root / name, allow_pickle=False)

    def tolerance(self, precision: str) -> Tolerance:
        return Tolerance(**self.manifest["tolerances"][precision])


@dataclass(frozen=True)
class Tolerance:  # one precision's [verify] tolerance, as parity.compare reads it
    min_agreement: float
    max_top1_delta: float


def check_bundle(root: Path) -> Bundle:
    """The bundle in folder `root`, its manifest read and its data files (images, labels, logits) checked against
    their sha256. Model files are checked by the probe one by one: a changed one fails, named, and the others are
    still judged."""
    manifest = read_json(root / MANIFEST)
    if manifest.get("kind") != BUNDLE_KIND:
        raise BundleError(f"{root}: not a kdforge device bundle (no {MANIFEST} of kind {BUNDLE_KIND!r}); make one "
                          f"with `kdforge bundle EXPORT_DIR`")
    if manifest.get("version") != VERSION:
        raise BundleError(f"{root}: bundle version {manifest.get('version')}; this kdforge reads version {VERSION}: "
                          f"make the bundle again with this kdforge")
    model_files = {entry[key] for entry in manifest["formats"].values() for key in ("file", "weights_file")
                   if key in entry}
    for name, digest in manifest["files"].items():  # every file but the manifest
        if name in model_files:
            continue
        path = root / name
        if not path.is_file():
            raise BundleError(f"{path} is missing from the bundle: copy the whole bundle (or its .tar) again")
        if file_hash(path) != digest:
            raise BundleError(f"{path} changed since the bundle was made (sha256): copy the bundle again")
    return Bundle(root, manifest)


@contextlib.contextmanager
def open_bundle(path: Path) -> Iterator[Bundle]:
    """The bundle at `path` (its folder, or the .tar `kdforge bundle` packed), checked; a .tar is extracted into a
    temporary folder removed when the block ends. Members that are not plain files or folders, or that would
    land outside that folder, are refused (`safe_members`)."""
    path = Path(path)
    if path.is_dir():
        yield check_bundle(path)
        return
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle (a folder or a .tar made by `kdforge bundle`)")
    with tempfile.TemporaryDirectory(prefix="kdforge-bundle-") as tmp:
        try:
            with tarfile.open(path) as archive:
                checked = safe_members(path, archive.getmembers())
                # and tarfile's own "data" filter where this Python has it (3.11.4 and later)
                archive.extractall(tmp, members=checked, **({"filter": "data"} if hasattr(tarfile, "data_filter")
                                                            else {}))
        except (tarfile.TarError, OSError) as exc:
            raise BundleError(f"{path}: not a readable bundle .tar ({exc})") from None
        folders = [p for p in Path(tmp).iterdir() if (p / MANIFEST).is_file()]
        root = Path(tmp) if (Path(tmp) / MANIFEST).is_file() else folders[0] if len(folders) == 1 else None
        if root is None:
            raise BundleError(f"{path}: no {MANIFEST} inside; not a kdforge bundle")
        yield check_bundle(root)


def safe_members(path: Path, members: list[tarfile.TarInfo]) -> list[tarfile.TarInfo]:
    """The members of a bundle .tar, refused as a whole when one is not a plain file or folder (a link, a device),
    has an absolute path or `..` in it, or when they unpack to more than MAX_TAR_BYTES (what tarfile's "data"
    filter does, on the Pythons older than 3.11.4 that lack it: Debian 12's 3.11.2 in the serving image)."""
    for member in members:
        parts = Path(member.name).parts
        if not (member.isfile() or member.isdir()) or member.name.startswith("/") or ".." in parts:
            raise BundleError(f"{path}: member {member.name!r} is not a plain file inside the bundle; not a kdforge "
                              f"bundle")
    if sum(member.size for member in members) > MAX_TAR_BYTES:
        raise BundleError(f"{path}: unpacks to more than {MAX_TAR_BYTES >> 30} GB; not a kdforge bundle")
    for member in members:  # no owner, setuid bits or odd modes carried over from the .tar
        member.mode = 0o755 if member.isdir() else 0o644
        member.uid = member.gid = 0
        member.uname = member.gname = ""
    return members


def bundle_digest(bundle: Bundle) -> str:
    """A short fingerprint of the bundle's manifest (what a report says it judged)."""
    return hashlib.sha256((bundle.root / MANIFEST).read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# the device report, read back on the host


def device_name(report: dict[str, Any]) -> str:
    """How a report's device is named in verify.json and the report: the name given to the probe (--device-name),
    else its host name, with CPU and architecture."""
    device = report["device"]
    return f"{device.get('name') or 'device'} ({device.get('cpu', '?')}, {device.get('arch', '?')})"


def read_device_report(path: Path) -> dict[str, Any]:
    """A device report written by `python -m kdforge.serve.probe BUNDLE --verify`, checked to be one."""
    report = read_json(path)
    if report.get("kind") != REPORT_KIND or not isinstance(report.get("rows"), list) or "device" not in report:
        raise KdforgeError(f"{path}: not a device report (`python -m kdforge.serve.probe BUNDLE --verify` on the "
                           f"device writes {DEVICE_REPORT})")
    return report


def shipped_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows judging the files as kdforge ships them (the verified settings, not the runtime's defaults)."""
    return [row for row in report["rows"] if row.get("setting", "fp32") == "fp32"]


def passed_on_device(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """sha256 -> row for each file that passed its tolerance on the report's device (with kdforge's settings)."""
    return {row["sha256"]: row for row in shipped_rows(report) if row.get("passed")}


def failed_on_device(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """sha256 -> row for each file that failed there (a file changed on the way, one that did not load, one
    outside its tolerance)."""
    return {row["sha256"]: row for row in shipped_rows(report) if row.get("passed") is False}


def device_record(report: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """What verify.json keeps of one file's verdict on a device, beside the host's."""
    verdict = row.get("verdict", {})
    return {"sha256": row["sha256"], "passed": bool(row.get("passed")), "failures": row.get("failures", []),
            "measured_at": report.get("measured_at"), "cpu": report["device"].get("cpu"),
            "arch": report["device"].get("arch"), "runtime": row.get("runtime"),
            **{key: verdict.get(key) for key in ("count", "reference_top1", "candidate_top1", "top1_delta_points",
                                                 "agreement", "max_abs_diff", "mcnemar_p")},
            "top1_changed_vs_host": row.get("host", {}).get("top1_changed"),
            **{key: row.get(key) for key in ("latency_cold_p50_ms", "latency_sustained_p50_ms",
                                             "latency_sustained_p95_ms", "memory_mb")}}


def import_device_report(export_dir: Path, report: dict[str, Any]) -> tuple[dict[str, dict], dict[str, str]]:
    """Record `report`'s verdicts in export_dir/verify.json, each under its format's "devices" (keyed by
    `device_name`), for the files that are still the export's (same sha256): (format -> record, and the report's
    files left out -> why)."""
    from kdforge.fileio import read_metadata, write_json
    from kdforge.layout import VERIFY

    meta = read_metadata(export_dir)
    verified = read_json(export_dir / VERIFY)
    name = device_name(report)
    recorded, ignored = {}, {}
    for row in shipped_rows(report):
        fmt = row["format"]
        if meta["formats"].get(fmt, {}).get("sha256") != row["sha256"]:
            ignored[row["file"]] = "not a file of this export (another export, or it was exported again since)"
            continue
        recorded[fmt] = device_record(report, row)
        entry = verified.setdefault(fmt, {})
        entry["devices"] = {**entry.get("devices", {}), name: recorded[fmt]}
    if recorded:
        write_json(export_dir / VERIFY, verified)
    return recorded, ignored


def device_verdicts(verified: dict[str, Any], fmt: str, sha256: str) -> dict[str, dict[str, Any]]:
    """The device verdicts verify.json holds for format `fmt`'s file `sha256` (device name -> record)."""
    devices = verified.get(fmt, {}).get("devices", {})
    return {name: record for name, record in devices.items() if record.get("sha256") == sha256}
