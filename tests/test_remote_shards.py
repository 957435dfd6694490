"""WebDataset shards served over HTTP by nginx (a real server honoring Range; .ci/run installs Debian's) and read
by range requests through index.json: the same images and labels as the local shards, streamed by workers or
through the decode cache; a connection cut mid-image is retried; a dead server or a missing index is one error."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from urllib.parse import urlsplit

import pytest
import torch

from kdforge.data import load_dataset, remote
from kdforge.data.shards import scan_shards
from kdforge.errors import DataError

from .test_serve import wait_for_port
from .test_streaming import PHOTOS, multiset, photo_recipe, photos  # noqa: F401 - the photos fixture

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


served_logs: dict[str, object] = {}


@pytest.fixture(scope="module")
def served(photos, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """nginx serving the photos' folder on 127.0.0.1: the shards' URL."""
    if not os.access(NGINX, os.X_OK):
        pytest.skip("nginx is not installed (.ci/run installs Debian's)")
    work, port = tmp_path_factory.mktemp("nginx"), free_port()
    temp = "".join(f"{kind}_temp_path {work}/{kind};\n" for kind in
                   ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (work / "nginx.conf").write_text(
        f"daemon off;\npid {work}/nginx.pid;\nerror_log {work}/error.log;\nworker_processes 1;\n"
        + ("user root;\n" if os.geteuid() == 0 else "")  # the workers read pytest's 0700 folders
        + "events {}\n"
        f"http {{\n log_format ranges '$uri $http_range';\n access_log {work}/access.log ranges;\n"
        f" {temp} types {{ application/json json; application/x-tar tar; }}\n"
        f" server {{ listen 127.0.0.1:{port}; root {photos}; location / {{ }} }}\n}}\n")
    server = subprocess.Popen([NGINX, "-c", str(work / "nginx.conf"), "-p", str(work)], stderr=subprocess.PIPE)
    wait_for_port(port, 5.0)
    served_url = f"http://127.0.0.1:{port}/shards"
    served_logs[served_url] = work / "access.log"  # what each range request asked for, one line each
    yield served_url
    server.terminate()
    server.wait(10)


def test_http_shards_hold_exactly_the_local_shards_samples(photos, served):  # noqa: F811
    local, over_http = scan_shards(photos / "shards"), scan_shards(served)
    assert over_http.classes == local.classes
    for split in ("train", "test"):
        mine, theirs = local.splits[split], over_http.splits[split]
        assert theirs.labels == mine.labels
        assert [ref.read() for ref in theirs.refs] == [ref.read() for ref in mine.refs]  # byte for byte, in order
        assert all(ref.path.startswith(served) and ref.version for ref in theirs.refs)


@pytest.mark.parametrize("in_memory", ["false", "true"])
def test_a_recipe_reads_http_shards_as_it_reads_local_ones(photos, served, tmp_path, in_memory):  # noqa: F811
    """Streamed by 2 DataLoader workers (each its own connection), or decoded once into the decode cache (keyed by
    each shard's sha256): the same (image, label) multiset per split as the local shards."""
    body = f"in_memory = {in_memory}\n"
    local = load_dataset(photo_recipe(tmp_path, photos / "shards", "webdataset", body).data, seed=0)
    over_http = load_dataset(photo_recipe(tmp_path, served, "webdataset", body, name="remote").data, seed=0)
    assert over_http.streamed == (in_memory == "false")
    for split in ("train", "val", "test"):
        a, b = getattr(local, split), getattr(over_http, split)
        everything = torch.arange(len(a))
        assert multiset(a.images[everything], a.labels) == multiset(b.images[everything], b.labels)
    if in_memory == "false":  # training views: a pure function of (seed, epoch, image), wherever the bytes are
        idx = torch.tensor([3, 0, 11])
        assert torch.equal(local.train.images.views(idx, 5, 1), over_http.train.images.views(idx, 5, 1))


def test_two_processes_with_two_workers_each_read_disjoint_shares_over_http(photos, served, tmp_path):  # noqa: F811
    """Ranks 0 and 1 of a 2-process run, each streaming its half of every global batch through 2 DataLoader
    workers (forked, each its own connection): nginx's log shows each image's range requested by one process
    only, and together exactly the epoch's images."""
    from kdforge.train.loop import BatchSource

    log = served_logs[served]
    recipe = photo_recipe(tmp_path, served, "webdataset", "in_memory = false\n", name="shares")
    data = load_dataset(recipe.data, recipe.seed)
    assert data.train.images.workers == 2
    requested: dict[int, list[str]] = {}
    epoch = []
    for rank in (0, 1):
        before = len(log.read_text().splitlines())
        source, mine = BatchSource(recipe.data.augment, recipe.seed), slice(rank, None, 2)
        for index in range(5):
            batch = source.batch_indices(len(data.train), 8, 0, index)
            epoch += batch.tolist() if rank == 0 else []
            source.images(data.train, batch, mine, batch[mine], index, 0, index, 5 - index)
        source.close()
        time.sleep(0.2)  # nginx writes its log line after the response
        requested[rank] = [line for line in log.read_text().splitlines()[before:] if ".tar bytes=" in line]
    assert len(requested[0]) == len(requested[1]) == 20  # 4 of each batch of 8, 5 batches
    assert not set(requested[0]) & set(requested[1])
    refs = [data.train.images.base.refs[int(data.train.images.index[i])] for i in epoch]
    expected = {f"{urlsplit(ref.path).path} bytes={ref.offset}-{ref.offset + ref.length - 1}" for ref in refs}
    assert set(requested[0]) | set(requested[1]) == expected


def cutting_proxy(target_port: int, cuts: int) -> tuple[int, list[int]]:
    """A TCP proxy to nginx that closes each of its first `cuts` connections after forwarding the response's first
    bytes (a connection dropped mid-image); the list counts connections."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    seen: list[int] = []

    def pipe(client: socket.socket, number: int) -> None:
        upstream = socket.create_connection(("127.0.0.1", target_port))
        with client, upstream:
            while True:
                request = client.recv(65536)
                if not request:
                    return
                upstream.sendall(request)
                answer = upstream.recv(65536)
                if number <= cuts:
                    client.sendall(answer[: answer.index(b"\r\n\r\n") + 10])  # headers and 6 bytes of the body
                    return
                client.sendall(answer)

    def accept() -> None:
        while True:
            client, _ = listener.accept()
            seen.append(len(seen) + 1)
            threading.Thread(target=pipe, args=(client, len(seen)), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1], seen


def test_a_connection_cut_mid_image_is_retried_and_a_dead_server_is_one_error(photos, served, monkeypatch):  # noqa: F811
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    ref = scan_shards(served).splits["train"].refs[4]
    expected = ref.read()
    assert len(expected) > 64  # the cut leaves most of the image unsent
    port = int(served.rsplit(":", 1)[1].split("/")[0])
    proxy, seen = cutting_proxy(port, cuts=2)
    url = ref.path.replace(f":{port}/", f":{proxy}/")
    assert remote.fetch(url, ref.offset, ref.length) == expected  # after two cut connections
    assert len(seen) == 3

    dead = f"http://127.0.0.1:{free_port()}/shards"
    with pytest.raises(DataError, match=rf"{dead}/index.json: cannot read it after {remote.RETRIES + 1} tries"):
        scan_shards(dead)
    with pytest.raises(DataError, match="HTTP 404"):
        scan_shards(served.replace("/shards", "/folder"))  # an ImageFolder has no index.json


@pytest.fixture(scope="module")
def in_s3(photos, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """The photos' shards uploaded to a bucket of moto's S3 server on 127.0.0.1, reached the way users reach
    MinIO or R2 ($AWS_ENDPOINT_URL, credentials in the AWS_* environment): the shards' s3:// URL. Moto emulates S3's
    API (a mock, not AWS S3 or MinIO): these tests show kdforge's S3 reading against S3's protocol, not a store."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is part of the dev install")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    environment = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "kdforge-test",
                   "AWS_SECRET_ACCESS_KEY": "kdforge-test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    client = boto3.client("s3")
    client.create_bucket(Bucket="photos")
    for path in (photos / "shards").rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "photos", f"shards/{path.relative_to(photos / 'shards').as_posix()}")
    yield "s3://photos/shards"
    server.stop()
    remote._s3.clear()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def test_s3_shards_hold_exactly_the_local_shards_samples_and_stream_through_workers(photos, in_s3, tmp_path):  # noqa: F811
    local, in_bucket = scan_shards(photos / "shards"), scan_shards(in_s3)
    assert in_bucket.classes == local.classes
    for split in ("train", "test"):
        assert in_bucket.splits[split].labels == local.splits[split].labels
        assert [ref.read() for ref in in_bucket.splits[split].refs] == [ref.read() for ref in local.splits[split].refs]
    body = "in_memory = false\n"
    streamed = load_dataset(photo_recipe(tmp_path, in_s3, "webdataset", body, name="s3").data, seed=0)
    reference = load_dataset(photo_recipe(tmp_path, photos / "shards", "webdataset", body).data, seed=0)
    assert streamed.streamed and streamed.train.images.workers == 2  # forked workers, each its own S3 client
    for split in ("train", "test"):
        a, b = getattr(reference, split), getattr(streamed, split)
        everything = torch.arange(len(a))
        assert multiset(a.images[everything], a.labels) == multiset(b.images[everything], b.labels)


def test_a_missing_s3_key_is_one_error(in_s3, monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    with pytest.raises(DataError, match=r"s3://photos/elsewhere/index.json: FileNotFoundError.*credentials"):
        scan_shards("s3://photos/elsewhere")
