import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from kdforge.cli import app as cli
from kdforge.serve.app import create_app
from kdforge.serve.model import ServedModel


def png(size=(40, 24), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_metadata_and_predictions(served_export):
    export_dir, pngs = served_export
    client = TestClient(create_app(export_dir))
    assert client.get("/healthz").json() == {"status": "ok"}
    meta = client.get("/metadata").json()
    assert meta["format"] == "int8" and meta["verified"] is True  # the verified INT8 export is preferred
    assert meta["input_size"] == 32 and len(meta["labels"]) == 100

    body = pngs[0].read_bytes()
    raw = client.post("/predict", content=body, headers={"Content-Type": "image/png"}).json()
    form = client.post("/predict", files={"file": ("x.png", body, "image/png")}).json()
    assert raw == form
    predictions = raw["predictions"]
    assert len(predictions) == 5 and {"label", "index", "probability"} <= set(predictions[0])
    assert predictions[0]["probability"] >= predictions[-1]["probability"]
    assert predictions == ServedModel.load(export_dir).predict([body])[0]

    batch = client.post("/predict/batch", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in pngs])
    assert batch.status_code == 200
    assert [r["predictions"] for r in batch.json()["results"]] == ServedModel.load(export_dir).predict(
        [p.read_bytes() for p in pngs])


def test_any_image_size_and_format_is_resized_from_the_metadata(served_export):
    export_dir, _ = served_export
    client = TestClient(create_app(export_dir))
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png((300, 200)))).save(buffer, format="JPEG")
    for body, kind in ((png((300, 200)), "image/png"), (buffer.getvalue(), "image/jpeg")):
        response = client.post("/predict", content=body, headers={"Content-Type": kind})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b"", "image/png", 400, "empty request body"),
        (b"definitely not an image", "image/png", 400, "not a readable image"),
        (b"x" * 3000, "image/png", 413, "exceeds the limit of 2048"),
        (b"hello", "text/plain", 415, "unsupported content type"),
        (b"--b\r\nbroken", "multipart/form-data; boundary=b", 400, ""),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(served_export, body, content_type, status, message):
    export_dir, pngs = served_export
    client = TestClient(create_app(export_dir, max_bytes=2048), raise_server_exceptions=False)
    response = client.post("/predict", content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    ok = client.post("/predict", content=pngs[0].read_bytes(), headers={"Content-Type": "image/png"})
    assert ok.status_code == 200


def test_batch_limit_and_wrong_field_are_4xx(served_export):
    export_dir, pngs = served_export
    client = TestClient(create_app(export_dir, max_batch=2), raise_server_exceptions=False)
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in pngs[:3]]
    assert client.post("/predict/batch", files=files).status_code == 413
    response = client.post("/predict", files={"image": ("x.png", pngs[0].read_bytes(), "image/png")})
    assert response.status_code == 400 and "no file field named 'file'" in response.json()["error"]


def test_the_serving_path_never_imports_torch(served_export):
    export_dir, pngs = served_export
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now fails\n"
        "from fastapi.testclient import TestClient\n"
        "from kdforge.serve.app import create_app\n"
        f"client = TestClient(create_app({str(export_dir)!r}))\n"
        f"r = client.post('/predict', content=open({str(pngs[0])!r}, 'rb').read(), "
        "headers={'Content-Type': 'image/png'})\n"
        "assert r.status_code == 200, r.text\n"
        "assert 'timm' not in sys.modules\n"
        "print('served without torch')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "served without torch" in result.stdout


