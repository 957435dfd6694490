"""Serving the exported student over HTTP. This package never imports torch: the serving image holds ONNX
Runtime, numpy, Pillow, FastAPI and uvicorn only (`pip install "kdforge[serve]"`)."""

# The server's limits, here so that the CLI can show them without importing FastAPI
DEFAULT_MAX_BYTES = 10 * 1024 * 1024  # largest request body
DEFAULT_BODY_TIMEOUT_S = 30.0  # a request body must arrive within this long
DEFAULT_HEADER_TIMEOUT_S = 10.0  # a request's headers must arrive within this long of connecting or the last answer
DEFAULT_MAX_CONNECTIONS = 256  # connections open at once (idle ones are closed to make room for new ones)
