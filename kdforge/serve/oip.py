"""The Open Inference Protocol (KServe's v2 protocol, Triton's HTTP/REST API) over the served model, so Triton's and
KServe's clients, a KServe InferenceService and load testers written for Triton talk to `kdforge serve`:

    GET  /v2                              server metadata (name, version, extensions)
    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}                model metadata: inputs, outputs, datatypes, shapes
    GET  /v2/models/{name}/ready
    POST /v2/models/{name}/infer          (also /v2/models/{name}/versions/1/infer)

The model (named after the export's recipe, version "1") takes ONE of two inputs per request:
- `image`, BYTES, shape [N]: encoded images (PNG, JPEG, WebP, ...), decoded by the server's own decoder with its
  bounds (bytes, pixels), as /predict does. In JSON each element is the image's bytes in base64; with the binary
  tensor extension, the raw bytes (each element a 4-byte little-endian length and the bytes, as Triton sends them).
- `pixels`, FP32, shape [N, 3, S, S]: the normalized input itself (the export's mean and std, see /metadata),
  JSON numbers or raw little-endian float32 with the binary extension.
and answers `logits`, FP32 [N, classes]; with the classification extension (`"parameters": {"classification": K}`
on the requested output) BYTES [N, K] of "value:index:label" strings, highest first (Triton's format). N is at most
the server's --max-batch, a request body at most --max-bytes (FP32 batches at 224 are 0.6 MB per image).

Everything here is pure (bytes in, bytes out) so it is tested without a server; `serve/app.py` mounts the routes.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdforge import __version__

VERSION = "1"  # the one version of the model a server holds
IMAGE, PIXELS, LOGITS = "image", "pixels", "logits"
EXTENSIONS = ["classification", "binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"  # the binary tensor extension's header (JSON part's length)


class ProtocolError(Exception):
    """A request the protocol cannot take: 400 with {"error": ...}, as the protocol's error response."""


@dataclass
class InferRequest:
    id: str | None
    input: str  # IMAGE or PIXELS
    images: list[bytes] = field(default_factory=list)  # IMAGE
    pixels: np.ndarray | None = None  # PIXELS: float32 (N, 3, S, S)
    classification: int = 0  # top-K strings instead of logits
    binary_output: bool = False

    @property
    def count(self) -> int:
        return len(self.images) if self.input == IMAGE else len(self.pixels)


def server_metadata() -> dict[str, Any]:
    return {"name": "kdforge", "version": __version__, "extensions": EXTENSIONS}


