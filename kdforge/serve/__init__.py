"""Serving the exported student over HTTP. This package never imports torch: the serving image holds ONNX
Runtime, numpy, Pillow, FastAPI and uvicorn only (`pip install "kdforge[serve]"`)."""