def test_predict_command_prints_what_the_server_answers(served_export):
    export_dir, pngs = served_export
    result = CliRunner().invoke(cli, ["predict", *map(str, pngs[:3]), "--model", str(export_dir)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    client = TestClient(create_app(export_dir))
    for line, path in zip(lines, pngs, strict=False):
        answer = client.post("/predict", content=path.read_bytes(), headers={"Content-Type": "image/png"}).json()
        assert line["file"] == str(path) and line["predictions"] == answer["predictions"]
    bad = CliRunner().invoke(cli, ["predict", str(export_dir / "metadata.json"), "--model", str(export_dir)])
    assert bad.exit_code == 1 and "not a readable image" in bad.stderr and "Traceback" not in bad.output


def test_gpu_providers_are_chosen_in_order_with_a_tensorrt_engine_cache(tmp_path):
    from kdforge.errors import ExportError
    from kdforge.sessions import onnxruntime_providers

    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = onnxruntime_providers(("tensorrt", "cuda", "cpu"), everything, tmp_path / "engines")
    assert chosen[0][0] == "TensorrtExecutionProvider" and chosen[1:] == everything[1:]
    options = chosen[0][1]
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path / "engines")
    assert (tmp_path / "engines").is_dir()
    # on a CPU-only machine the GPU image's provider list falls back to the CPU
    assert onnxruntime_providers(("tensorrt", "cuda", "cpu"), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ExportError, match="unknown execution providers"):
        onnxruntime_providers(("tensorrtt",), everything)
    with pytest.raises(ExportError, match="none of the execution providers"):
        onnxruntime_providers(("cuda",), ["CPUExecutionProvider"])


# Debian 12 (the serving image's base) has glibc 2.36: wheels tagged manylinux_2_17 .. manylinux_2_36 install there
AARCH64_PLATFORMS = [f"manylinux_2_{minor}_aarch64" for minor in range(36, 16, -1)] + ["manylinux2014_aarch64"]


@pytest.mark.slow
@pytest.mark.parametrize("extras", [["serve"], ["serve", "serve-openvino"], ["serve", "serve-litert", "serve-ncnn"]])
def test_every_serving_dependency_has_an_aarch64_wheel(tmp_path, extras):
    """What the serving image installs resolves, with every dependency, to wheels an arm64 Debian 12 can install
    (pip's resolver with --platform; PyPI's metadata files, no wheel is downloaded)."""
    from pathlib import Path

    from kdforge.recipe import tomllib  # tomllib, or tomli on Python 3.10

    groups = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    requirements = [r for extra in extras for r in groups[extra]]
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
               "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
               *(f"--platform={p}" for p in AARCH64_PLATFORMS), "--target", str(tmp_path / "target"),
               "--report", str(report), *requirements]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and any(s in result.stderr for s in ("NewConnectionError", "Max retries exceeded")):
        pytest.skip(f"the package index cannot be reached from here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, f"no aarch64 wheel for some serving dependency:\n{result.stderr[-2000:]}"
    wheels = [item["download_info"]["url"].rsplit("/", 1)[1] for item in json.loads(report.read_text())["install"]]
    print(f"\n{'+'.join(extras)}: {len(wheels)} wheels for linux/aarch64: {', '.join(sorted(wheels))}")
    assert {w.split("-")[0].lower() for w in wheels} >= {"onnxruntime", "numpy", "pillow", "fastapi", "uvicorn"}
    assert all(w.endswith("-none-any.whl") or "aarch64" in w for w in wheels), wheels


@pytest.mark.parametrize("args,fragment", [
    (["serve", "{export}", "--port", "70000"], "'--port': Input should be less than or equal to 65535"),  # else 4464
    (["serve", "{export}", "--port", "0"], "'--port': Input should be greater than or equal to 1"),
    (["serve", "{export}", "--top-k", "-1"], "'--top-k': Input should be greater than or equal to 1"),
    (["serve", "{export}", "--max-bytes", "0"], "'--max-bytes': Input should be greater than or equal to 1"),
    (["predict", "{image}", "--model", "{export}", "--top-k", "-1"], "'--top-k'"),  # returned 99 of 100 classes
])
def test_options_out_of_range_are_refused_before_anything_starts(served_export, args, fragment):
    export_dir, pngs = served_export
    argv = [a.format(export=export_dir, image=pngs[0]) for a in args]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2 and fragment in " ".join(result.output.replace("│", " ").split()), result.output


def test_the_serving_module_and_the_library_refuse_out_of_range_limits_too(served_export):
    from kdforge.errors import ServingError

    export_dir, _ = served_export
    for argv in (["--port", "70000"], ["--top-k", "0"], ["--max-batch", "0"]):
        done = subprocess.run([sys.executable, "-m", "kdforge.serve", str(export_dir), *argv], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 1 and done.stderr.startswith("error: --") and "Traceback" not in done.stderr, argv
    with pytest.raises(ServingError, match="--top-k must be a whole number of at least 1, got -1"):
        create_app(export_dir, top_k=-1)


def test_with_an_api_key_every_path_but_healthz_needs_it(served_export, tmp_path):
    from kdforge.errors import ServingError
    from kdforge.serve.__main__ import read_api_key

    export_dir, pngs = served_export
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key-of-some-length\n")
    key = read_api_key(key_file)
    client = TestClient(create_app(export_dir, api_key=key))
    assert client.get("/healthz").status_code == 200  # health checks stay open
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer " + key[:-1]}, {"Authorization": key}):
        answer = client.get("/metadata", headers=headers)
        assert answer.status_code == 401 and "API key" in answer.json()["error"], (headers, answer.text)
        assert answer.headers["www-authenticate"] == "Bearer"
    refused = client.post("/predict", content=pngs[0].read_bytes(), headers={"Content-Type": "image/png"})
    assert refused.status_code == 401
    assert client.get("/metadata", headers={"X-API-Key": key}).status_code == 200
    answer = client.post("/predict", content=pngs[0].read_bytes(), headers={"Content-Type": "image/png",
                                                               "Authorization": f"Bearer {key}"})
    assert answer.status_code == 200 and answer.json()["predictions"]
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ServingError, match="at least 16 characters"):
        read_api_key(tmp_path / "short")
    with pytest.raises(ServingError, match="cannot read the API key file"):
        read_api_key(tmp_path / "missing")


def start_server(export_dir: Path, *options: str, output=subprocess.DEVNULL) -> tuple[subprocess.Popen, int]:
    """`python -m kdforge.serve EXPORT_DIR OPTIONS` on a free port, as a server runs: (the process, its port), once it
    accepts connections."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "kdforge.serve", str(export_dir), "--port", str(port), *options],
                              stdout=output, stderr=subprocess.STDOUT, text=True)
    wait_for_port(port)
    return server, port


def wait_for_port(port: int, seconds: float = 20.0) -> None:
    """Until something accepts connections on 127.0.0.1:`port` (a server starting), at most `seconds`."""
    import socket
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_under_load_answers_every_accepted_request_with_json_and_exits_0(served_export):
    """20 requests of large images on 2 workers, SIGTERM while they queue: each gets its prediction or a 503 JSON
    refusal (none a plain-text 500 or a dropped connection), and the server exits 0."""
    import http.client
    import signal
    import threading
    import time

    export_dir, _ = served_export
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)).save(big, "PNG")
    server, port = start_server(export_dir, output=subprocess.PIPE)
    answers: list[tuple[int, dict]] = []

    def post() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/predict", big.getvalue(), {"Content-Type": "image/png"})
        response = connection.getresponse()
        answers.append((response.status, json.loads(response.read())))

    try:
        clients = [threading.Thread(target=post) for _ in range(20)]
        for client in clients:
            client.start()
        time.sleep(0.2)
        server.send_signal(signal.SIGTERM)
        for client in clients:
            client.join(60)
        assert server.wait(30) == 0, server.stdout.read()
    finally:
        server.kill()
    statuses = sorted(status for status, _ in answers)
    print(f"\nSIGTERM under load: {statuses.count(200)} answered, {statuses.count(503)} refused with 503")
    assert len(answers) == 20 and set(statuses) <= {200, 503}, statuses
    assert all("predictions" in body if status == 200 else "shutting down" in body["error"]
               for status, body in answers)


@pytest.mark.slow
def test_a_body_that_trickles_past_the_timeout_gets_408_json(served_export):
    """A client that sends headers and a few bytes, then stalls, is answered 408 {"error": ...} after
    --body-timeout instead of holding its connection (and a worker slot) forever."""
    import socket
    import time

    export_dir, _ = served_export
    server, port = start_server(export_dir, "--body-timeout", "1")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                           b"Content-Length: 1000\r\n\r\n" + b"\x89PNG" * 3)
            started = time.perf_counter()
            answer = b""
            while b"}" not in answer:
                chunk = client.recv(4096)
                if not chunk:
                    break
                answer += chunk
        waited = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(30)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert "did not arrive within 1 s" in json.loads(body)["error"] and 0.9 < waited < 10


def self_signed(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (openssl, as a user would make one)."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.mark.slow
def test_with_a_certificate_the_server_speaks_https_only(served_export, tmp_path):
    import http.client
    import ssl

    export_dir, pngs = served_export
    cert, key = self_signed(tmp_path)
    server, port = start_server(export_dir, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    trusted = ssl.create_default_context(cafile=str(cert))
    try:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=trusted, timeout=30)
        connection.request("POST", "/predict", pngs[0].read_bytes(), {"Content-Type": "image/png"})
        answer = connection.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["predictions"]
        health = subprocess.run([sys.executable, "-m", "kdforge.serve.healthcheck"], capture_output=True, text=True,
                                env={**os.environ, "KDFORGE_PORT": str(port), "KDFORGE_SSL_CERTFILE": str(cert)})
        assert health.returncode == 0, health.stderr  # the container's HEALTHCHECK speaks HTTPS to it
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        with pytest.raises((http.client.HTTPException, OSError)):  # the TLS layer drops a plain-HTTP request
            plain.request("GET", "/metadata")
            plain.getresponse()
    finally:
        server.terminate()
        assert server.wait(30) == 0


def test_a_certificate_without_its_key_or_with_another_key_is_one_error_line(served_export, tmp_path):
    export_dir, _ = served_export
    cert, _ = self_signed(tmp_path, "one")
    _, other_key = self_signed(tmp_path, "two")
    for argv, message in ((["--ssl-certfile", str(cert)], "needs both --ssl-certfile and --ssl-keyfile"),
                          (["--ssl-certfile", str(cert), "--ssl-keyfile", str(other_key)], "must be the certificate's"),
                          (["--ssl-certfile", str(tmp_path / "none.crt"), "--ssl-keyfile", str(other_key)],
                           "no such file")):
        done = CliRunner().invoke(cli, ["serve", str(export_dir), "--port", "1", *argv])
        assert done.exit_code == 1 and message in done.output and "Traceback" not in done.output, done.output
