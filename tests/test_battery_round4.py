"""The hostile battery, round 4: what round 3 added (shards, the decode cache, locks, the server's limits, the
student search's profiles, recipe overrides), tried as a hostile user would. Each case asserts the documented
outcome: read exactly or refused with ONE `error:` line naming the file, member, value or option; no hang; memory
bounded; nothing earlier lost. Round 2/3 cases stay in tests/test_battery.py."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.data.imagefolder import scan_imagefolder
from kdforge.data.shards import PLAN, scan_shards, write_shards
from kdforge.errors import DataError

from .test_battery import one_error_line, write_png

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def within(seconds: float, call):
    """call() in a thread: its result, or a failed test (not a hung suite) when it does not return in time."""
    done: list = []
    worker = threading.Thread(target=lambda: done.append(_outcome(call)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert done, f"did not finish within {seconds} s (blocked?)"
    if isinstance(done[0], BaseException):
        raise done[0]
    return done[0]


def _outcome(call):
    try:
        return call()
    except BaseException as exc:  # handed to the test's thread
        return exc


# ----------------------------------------------------------------------------------------------------------
# shards read exactly as written, or refused with the member named


def png_bytes(color=(200, 30, 30)) -> bytes:
    from PIL import Image

    stream = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(stream, "PNG")
    return stream.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def shard_dataset(root: Path, train: list[tuple[str, bytes]], classes: str = "a\nb\n") -> Path:
    """A WebDataset folder whose train shard holds `train` (the test shard: two ordinary samples)."""
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(classes)
    write_tar(root / "train" / "shard-000000.tar", train)
    write_tar(root / "test" / "shard-000000.tar", [("t0.png", png_bytes()), ("t0.cls", b"0"),
                                                   ("t1.png", png_bytes()), ("t1.cls", b"1")])
    return root


def samples(prefix: str, count: int = 4) -> list[tuple[str, bytes]]:
    members = []
    for i in range(count):
        members += [(f"{prefix}{i:08d}.png", png_bytes()), (f"{prefix}{i:08d}.cls", str(i % 2).encode())]
    return members


@pytest.mark.parametrize("prefix", ["./", "dir.v2/", "../", "a/b.c/./"], ids=["gnu-tar-dot-slash", "dotted-folder",
                                                                         "dot-dot", "nested-dots"])
def test_every_sample_of_a_shard_is_read_whatever_its_member_path(prefix, tmp_path):
    index = scan_shards(shard_dataset(tmp_path / "ds", samples(prefix)))
    assert len(index.splits["train"].refs) == 4 and index.splits["train"].labels == [0, 1, 0, 1]


SHARD_CASES = {
    "label-without-image": (samples("") + [("00000009.cls", b"1")], "a .cls label but no image"),
    "image-without-label": (samples("") + [("00000009.png", png_bytes())], "an image but no .cls label"),
    "superscript-digit-label": ([("x.png", png_bytes()), ("x.cls", "²".encode())], "not a class number"),
    "huge-label": ([("x.png", png_bytes()), ("x.cls", b"1" * 100_000)], "100,000 bytes"),
    "label-out-of-range": ([("x.png", png_bytes()), ("x.cls", b"7")], "below 2"),
    "empty-shard": ([], "holds no samples"),
    "two-images-one-key": ([("x.png", png_bytes()), ("x.jpg", png_bytes()), ("x.cls", b"0")], "two images"),
}


@pytest.mark.parametrize("case", list(SHARD_CASES), ids=list(SHARD_CASES))
def test_a_shard_that_cannot_be_read_exactly_is_refused_naming_it(case, tmp_path):
    members, words = SHARD_CASES[case]
    root = shard_dataset(tmp_path / "ds", members)
    with pytest.raises(DataError, match=words) as caught:
        scan_shards(root)
    assert "shard-000000.tar" in str(caught.value)


def test_a_link_member_in_a_shard_is_refused(tmp_path):
    root = shard_dataset(tmp_path / "ds", samples(""))
    with tarfile.open(root / "train" / "shard-000000.tar", "a") as tar:
        link = tarfile.TarInfo("00000009.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        tar.addfile(tarfile.TarInfo("00000009.cls"), io.BytesIO(b""))
    with pytest.raises(DataError, match="'00000009.png' is a link"):
        scan_shards(root)


def test_duplicate_class_names_are_refused(tmp_path):
    with pytest.raises(DataError, match="lists class 'a' twice"):
        scan_shards(shard_dataset(tmp_path / "ds", samples(""), classes="a\nb\na\n"))


def test_a_fifo_in_place_of_a_shard_is_refused_not_waited_on(tmp_path):
    root = shard_dataset(tmp_path / "ds", samples(""))
    os.mkfifo(root / "train" / "shard-000001.tar")
    with pytest.raises(DataError, match="not a regular file"):
        within(60, lambda: scan_shards(root))


@pytest.fixture
def folder(tmp_path) -> Path:
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            for i in range(2):
                write_png(tmp_path / "photos" / split / name / f"{i}.png")
    return tmp_path / "photos"


@pytest.mark.parametrize("kind", ["fifo", "link-to-dev-zero"])
def test_a_fifo_or_device_among_the_images_is_refused_by_type_before_it_is_opened(kind, folder, tmp_path):
    odd = folder / "train" / "cat" / "odd.jpg"
    os.mkfifo(odd) if kind == "fifo" else odd.symlink_to("/dev/zero")
    result = within(60, lambda: invoke("data", "shard", folder, "--out", tmp_path / "shards"))
    one_error_line(result, 1, "odd.jpg", "a FIFO" if kind == "fifo" else "a device", "not an image file")
    assert not (tmp_path / "shards").exists()
    with pytest.raises(DataError, match="not an image file"):  # training lists the folder the same way
        within(60, lambda: scan_imagefolder(folder))


def test_data_shard_does_not_take_a_foreign_shard_for_its_own(folder, tmp_path):
    out = tmp_path / "shards"
    write_tar(out / "train" / "shard-000000.tar", samples(""))
    foreign = (out / "train" / "shard-000000.tar").read_bytes()
    result = invoke("data", "shard", folder, "--out", out)
    one_error_line(result, 1, "train/shard-000000.tar", "kdforge did not write")
    assert (out / "train" / "shard-000000.tar").read_bytes() == foreign and not (out / PLAN).exists()


def test_data_shard_writes_again_a_shard_changed_since_it_wrote_it(folder, tmp_path):
    out = tmp_path / "shards"
    write_shards(folder, out, shard_size=2)
    shard = out / "train" / "shard-000001.tar"
    original = shard.read_bytes()
    damaged = bytearray(original)
    damaged[600] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    again = write_shards(folder, out, shard_size=2)
    assert shard.read_bytes() == original and (again.written, again.kept) == (1, 3)
    assert json.loads((out / PLAN).read_text())["written"]["train/shard-000001.tar"]


# ----------------------------------------------------------------------------------------------------------
# the student search's budgets and device profiles, validated as data


def search_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "search.toml"
    recipe.write_text('[data]\ndataset = "synthetic"\n[student]\nmodel = "resnet18"\n')
    return recipe


@pytest.mark.parametrize("budget", ["inf", "nan", "-3", "0"])
def test_a_budget_that_is_not_a_finite_positive_number_is_refused(budget, tmp_path):
    result = invoke("students", search_recipe(tmp_path), "--budget-ms", budget, "--runs-dir", tmp_path / "runs")
    one_error_line(result, 2, "budget_ms")
    assert not (tmp_path / "runs").exists()


def profile_row(**change) -> dict:
    return {"format": "onnx", "model": "resnet18", "sha256": "ab" * 32, "runtime": "onnxruntime",
            "latency_p50_ms": 4.0, "latency_p95_ms": 5.0, **change}


PROFILE_CASES = {
    "rows-not-a-list": ({"rows": {"a": 1}, "settings": {"batch": 1}}, "rows"),
    "row-not-an-object": ({"rows": [3], "settings": {"batch": 1}}, "rows.0"),
    "row-without-timing": ({"rows": [profile_row(latency_p50_ms=None)], "settings": {"batch": 1}}, "latency_p50_ms"),
    "negative-latency": ({"rows": [profile_row(latency_p50_ms=-1.0)], "settings": {"batch": 1}}, "greater than 0"),
    "nan-latency": ({"rows": [profile_row(latency_p95_ms=float("nan"))], "settings": {"batch": 1}}, "finite"),
    "memory-a-string": ({"rows": [profile_row(memory_mb="lots")], "settings": {"batch": 1}}, "memory_mb"),
    "settings-a-list": ({"rows": [profile_row()], "settings": [1]}, "settings"),
}


@pytest.mark.parametrize("case", list(PROFILE_CASES), ids=list(PROFILE_CASES))
def test_a_device_profile_of_the_wrong_shape_is_one_error_naming_the_value(case, tmp_path):
    from kdforge.errors import KdforgeError
    from kdforge.recipe import SearchConfig
    from kdforge.students import read_profile

    profile, words = PROFILE_CASES[case]
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(profile))
    with pytest.raises(KdforgeError, match="not a device profile") as caught:
        read_profile(path, SearchConfig(budget_ms=10))
    assert words in str(caught.value) and str(path) in str(caught.value)


def test_a_huge_device_profile_is_refused_unread(tmp_path, monkeypatch):
    from kdforge import fileio
    from kdforge.errors import KdforgeError
    from kdforge.recipe import SearchConfig
    from kdforge.students import read_profile

    path = tmp_path / "latency.json"
    with open(path, "wb") as f:
        f.truncate(300 << 20)  # sparse: 300 MB that takes no disk
    monkeypatch.setattr(fileio, "read_json", lambda *_: pytest.fail("read"))
    with pytest.raises(KdforgeError, match="314,572,800 bytes is not a device profile"):
        read_profile(path, SearchConfig(budget_ms=10))


def test_a_device_profile_with_good_rows_still_reads(tmp_path):
    from kdforge.recipe import SearchConfig
    from kdforge.students import read_profile

    path = tmp_path / "device-report.json"
    failed = {"format": "fp16", "sha256": "cd" * 32, "passed": False, "failures": ["it does not run here"]}
    path.write_text(json.dumps({"rows": [profile_row(memory_mb=12.5), failed], "settings": {"batch": 1},
                                "device": {"cpu": "Cortex-A76"}}))
    profile = read_profile(path, SearchConfig(budget_ms=10))
    assert profile["machine"]["cpu"] == "Cortex-A76" and profile["rows"][0]["latency_p50_ms"] == 4.0
    assert profile["rows"][1]["passed"] is False


# ----------------------------------------------------------------------------------------------------------
# parsing what a user types: bounded in depth, nothing silently dropped, keys shown as spelt


def quick_recipe(tmp_path: Path, extra: str = "") -> Path:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\ndataset = "synthetic"\n[student]\nmodel = "resnet18"\n' + extra)
    return recipe


PARSE_CASES = {
    "nested-arrays-in-file": (lambda t: [quick_recipe(t, "x = " + "[" * 5000 + "]" * 5000 + "\n")], "nested deeper"),
    "nested-tables-in-file": (lambda t: [quick_recipe(t, "x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n")],
                              "nested deeper"),
    "deep-key-in-file": (lambda t: [quick_recipe(t, "[student.model_kwargs]\n" + ".".join(["a"] * 10_000) + " = 1\n")],
                         "levels deep"),
    "nested-arrays-in-set": (lambda t: [quick_recipe(t), "--set", "train.lr=" + "[" * 5000 + "]" * 5000],
                             "nested deeper"),
    "deep-key-in-set": (lambda t: [quick_recipe(t), "--set", "student.model_kwargs." + ".".join(["a"] * 10_000) + "=1"],
                        "levels"),
    "set-with-more-after-its-value": (lambda t: [quick_recipe(t), "--set", 'name="x"\n[train]\nlr=1'],
                                      "one value per --set"),
    "zero-width-space-in-key": (lambda t: [quick_recipe(t), "--set", "tr\u200bain.lr=1"], "tr\\u200bain"),
}


@pytest.mark.parametrize("case", list(PARSE_CASES), ids=list(PARSE_CASES))
def test_what_a_user_types_is_parsed_within_bounds_or_refused_in_one_line(case, tmp_path):
    make, words = PARSE_CASES[case]
    result = invoke("recipe", "check", *make(tmp_path))
    one_error_line(result, 2, words)
    assert len(result.stderr) < 3000, len(result.stderr)


def test_recipe_check_shortens_a_huge_invalid_value(tmp_path):
    result = invoke("recipe", "check", quick_recipe(tmp_path), "--set", "train.lr=" + "x" * 10_000_000)
    one_error_line(result, 2, "train.lr", "more characters")
    assert len(result.stderr) < 5000, len(result.stderr)


def test_a_multiline_string_is_still_one_value(tmp_path):
    result = invoke("recipe", "check", quick_recipe(tmp_path), "--set", 'name="""x"""')
    assert result.exit_code == 0, result.output


def test_mixup_with_an_odd_share_per_process_is_refused_before_any_process_starts(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "call", lambda *_: pytest.fail("torchrun was started"))
    recipe = quick_recipe(tmp_path)
    result = invoke("distill", recipe, "--nproc", "2", "--runs-dir", tmp_path / "runs", "--set", "train.batch_size=6",
                    "--set", "data.augment.mixup=0.8")
    one_error_line(result, 2, "3 each, an odd number", "batch_size that gives an even share (e.g. 8)")
    assert not (tmp_path / "runs").exists()


OPTION_CASES = {
    "port-out-of-range": (["serve", "exports/x", "--port", "70000"], "'--port'", "65535"),
    "unknown-option": (["distill", "r.toml", "--bogus", "1"], "--bogus", "kdforge distill --help"),
    "missing-argument": (["recipe", "check"], "Missing argument", "kdforge recipe check --help"),
    "misspelt-command": (["recipe", "chek"], "'chek'", "Did you mean 'check'"),
    "not-a-number": (["students", "r.toml", "--budget-ms", "fast"], "'--budget-ms'", "valid number"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES), ids=list(OPTION_CASES))
def test_a_bad_option_is_one_error_line_like_every_other_refusal(case):
    args, *words = OPTION_CASES[case]
    result = invoke(*args)
    one_error_line(result, 2, *words)
    assert "╭" not in result.output and "Usage:" not in result.output


def test_kdforge_alone_still_prints_its_help():
    result = invoke()
    assert "Usage" in result.output and "error:" not in result.output


# ----------------------------------------------------------------------------------------------------------
# locks in a folder only the user can write


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KDFORGE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_lock_file_planted_as_a_link_cannot_make_kdforge_overwrite_the_victims_file(cache, tmp_path):
    import hashlib

    from kdforge.errors import KdforgeError
    from kdforge.fileio import folder_lock, lock_folder

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "runs" / "r"
    key = hashlib.sha256(str(run.resolve()).encode()).hexdigest()[:24]
    (lock_folder() / f"{key}.lock").symlink_to(victim)
    with pytest.raises(KdforgeError, match="a link was planted there"), folder_lock(run, "run"):
        pass
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("plant", ["link", "open-to-others"])
def test_a_lock_folder_someone_else_could_write_is_refused_not_used(plant, cache, tmp_path):
    from kdforge.errors import KdforgeError
    from kdforge.fileio import folder_lock

    elsewhere = tmp_path / "planted"
    elsewhere.mkdir(mode=0o777)
    cache.mkdir()
    if plant == "link":
        (cache / "locks").symlink_to(elsewhere)
    else:
        (cache / "locks").mkdir()
        os.chmod(cache / "locks", 0o777)
    with pytest.raises(KdforgeError, match="a link" if plant == "link" else "writable by others"), \
            folder_lock(tmp_path / "runs" / "r", "run"):
        pass
    assert not list(elsewhere.iterdir())


def test_the_lock_does_not_move_when_the_temporary_directory_is_unusable(cache, tmp_path):
    import subprocess
    import sys

    from kdforge.errors import KdforgeError
    from kdforge.fileio import folder_lock

    run = tmp_path / "runs" / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kdforge.fileio import folder_lock\n"
         "with folder_lock(sys.argv[1], 'run'):\n    print('held', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path / "full-or-missing")})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(KdforgeError, match="in use by another kdforge process"), folder_lock(run, "run"):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert oct(os.stat(cache / "locks").st_mode & 0o777) == "0o700"


# ----------------------------------------------------------------------------------------------------------
# a server no slow or idle client can lock out


def get(port: int, path: str = "/healthz") -> int:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.slow
def test_the_connection_limit_counts_what_it_says(served_export):
    from .test_serve import start_server

    server, port = start_server(served_export[0], "--max-connections", "1")
    try:
        assert [get(port) for _ in range(3)] == [200, 200, 200]  # 1 served 1 (it served 0: 503 to everything)
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.slow
def test_idle_and_trickling_clients_cannot_lock_the_server_out(served_export):
    import socket
    import time

    from .test_serve import start_server

    server, port = start_server(served_export[0], "--max-connections", "8", "--header-timeout", "2")
    held = []
    try:
        for _ in range(40):  # idle keep-alive clients: one request each, then silence
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(4096)
            held.append(sock)
        trickling = []
        for _ in range(8):  # clients that send a header line now and then, never finishing
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            trickling.append(sock)
        answered = []
        for _ in range(20):
            for sock in trickling:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass
            answered.append(get(port))
        assert answered == [200] * 20, answered
        time.sleep(3)  # past the header timeout: the tricklers' connections were closed by the server
        closed = 0
        for sock in trickling:
            sock.settimeout(2)
            try:
                closed += sock.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(trickling)
    finally:
        for sock in held:
            sock.close()
        server.terminate()
        server.wait(30)


# ----------------------------------------------------------------------------------------------------------
# a decode cache that cannot serve damaged pixels


def test_flipped_bytes_in_the_decode_cache_are_refused_not_trained_on(folder, cache):
    import torch

    from kdforge.data.imagefolder import cache_root, decode_cached

    refs = scan_imagefolder(folder).splits["train"].refs
    clean = decode_cached(refs, 16, workers=0)[torch.arange(len(refs))]
    path = next(cache_root().glob("*.npy"))
    data = bytearray(path.read_bytes())
    data[len(data) - 4 * len(refs) - 10] ^= 0x01  # one bit of the last image's pixels
    path.write_bytes(bytes(data))
    again = decode_cached(refs, 16, workers=0)
    assert torch.equal(again[torch.arange(3)], clean[:3])  # the rows that are intact still read
    with pytest.raises(DataError, match="changed or damaged"):
        again[torch.arange(len(refs))]


def test_a_file_name_that_is_not_utf8_decodes_into_the_cache(folder, cache):
    import torch

    from kdforge.data.imagefolder import decode_cached

    odd = os.fsencode(folder / "train" / "cat") + b"/caf\xe9.png"
    os.rename(folder / "train" / "cat" / "0.png", odd)
    refs = scan_imagefolder(folder).splits["train"].refs
    assert len(decode_cached(refs, 16, workers=0)[torch.arange(len(refs))]) == 4


# ----------------------------------------------------------------------------------------------------------
# certificates out of their dates


def certificate(folder: Path, starts, ends) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 valid from `starts` to `ends` and its key (cryptography's builder:
    openssl's req cannot date a certificate in the past)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(starts).not_valid_after(ends)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{starts:%Y%m%d}.crt", folder / f"{starts:%Y%m%d}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_an_expired_or_not_yet_valid_certificate_is_refused_before_the_model_loads(served_export, tmp_path):
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    expired = certificate(tmp_path, now - 30 * day, now - day)
    early = certificate(tmp_path, now + day, now + 30 * day)
    for (cert, key), words in ((expired, "expired on"), (early, "is not valid before")):
        done = invoke("serve", served_export[0], "--port", "1", "--ssl-certfile", cert, "--ssl-keyfile", key)
        one_error_line(done, 1, words, cert.name)


def test_a_certificate_about_to_expire_is_named_at_start_but_served(tmp_path, capsys):
    import datetime

    from kdforge.serve.__main__ import check_tls

    now = datetime.datetime.now(datetime.timezone.utc)
    cert, key = certificate(tmp_path, now - datetime.timedelta(days=80), now + datetime.timedelta(days=3))
    check_tls(cert, key)  # accepted
    assert "expires on" in capsys.readouterr().err
    cert, key = certificate(tmp_path, now - datetime.timedelta(days=1), now + datetime.timedelta(days=90))
    check_tls(cert, key)
    assert capsys.readouterr().err == ""