def model_metadata(name: str, info: dict[str, Any], size: int, num_classes: int) -> dict[str, Any]:
    return {"name": name, "versions": [VERSION], "platform": f"kdforge_{info['format']}",
            "inputs": [{"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
                       {"name": PIXELS, "datatype": "FP32", "shape": [-1, 3, size, size]}],
            "outputs": [{"name": LOGITS, "datatype": "FP32", "shape": [-1, num_classes]}]}


def parse_infer(body: bytes, header_length: str | None, size: int, max_batch: int) -> InferRequest:
    """The infer request in `body` (JSON, or JSON then binary tensors when `header_length` is given), checked:
    one known input, its datatype and shape, at most `max_batch` items, data of exactly the declared size."""
    head, binary = _split(body, header_length)
    try:
        request = json.loads(head)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"the request is not JSON: {str(exc)[:200]}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or len(request["inputs"]) != 1:
        raise ProtocolError(f"send exactly one input: {IMAGE!r} (BYTES, encoded images) or {PIXELS!r} (FP32 "
                            f"[N, 3, {size}, {size}])")
    entry = request["inputs"][0]
    if not isinstance(entry, dict) or entry.get("name") not in (IMAGE, PIXELS):
        raise ProtocolError(f"unknown input {_name(entry)}: the model takes {IMAGE!r} or {PIXELS!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"input {entry['name']!r}: shape must be a list of whole numbers, got {shape!r}")
    data = _data(entry, binary)
    parsed = InferRequest(id=_id(request), input=entry["name"])
    if entry["name"] == IMAGE:
        _expect(entry, "BYTES", len(shape) in (1, 2) and (len(shape) == 1 or shape[1] == 1), "[N] or [N, 1]")
        parsed.images = _bytes_elements(data, int(np.prod(shape)))
    else:
        _expect(entry, "FP32", len(shape) == 4 and shape[1:] == [3, size, size], f"[N, 3, {size}, {size}]")
        parsed.pixels = _floats(data, shape)
    if not 1 <= parsed.count <= max_batch:
        raise ProtocolError(f"{parsed.count} items in one request: send 1 to {max_batch} (--max-batch)")
    parsed.classification, parsed.binary_output = _outputs(request)
    return parsed


def infer_response(name: str, request: InferRequest, logits: np.ndarray,
                   labels: list[str]) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers: `logits` (or the top-K strings), in JSON or, when the request
    asked for binary outputs, JSON then the raw tensor."""
    if request.classification:
        k = min(request.classification, logits.shape[1])
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # equal logits: the lower index first, as /predict
        strings = [[f"{logits[row, i]:f}:{i}:{labels[i]}".encode() for i in top[row]] for row in range(len(top))]
        output = {"name": LOGITS, "datatype": "BYTES", "shape": [len(top), k]}
        raw = b"".join(struct.pack("<I", len(s)) + s for row in strings for s in row)
        values: list = [s.decode() for row in strings for s in row]
    else:
        logits = np.ascontiguousarray(logits, dtype="<f4")
        output = {"name": LOGITS, "datatype": "FP32", "shape": list(logits.shape)}
        raw, values = logits.tobytes(), logits.ravel().tolist()
    response: dict[str, Any] = {"model_name": name, "model_version": VERSION, "outputs": [output]}
    if request.id is not None:
        response["id"] = request.id
    if not request.binary_output:
        output["data"] = values
        return json.dumps(response).encode(), {}
    output["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps(response).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise ProtocolError(f"Inference-Header-Content-Length {header_length[:20]!r} does not fit a body of "
                            f"{len(body)} bytes")
    return body[:int(header_length)], body[int(header_length):]


def _name(entry: Any) -> str:
    return repr(str(entry.get("name"))[:64]) if isinstance(entry, dict) else "(not an object)"


def _id(request: dict) -> str | None:
    value = request.get("id")
    return value[:256] if isinstance(value, str) else None


def _expect(entry: dict, datatype: str, shape_ok: bool, shape: str) -> None:
    if entry.get("datatype") != datatype:
        raise ProtocolError(f"input {entry['name']!r} is {datatype}, got {str(entry.get('datatype'))[:20]!r}")
    if not shape_ok:
        raise ProtocolError(f"input {entry['name']!r} has shape {shape}, got {entry['shape']}")


def _data(entry: dict, binary: bytes) -> bytes | list:
    """The input's data: its binary bytes (the binary extension) or its JSON `data` list."""
    parameters = entry.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if type(size) is not int or size != len(binary):
            raise ProtocolError(f"binary_data_size {str(size)[:20]} does not match the {len(binary)} bytes after "
                                f"the JSON header")
        return binary
    if binary:
        raise ProtocolError("binary data after the JSON header, but no input declares binary_data_size")
    if not isinstance(entry.get("data"), list):
        raise ProtocolError(f"input {entry['name']!r} has no data (a JSON list, or binary_data_size)")
    return entry["data"]


def _bytes_elements(data: bytes | list, count: int) -> list[bytes]:
    if isinstance(data, list):  # JSON: each image in base64
        if len(data) != count or not all(isinstance(item, str) for item in data):
            raise ProtocolError(f"input {IMAGE!r}: {count} base64 strings expected, got {len(data)} items")
        try:
            return [base64.b64decode(item, validate=True) for item in data]
        except (binascii.Error, ValueError):
            raise ProtocolError(f"input {IMAGE!r}: an element is not base64 (in JSON, send each image's bytes in "
                                f"base64; or use the binary tensor extension)") from None
    elements, offset = [], 0
    while offset < len(data):  # Triton's BYTES serialization: a 4-byte little-endian length, then the bytes
        if offset + 4 > len(data):
            raise ProtocolError(f"input {IMAGE!r}: binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", data, offset)
        if offset + 4 + length > len(data):
            raise ProtocolError(f"input {IMAGE!r}: an element of {length} bytes runs past the binary data")
        elements.append(bytes(data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    if len(elements) != count:
        raise ProtocolError(f"input {IMAGE!r}: shape says {count} elements, the binary data holds {len(elements)}")
    return elements


def _floats(data: bytes | list, shape: list[int]) -> np.ndarray:
    count = int(np.prod(shape))
    if isinstance(data, (bytes, bytearray)):
        if len(data) != 4 * count:
            raise ProtocolError(f"input {PIXELS!r}: shape {shape} needs {4 * count} bytes of FP32, got {len(data)}")
        return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
    try:
        array = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError, RecursionError):
        raise ProtocolError(f"input {PIXELS!r}: data must be numbers") from None
    if array.size != count:
        raise ProtocolError(f"input {PIXELS!r}: shape {shape} needs {count} numbers, got {array.size}")
    return array.reshape(shape)


def _outputs(request: dict) -> tuple[int, bool]:
    """(classification K or 0, binary output) from the requested outputs and the request's parameters."""
    parameters = request.get("parameters") if isinstance(request.get("parameters"), dict) else {}
    binary = parameters.get("binary_data_output") is True
    outputs = request.get("outputs")
    if outputs is None:
        return 0, binary
    if not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict) \
            or outputs[0].get("name") != LOGITS:
        raise ProtocolError(f"the model has one output, {LOGITS!r}; got {str(outputs)[:100]}")
    wanted = outputs[0].get("parameters") or {}
    k = wanted.get("classification", 0) if isinstance(wanted, dict) else 0
    if type(k) is not int or k < 0:
        raise ProtocolError(f"classification must be a whole number of classes, got {str(k)[:20]}")
    return k, wanted.get("binary_data", binary) is True
