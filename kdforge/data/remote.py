"""WebDataset shards over HTTP(S) or S3, read by range requests: `[data] root = "https://host/photos-shards"` or
`"s3://bucket/photos-shards"`.

    index = scan_remote("https://host/photos-shards")     # index.json: every sample's shard, offset, length, label
    fetch("https://host/photos-shards/train/shard-000000.tar", offset, length)   # one image's bytes

Why range reads of an index rather than streaming whole shards (webdataset's `pipe:curl` URLs): kdforge reads every
sample by position (shuffling, resuming mid-epoch and each process's and worker's share work as for local files,
exactly), and `kdforge data shard` already knows each member's offset when it writes the shard, so it records them
in `index.json` beside the shards (with each shard's sha256). A reader then fetches one small index and exactly the
bytes of the images it trains on, from any server that honors `Range` (nginx, S3 and most object stores over HTTPS,
a CDN). Each process (and each DataLoader worker) keeps one keep-alive connection per server.

Network errors (refused, reset, timed out, a 5xx answer, a short body) are retried `RETRIES` times with exponential
backoff, then raised as one DataError naming the URL; a 4xx answer is not retried. Nothing is written: the index
and the image bytes are held in memory only. Credentials: a bearer token in $KDFORGE_HTTP_TOKEN is sent to every
URL of the dataset (never written into runs/).

S3 (`s3://bucket/prefix`, any S3-compatible store) is read through s3fs (fsspec's S3 file system, the `data` extra)
with the same range reads: credentials and region from botocore's usual places (the AWS_* environment, ~/.aws,
an instance role), another endpoint from $AWS_ENDPOINT_URL (MinIO, Ceph, R2), nothing written into runs/. A
missing key or a refused credential is one DataError at once; other errors are retried like HTTP's.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from kdforge.errors import DataError

INDEX = "index.json"
INDEX_KIND = "kdforge-shards-index"
MAX_INDEX_BYTES = 256 * 1024 * 1024  # about 8 million samples
RETRIES = 4  # tries after the first
BACKOFF_S = 0.25  # the first retry's wait; each next one doubles it
TIMEOUT_S = 30.0
TOKEN_ENV = "KDFORGE_HTTP_TOKEN"

_connections: dict[tuple[str, str, int, int], http.client.HTTPConnection] = {}  # per process (and worker)


_s3: dict[int, Any] = {}  # s3fs file systems, per process (and worker)


def is_url(root: str | os.PathLike) -> bool:
    return str(root).startswith(("http://", "https://", "s3://"))


def _s3_filesystem() -> Any:
    if os.getpid() not in _s3:
        from kdforge.optional import require

        s3fs = require("s3fs")
        _s3[os.getpid()] = s3fs.S3FileSystem(skip_instance_cache=True)  # a forked worker makes its own
    return _s3[os.getpid()]


class _Retry(Exception):
    """A failure worth another try (refused, reset, timed out, a 5xx answer, a short body); its text says what."""


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _with_retries(url: str, attempt: Callable[[], bytes], advice: str) -> bytes:
    """`attempt()`, tried again with exponential backoff while it raises _Retry, RETRIES times; then one
    DataError naming the URL, the last reason and `advice`."""
    why = ""
    for tries in range(RETRIES + 1):
        if tries:
            time.sleep(BACKOFF_S * 2 ** (tries - 1))
        try:
            return attempt()
        except _Retry as exc:
            why = str(exc)
    raise DataError(f"{url}: cannot read it after {RETRIES + 1} tries ({why}); {advice}")


def _fetch_s3(url: str, offset: int | None, length: int | None, limit: int | None) -> bytes:
    """`fetch` for s3:// URLs (s3fs's ranged GETs), with the same retries and errors."""
    key = url.removeprefix("s3://")

    def attempt() -> bytes:
        try:
            fs = _s3_filesystem()
            if offset is not None and length is not None:
                data = fs.cat_file(key, start=offset, end=offset + length)
                if len(data) != length:
                    raise OSError(f"{len(data)} of {length} bytes")
                return data
            if limit is not None and (size := fs.info(key)["size"]) > limit:
                raise DataError(f"{url}: {size:,} bytes, more than the {limit:,} allowed")
            return fs.cat_file(key)
        except (FileNotFoundError, PermissionError) as exc:
            raise DataError(f"{url}: {type(exc).__name__}: {exc}; check the bucket, the key and the credentials "
                            f"(AWS_* environment, ~/.aws)") from None
        except (OSError, ValueError) as exc:  # connection errors, throttling and 5xx after botocore's own retries
            raise _Retry(_why(exc)) from None

    return _with_retries(url, attempt, "check the endpoint and the URL")


