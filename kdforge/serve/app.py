"""The HTTP app: FastAPI over the served model.

    GET  /healthz          {"status": "ok"}
    GET  /metadata         model, format, input size, classes, verification
    POST /predict          one image: raw bytes (Content-Type image/png, image/jpeg, image/webp, ...) or a
                           multipart form with a `file` field  -> {"predictions": [{"label", "index", "probability"}]}
    POST /predict/batch    a multipart form with one or more `files` fields -> {"results": [{"predictions": ...}]}
    GET  /metrics          Prometheus metrics (serve/metrics.py)
    /v2/...                the Open Inference Protocol (KServe v2, Triton's HTTP API; serve/oip.py)

Bad input (empty body, not an image, too many bytes or pixels, wrong content type, too many files) gets a 4xx
JSON error {"error": ...}; the server keeps serving. With an API key, every path but /healthz needs it
(`Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time; else 401 JSON); the health routes
a load balancer or Kubernetes polls (/healthz, /v2/health/live, /v2/health/ready) need none. Images are decoded
by `kdforge.images.decode_rgb` (formats, pixel budget, transparency), at most `max_concurrent` requests at a time.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from pathlib import Path

from anyio import CapacityLimiter, move_on_after, to_thread  # FastAPI's own async layer
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser

from kdforge.errors import ServingError
from kdforge.images import MAX_PIXELS, ImageError, ImageTooLarge
from kdforge.serve import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BYTES, oip
from kdforge.serve.metrics import ServerMetrics, route_of
from kdforge.serve.model import DEFAULT_PROVIDERS, ServedModel

DEFAULT_MAX_BATCH = 32
# requests decoded and run at once: each decodes one image at a time of up to max_pixels, so concurrent
# requests multiply memory by at most this much (the others wait their turn)
DEFAULT_MAX_CONCURRENT = min(4, os.cpu_count() or 1)


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: Request, max_bytes: int, timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> bytes:
    """The request body, refusing more than `max_bytes` before reading it all when the client says its size, and
    a body that has not arrived within `timeout_s` (a client trickling bytes would hold a connection forever)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"request body of {int(declared)} bytes exceeds the limit of {max_bytes}")
    chunks, size = [], 0
    with move_on_after(timeout_s) as deadline:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise RequestError(413, f"request body exceeds the limit of {max_bytes} bytes")
            chunks.append(chunk)
    if deadline.cancelled_caught:
        raise RequestError(408, f"the request body did not arrive within {timeout_s:g} s")
    return b"".join(chunks)


