"""The Open Inference Protocol (KServe v2 / Triton HTTP) and the Prometheus metrics of `kdforge serve`: the protocol's
parsing and encoding on their own (fast), then Triton's own client against a running server, each answer equal to
/predict's, and /metrics read with prometheus-client's parser."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest

from kdforge.serve import oip

SIZE = 8


def request(inputs, outputs=None, parameters=None) -> bytes:
    body = {"inputs": inputs}
    if outputs is not None:
        body["outputs"] = outputs
    if parameters is not None:
        body["parameters"] = parameters
    return json.dumps(body).encode()


def test_a_json_fp32_request_and_a_binary_bytes_request_are_read_exactly():
    pixels = np.arange(2 * 3 * SIZE * SIZE, dtype=np.float32).reshape(2, 3, SIZE, SIZE) / 7
    parsed = oip.parse_infer(request([{"name": "pixels", "datatype": "FP32", "shape": [2, 3, SIZE, SIZE],
                                       "data": pixels.ravel().tolist()}]), None, SIZE, 4)
    assert parsed.input == "pixels" and np.array_equal(parsed.pixels, pixels)

    images = [b"\x89PNG one", b"", b"three bytes and more"]
    binary = b"".join(struct.pack("<I", len(i)) + i for i in images)  # Triton's BYTES serialization
    head = request([{"name": "image", "datatype": "BYTES", "shape": [3],
                     "parameters": {"binary_data_size": len(binary)}}],
                   [{"name": "logits", "parameters": {"binary_data": True, "classification": 2}}])
    parsed = oip.parse_infer(head + binary, str(len(head)), SIZE, 4)
    assert parsed.images == images and parsed.classification == 2 and parsed.binary_output

    as_json = request([{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                        "data": [base64.b64encode(images[0]).decode()]}])
    assert oip.parse_infer(as_json, None, SIZE, 4).images == images[:1]


@pytest.mark.parametrize("body,header,words", [
    (b"{not json", None, "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, None, "not JSON"),  # nesting deeper than the parser goes: 400, not a crash
    (request([]), None, "exactly one input"),
    (request([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]), None, "unknown input 'x'"),
    (request([{"name": "pixels", "datatype": "FP16", "shape": [1, 3, SIZE, SIZE], "data": []}]), None, "is FP32"),
    (request([{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 4, 4], "data": [0] * 48}]), None,
     f"[N, 3, {SIZE}, {SIZE}]"),
    (request([{"name": "pixels", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE], "data": [0] * 5}]), None,
     "needs 192 numbers, got 5"),
    (request([{"name": "pixels", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE], "data": ["a"] * 192}]), None,
     "must be numbers"),
    (request([{"name": "pixels", "datatype": "FP32", "shape": [5, 3, SIZE, SIZE], "data": [0] * 960}]), None,
     "send 1 to 4"),
    (request([{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE], "data": []}]), None,
     "whole numbers"),
    (request([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]), None, "not base64"),
    (request([{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AA=="]}]), None, "2 base64 strings"),
    (request([{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}])
     + struct.pack("<I", 100) + b"short", "{n}", "runs past the binary data"),
    (request([{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 2}}])
     + b"abc", "{n}", "does not match"),
    (request([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]), "99999", "does not fit"),
    (request([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}], [{"name": "probs"}]), None,
     "one output, 'logits'"),
    (request([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}],
             [{"name": "logits", "parameters": {"classification": -3}}]), None, "whole number of classes"),
])
def test_a_request_the_protocol_cannot_take_is_one_clear_refusal(body, header, words):
    if header == "{n}":
        header = str(body.index(b"}]}") + 3)
    with pytest.raises(oip.ProtocolError) as refused:
        oip.parse_infer(body, header, SIZE, 4)
    assert words in str(refused.value), str(refused.value)


def test_the_response_carries_logits_or_top_k_strings_in_json_or_binary():
    logits = np.array([[0.5, 2.0, 2.0, -1.0]], np.float32)
    labels = ["a", "b", "c", "d"]
    plain = oip.InferRequest(id="7", input="image", images=[b""])
    body, headers = oip.infer_response("m", plain, logits, labels)
    answer = json.loads(body)
    assert headers == {} and answer["id"] == "7" and answer["model_version"] == "1"
    assert answer["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [1, 4], "data": [0.5, 2, 2, -1]}]

    top = oip.InferRequest(id=None, input="image", images=[b""], classification=2, binary_output=True)
    body, headers = oip.infer_response("m", top, logits, labels)
    n = int(headers["Inference-Header-Content-Length"])
    head, raw = json.loads(body[:n]), body[n:]
    assert head["outputs"][0]["shape"] == [1, 2] and head["outputs"][0]["parameters"]["binary_data_size"] == len(raw)
    strings, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        strings.append(raw[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    assert strings == ["2.000000:1:b", "2.000000:2:c"]  # ties: the lower index first, as /predict ranks them


@pytest.fixture(scope="module")
def running(served_export, tmp_path_factory):
    """`python -m kdforge.serve` on the served export with an API key: (url, key, export_dir, pngs)."""
    from .test_serve import start_server

    export_dir, pngs = served_export
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text("protocol-test-key-0123456789\n")
    server, port = start_server(export_dir, "--api-key-file", str(key_file))
    yield f"127.0.0.1:{port}", key_file.read_text().strip(), export_dir, pngs
    server.terminate()
    server.wait(30)


@pytest.mark.slow
def test_tritons_client_gets_what_predict_answers(running):
    """tritonclient.http (Triton's own client) against the server: health, metadata, and inference by encoded
    images (BYTES) and by normalized pixels (FP32), binary and JSON, each equal to /predict's answer."""
    import httpx
    import tritonclient.http as triton

    from kdforge.images import decode_rgb, normalize

    url, key, export_dir, pngs = running
    auth = {"Authorization": f"Bearer {key}"}
    meta = json.loads((export_dir / "metadata.json").read_text())
    name, size, classes = meta["recipe"], int(meta["input_size"]), int(meta["num_classes"])
    client = triton.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()  # health needs no key (Kubernetes' probes)
    # tritonclient adds its own headers to the dict it is given: a fresh one per call
    assert client.is_model_ready(name, headers=dict(auth))
    described = client.get_model_metadata(name, headers=dict(auth))
    assert described["inputs"][1] == {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, size, size]}
    assert described["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, classes]}]
    with pytest.raises(triton.InferenceServerException, match="API key"):
        client.get_model_metadata(name)

    predicted = [httpx.post(f"http://{url}/predict", content=p.read_bytes(), headers={**auth,
                            "Content-Type": "image/png"}).json()["predictions"] for p in pngs]
    images = triton.InferInput("image", [len(pngs)], "BYTES")
    images.set_data_from_numpy(np.array([p.read_bytes() for p in pngs], dtype=np.object_))
    logits = client.infer(name, [images], headers=dict(auth)).as_numpy("logits")
    assert logits.shape == (len(pngs), classes)
    for row, answer in zip(logits, predicted, strict=True):
        probabilities = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        assert [p["index"] for p in answer] == list(np.argsort(-row, kind="stable")[:5])
        assert np.allclose([p["probability"] for p in answer], probabilities[[p["index"] for p in answer]],
                           atol=1e-6)

    top = client.infer(name, [images], headers=dict(auth),
                       outputs=[triton.InferRequestedOutput("logits", class_count=3)]).as_numpy("logits")
    assert [[s.decode().split(":")[2] for s in row] for row in top] == [[p["label"] for p in a[:3]]
                                                                       for a in predicted]

    mean, std = (np.asarray(meta[k], np.float32).reshape(3, 1, 1) for k in ("mean", "std"))
    pixels = normalize(decode_rgb(pngs[0].read_bytes(), size), mean, std)[None].astype(np.float32)
    for binary in (True, False):  # the binary tensor extension, and plain JSON numbers
        tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        out = client.infer(name, [tensor], headers=dict(auth),
                           outputs=[triton.InferRequestedOutput("logits", binary_data=binary)]).as_numpy("logits")
        assert np.allclose(out, logits[:1], atol=1e-4), (binary, np.abs(out - logits[:1]).max())
    client.close()


@pytest.mark.slow
def test_metrics_count_requests_by_route_and_status_and_name_the_served_file(running):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    url, key, export_dir, pngs = running
    auth = {"X-API-Key": key}
    for _ in range(3):
        httpx.post(f"http://{url}/predict", content=pngs[0].read_bytes(), headers={**auth, "Content-Type": "image/png"})
    httpx.post(f"http://{url}/predict", content=b"not an image", headers={**auth, "Content-Type": "image/png"})
    httpx.get(f"http://{url}/metadata")  # no key: 401
    httpx.get(f"http://{url}/no/such/route/{'x' * 50}", headers=dict(auth))
    assert httpx.get(f"http://{url}/metrics").status_code == 401  # behind the key, like everything but health
    text = httpx.get(f"http://{url}/metrics", headers=dict(auth)).text
    families = {family.name: family for family in text_string_to_metric_families(text)}

    def value(family, suffix="", **labels):
        return sum(s.value for s in families[family].samples
                   if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("kdforge_requests", "_total", route="/predict", status="200") >= 3
    assert value("kdforge_requests", "_total", route="/predict", status="400") >= 1
    assert value("kdforge_requests", "_total", route="/metadata", status="401") >= 1
    assert value("kdforge_requests", "_total", route="other", status="404") >= 1  # no label per unknown path
    meta = json.loads((export_dir / "metadata.json").read_text())
    served = httpx.get(f"http://{url}/metadata", headers=dict(auth)).json()["format"]
    assert value("kdforge_request_duration_seconds", "_count", route="/predict", format=served) >= 4
    info = [s for s in families["kdforge_model_info"].samples if s.name == "kdforge_model_info"]
    assert info[0].labels["sha256"] == meta["formats"][served]["sha256"] and info[0].value == 1
    assert value("kdforge_ready") == 1 and value("kdforge_requests_in_flight") == 1  # this request itself