def _connection(scheme: str, host: str, port: int) -> http.client.HTTPConnection:
    key = (scheme, host, port, os.getpid())  # a forked DataLoader worker opens its own
    if key not in _connections:
        kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        _connections[key] = kind(host, port, timeout=TIMEOUT_S)
    return _connections[key]


def _drop(scheme: str, host: str, port: int) -> None:
    connection = _connections.pop((scheme, host, port, os.getpid()), None)
    if connection is not None:
        connection.close()


def fetch(url: str, offset: int | None = None, length: int | None = None, limit: int | None = None) -> bytes:
    """The bytes of `url` (`length` bytes at `offset` with a range request), retried on network errors; a body
    longer than `limit` is refused unread."""
    if offset is not None and length == 0:
        return b""
    if url.startswith("s3://"):
        return _fetch_s3(url, offset, length, limit)
    parts = urlsplit(url)
    scheme, host = parts.scheme, parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    headers = {"Connection": "keep-alive"}
    if os.environ.get(TOKEN_ENV):
        headers["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"
    if offset is not None and length is not None:
        headers["Range"] = f"bytes={offset}-{offset + length - 1}"

    def attempt() -> bytes:
        try:
            connection = _connection(scheme, host, port)
            connection.request("GET", path, headers=headers)
            answer = connection.getresponse()
            if answer.status >= 500:
                answer.read()
                raise _Retry(f"HTTP {answer.status} {answer.reason}")
            if answer.status >= 400:
                answer.read()
                raise DataError(f"{url}: HTTP {answer.status} {answer.reason}")
            return _body(url, answer, "Range" in headers, length, limit)
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, a short body
            _drop(scheme, host, port)
            raise _Retry(_why(exc)) from None

    return _with_retries(url, attempt, "check the server and the URL")


def _body(url: str, answer: http.client.HTTPResponse, ranged: bool, length: int | None, limit: int | None) -> bytes:
    declared = answer.getheader("Content-Length")
    if limit is not None and declared is not None and declared.isdigit() and int(declared) > limit:
        answer.close()
        raise DataError(f"{url}: {int(declared):,} bytes, more than the {limit:,} allowed")
    if ranged and answer.status != 206:
        answer.close()
        raise DataError(f"{url}: the server ignored the range request (HTTP {answer.status}, not 206): shards are "
                        f"read by position; serve them from a server that honors Range (nginx, S3, most CDNs)")
    data = answer.read() if limit is None else answer.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise DataError(f"{url}: more than the {limit:,} bytes allowed")
    if ranged and len(data) != length:
        raise http.client.IncompleteRead(data, (length or 0) - len(data))  # retried: a connection cut mid-body
    return data


def read_index(root: str) -> dict[str, Any]:
    """The shards' index at `root` (what `kdforge data shard` writes beside them), checked for its shape."""
    url = f"{root.rstrip('/')}/{INDEX}"
    try:
        index = json.loads(fetch(url, limit=MAX_INDEX_BYTES))
    except (ValueError, RecursionError):
        raise DataError(f"{url}: not JSON (a shards index is written by `kdforge data shard`)") from None
    if not isinstance(index, dict) or index.get("kind") != INDEX_KIND:
        raise DataError(f"{url}: not a kdforge shards index; write one with `kdforge data index SHARDS_FOLDER` "
                        f"(or `kdforge data shard`, which writes it) and serve it beside the shards")
    return index