async def images_from(request: Request, field: str, max_bytes: int,
                      timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> list[bytes]:
    """Image bytes from a raw image body or from the multipart `field`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, max_bytes, timeout_s)
    if not body:
        raise RequestError(400, "empty request body: send an image")
    if content_type == "multipart/form-data":
        async def chunks():
            yield body

        try:  # parse the body already read (and size-checked), not the consumed stream
            form = await MultiPartParser(request.headers, chunks()).parse()
        except Exception as exc:  # malformed multipart bodies raise parser-specific errors
            raise RequestError(400, f"malformed multipart body: {exc}") from None
        uploads = [item for item in form.getlist(field) if hasattr(item, "read")]
        if not uploads:
            raise RequestError(400, f"multipart body has no file field named {field!r}")
        return [await upload.read() for upload in uploads]
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return [body]
    raise RequestError(415, f"unsupported content type {content_type or '(none)'!r}: send image/* bytes "
                            f"or multipart/form-data")


def check_limits(**limits: int) -> None:
    """Every serving limit is a whole number of at least 1 (a top-k of -1 returned every class but one)."""
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ServingError(f"--{name.replace('_', '-')} must be a whole number of at least 1, got {value!r}")


def create_app(
    export_dir: Path, fmt: str = "auto", max_bytes: int = DEFAULT_MAX_BYTES, max_batch: int = DEFAULT_MAX_BATCH,
    top_k: int = 5, providers: tuple[str, ...] = DEFAULT_PROVIDERS, engine_cache: Path | None = None,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT, max_pixels: int = MAX_PIXELS, api_key: str | None = None,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, device_report: Path | None = None,
) -> FastAPI:
    check_limits(top_k=top_k, max_bytes=max_bytes, max_batch=max_batch, max_pixels=max_pixels,
                 max_concurrent=max_concurrent)
    model = ServedModel.load(Path(export_dir), fmt, providers, engine_cache, max_pixels, device_report)
    workers = CapacityLimiter(max_concurrent)
    stopping = threading.Event()  # set by the server on SIGTERM (serve/__main__.py)

    async def run_model(work, *args):
        async with workers:  # a request that waited here while the server began to stop is refused, not cut off
            if stopping.is_set():
                raise RequestError(503, "the server is shutting down; send the request again (to another replica)")
            return await to_thread.run_sync(work, *args)

    app = FastAPI(title="kdforge student", version="1", docs_url=None, redoc_url=None)
    app.state.info = model.info
    app.state.stopping = stopping
    metrics = ServerMetrics(model.info)
    metrics.ready.set(1)  # loaded and warmed up by ServedModel.load
    name = str(model.info["recipe"])  # the model's name in the Open Inference Protocol

    answer_errors_as_json(app)
    if api_key:
        require_key(app, api_key)
    count_requests(app, metrics)  # added last: the outermost, so it counts refusals of the key check too

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        metrics.ready.set(0 if stopping.is_set() else 1)
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/metadata")
    async def metadata() -> dict:
        return {**model.info, "labels": model.labels, "max_bytes": max_bytes, "max_batch": max_batch, "top_k": top_k}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        images = await images_from(request, "file", max_bytes, body_timeout_s)
        if len(images) != 1:
            raise RequestError(400, f"/predict takes one image, got {len(images)}; use /predict/batch")
        results = await run_model(model.predict, images, top_k)
        return {"predictions": results[0]}

    @app.post("/predict/batch")
    async def predict_batch(request: Request) -> dict:
        images = await images_from(request, "files", max_bytes, body_timeout_s)
        if len(images) > max_batch:
            raise RequestError(413, f"{len(images)} images exceed the batch limit of {max_batch}")
        results = await run_model(model.predict, images, top_k)
        return {"results": [{"predictions": r} for r in results]}

    add_protocol_routes(app, model, name, run_model, stopping, max_bytes, max_batch, body_timeout_s)
    return app


HEALTH_ROUTES = ("/healthz", "/v2/health/live", "/v2/health/ready")


def answer_errors_as_json(app: FastAPI) -> None:
    """Every refusal as {"error": ...} with its status: ours, Starlette's (404, 405), images', the protocol's."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ImageError)
    async def image_error(request: Request, exc: ImageError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=413 if isinstance(exc, ImageTooLarge) else 400)

    @app.exception_handler(oip.ProtocolError)
    async def protocol_error(request: Request, exc: oip.ProtocolError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)


def require_key(app: FastAPI, api_key: str) -> None:
    """Every path but the health routes needs the key (compared in constant time), else 401 JSON."""
    expected = api_key.encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path not in HEALTH_ROUTES:  # what a load balancer, Kubernetes or `docker run` polls
            bearer = request.headers.get("authorization", "")
            given = request.headers.get("x-api-key") or (bearer[7:] if bearer[:7].lower() == "bearer " else "")
            if not hmac.compare_digest(given.strip().encode(), expected):
                return JSONResponse({"error": "missing or wrong API key: send it as 'Authorization: Bearer KEY' "
                                              "or 'X-API-Key: KEY'"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)


def count_requests(app: FastAPI, metrics: ServerMetrics) -> None:
    """Each answered request counted and timed in `metrics` (by route template, status and format)."""

    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        metrics.in_flight.inc()
        try:
            response = await call_next(request)
        finally:
            metrics.in_flight.dec()
        seconds = time.perf_counter() - started
        metrics.observe(route_of(request.scope, app.routes), request.method, response.status_code, seconds)
        return response


def add_protocol_routes(app: FastAPI, model: ServedModel, name: str, run_model, stopping: threading.Event,
                        max_bytes: int, max_batch: int, body_timeout_s: float) -> None:
    """The Open Inference Protocol's routes (serve/oip.py holds the protocol; these only read and answer)."""

    def ready() -> bool:
        return not stopping.is_set()

    def known(model_name: str, version: str | None = None) -> None:
        if model_name != name or version not in (None, "", oip.VERSION):
            raise RequestError(404, f"unknown model {model_name[:64]!r} (version {version}): this server holds "
                                    f"{name!r} version {oip.VERSION}")

    @app.get("/v2")
    async def server_metadata() -> dict:
        return oip.server_metadata()

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def server_ready() -> JSONResponse:
        return JSONResponse({"ready": ready()}, status_code=200 if ready() else 503)

    @app.get("/v2/models/{model_name}")
    @app.get("/v2/models/{model_name}/versions/{version}")
    async def model_metadata(model_name: str, version: str | None = None) -> dict:
        known(model_name, version)
        return oip.model_metadata(name, model.info, model.size, len(model.labels))

    @app.get("/v2/models/{model_name}/ready")
    @app.get("/v2/models/{model_name}/versions/{version}/ready")
    async def model_ready(model_name: str, version: str | None = None) -> JSONResponse:
        known(model_name, version)
        return JSONResponse({"name": name, "ready": ready()}, status_code=200 if ready() else 503)

    @app.post("/v2/models/{model_name}/infer")
    @app.post("/v2/models/{model_name}/versions/{version}/infer")
    async def infer(model_name: str, request: Request, version: str | None = None) -> Response:
        known(model_name, version)
        body = await read_body(request, max_bytes, body_timeout_s)
        parsed = oip.parse_infer(body, request.headers.get(oip.HEADER_LENGTH), model.size, max_batch)
        if parsed.input == oip.IMAGE:
            logits = await run_model(model.logits, parsed.images)
        else:
            logits = await run_model(model.run, parsed.pixels)
        content, headers = oip.infer_response(name, parsed, logits, model.labels)
        media = "application/json" if not headers else "application/octet-stream"
        return Response(content, media_type=media, headers=headers)
