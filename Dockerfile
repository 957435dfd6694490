# The serving image: an exported student behind kdforge's HTTP app (ONNX Runtime, numpy, Pillow, FastAPI,
# uvicorn; no torch), running as a non-root user.
#
#   docker build --build-arg EXPORT_DIR=exports/quickstart -t kdforge-serve .
#   docker run --rm -p 8000:8000 kdforge-serve
#   curl --data-binary @image.png -H "Content-Type: image/png" http://127.0.0.1:8000/predict
#
# BASE_IMAGE must be a Debian/Ubuntu image with apt (the default is Debian 12 slim; its python3 is 3.11).
# Builds for linux/amd64 and linux/arm64 (every serving package has an aarch64 wheel):
#   docker buildx build --platform linux/arm64 --build-arg EXPORT_DIR=exports/quickstart -t kdforge-serve:arm64 .
# EXTRAS: kdforge's optional-dependency groups installed into the image; to serve an OpenVINO IR
# (`kdforge export --format openvino`) add its runtime (~180 MB installed), which the default image leaves out:
#   docker build --build-arg EXTRAS=serve,serve-openvino ... && docker run -e KDFORGE_FORMAT=openvino ...
# and likewise serve-litert (LiteRT's interpreter, for `litert` / `litert_int8`) or serve-ncnn (for `ncnn`)

ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
# trust the system CA store (which includes any CA certificates added to the base image)
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
ARG EXTRAS=serve
# the packages of the EXTRAS groups, read from pyproject.toml (a layer of its own: a change to the code or the README
# does not reinstall them), then kdforge itself without its training dependencies
RUN python3 -m venv /opt/venv \
    && python3 -c "import os, tomllib; extras = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']; print('\n'.join(r for e in os.environ['EXTRAS'].split(',') for r in extras[e.strip()]))" > /tmp/serve.txt \
    && /opt/venv/bin/pip install -r /tmp/serve.txt
COPY README.md ./
COPY kdforge ./kdforge
RUN /opt/venv/bin/pip install --no-deps . \
    && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
    && rm -rf /opt/venv/lib/python3*/site-packages/pip /opt/venv/lib/python3*/site-packages/pip-*

FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin kdforge
COPY --from=build /opt/venv /opt/venv
ARG EXPORT_DIR=exports/quickstart
COPY ${EXPORT_DIR} /models
USER kdforge
# where the server listens (the HEALTHCHECK reads the same variables): docker run -e KDFORGE_PORT=9000 ...
# HTTPS: -e KDFORGE_SSL_CERTFILE=/run/secrets/server.crt -e KDFORGE_SSL_KEYFILE=/run/secrets/server.key
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 KDFORGE_HOST=0.0.0.0 KDFORGE_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["/opt/venv/bin/python", "-m", "kdforge.serve.healthcheck"]
# exec form: the server is PID 1 and gets SIGTERM directly (it finishes what runs, refuses what waits with 503,
# exits 0)
ENTRYPOINT ["/opt/venv/bin/python", "-m", "kdforge.serve", "/models"]
