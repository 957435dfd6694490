"""`python -m kdforge.serve EXPORT_DIR [--host 127.0.0.1] [--port 8000]`: the server without the CLI's
dependencies (what the container runs). `kdforge serve` calls the same `run`."""

from __future__ import annotations

import argparse
import datetime
import errno
import os
import signal
import socket
import sys
from pathlib import Path

from kdforge.errors import KdforgeError
from kdforge.images import MAX_PIXELS
from kdforge.serve import DEFAULT_BODY_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_BYTES, DEFAULT_MAX_CONNECTIONS
from kdforge.serve.app import DEFAULT_MAX_BATCH, check_limits
from kdforge.serve.model import DEFAULT_PROVIDERS, SERVABLE, ServingError
from kdforge.sessions import ORT_PROVIDERS

GRACE_S = 10  # seconds the requests being computed get to finish after SIGTERM
EXPIRY_WARNING_DAYS = 14  # a certificate this close to its end is named at start


def run(export_dir: Path, host: str = "127.0.0.1", port: int = 8000, fmt: str = "auto",
        max_bytes: int = DEFAULT_MAX_BYTES, max_batch: int = DEFAULT_MAX_BATCH, top_k: int = 5,
        providers: tuple[str, ...] = DEFAULT_PROVIDERS, engine_cache: Path | None = None,
        max_pixels: int = MAX_PIXELS, api_key_file: Path | None = None,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, max_connections: int = DEFAULT_MAX_CONNECTIONS,
        ssl_certfile: Path | None = None, ssl_keyfile: Path | None = None,
        device_report: Path | None = None, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S) -> None:
    import uvicorn

    from kdforge.serve.app import create_app

    if not 1 <= port <= 65535:  # the socket layer would take 70000 as 70000 - 65536 and listen there
        raise ServingError(f"--port must be between 1 and 65535, got {port}")
    api_key = read_api_key(api_key_file) if api_key_file else None
    check_limits(max_connections=max_connections)
    for name, seconds in (("--body-timeout", body_timeout_s), ("--header-timeout", header_timeout_s)):
        if not 0 < seconds < float("inf"):
            raise ServingError(f"{name} must be a positive number of seconds, got {seconds}")
    check_tls(ssl_certfile, ssl_keyfile)
    app = create_app(export_dir, fmt=fmt, max_bytes=max_bytes, max_batch=max_batch, top_k=top_k,
                     providers=providers, engine_cache=engine_cache, max_pixels=max_pixels, api_key=api_key,
                     body_timeout_s=body_timeout_s, device_report=device_report)
    listening = bind(host, port)
    return_freed_memory()
    if "warning" in app.state.info:
        print(f"warning: {app.state.info['warning']} ({export_dir})", file=sys.stderr, flush=True)
    if api_key is None and host in ("0.0.0.0", "::", ""):
        print(f"warning: listening on every interface ({host}) without an API key: anyone who reaches port {port} "
              f"can use the model; set --api-key-file (or $KDFORGE_API_KEY_FILE)", file=sys.stderr, flush=True)
    # SIGTERM/SIGINT: stop accepting, answer what is running (up to GRACE_S), refuse what waits with 503 JSON
    # (app.state.stopping), then exit 0: a requested stop is a success, not a crash
    # limit_concurrency: connections and tasks at once; beyond it uvicorn answers 503 (its own plain-text body)
    # uvicorn counts the asking connection in its limit: N + 1 serves N. The protocol bounds header reads in time
    # and reclaims idle connections when the limit is reached (bounded_protocol)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=GRACE_S, log_level="info",
                            access_log=False, limit_concurrency=max_connections + 1,
                            http=bounded_protocol(max_connections, header_timeout_s),
                            ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                            ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # what uvicorn re-raises after its graceful shutdown

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.stopping.set()  # requests still waiting for a worker get 503 JSON, not a cancelled 500
            super().handle_exit(sig, frame)

    GracefulServer(config).run(sockets=[listening])


def bounded_protocol(max_connections: int, header_timeout_s: float):
    """uvicorn's HTTP/1.1 protocol (h11) with two bounds a proxy would add, so that no slow or idle client can
    lock others out: a connection whose next request's headers have not all arrived within `header_timeout_s` of
    connecting (or of its last response) is closed, however slowly it trickles bytes (uvicorn times only idle
    keep-alive, and a trickle resets that); and when `max_connections` are open, a new connection makes the server
    close the longest-idle ones between requests (keep-alive, or still sending headers), as nginx does, instead
    of answering 503 while idle sockets hold every place."""
    import asyncio
    import time

    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        header_deadline: asyncio.TimerHandle | None = None
        idle_since = 0.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            excess = len(self.connections) - max_connections
            if excess > 0:  # only at the limit: the idle ones, longest idle first
                idle = sorted((c for c in self.connections if c is not self and c.between_requests()),
                              key=lambda c: c.idle_since)
                for other in idle[:excess]:
                    other.transport.close()
            self.arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm_header_deadline()

        def between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def arm_header_deadline(self) -> None:
            self.idle_since = time.monotonic()
            if self.header_deadline is not None:
                self.header_deadline.cancel()
            self.header_deadline = asyncio.get_running_loop().call_later(header_timeout_s, self.headers_too_slow)

        def headers_too_slow(self) -> None:
            if self.between_requests() and not self.transport.is_closing():
                self.transport.close()  # no request began in time: its place goes to another client

        def connection_lost(self, exc) -> None:
            if self.header_deadline is not None:
                self.header_deadline.cancel()
            super().connection_lost(exc)

    return BoundedH11Protocol


def check_tls(certfile: Path | None, keyfile: Path | None) -> None:
    """HTTPS needs a certificate (PEM, the chain in order) and its private key; both are loaded here, before the
    model, so a missing file, a key that does not match the certificate or a key with a passphrase is one
    ServingError instead of uvicorn's traceback after start-up."""
    if certfile is None and keyfile is None:
        return
    if certfile is None or keyfile is None:
        raise ServingError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    import ssl

    for path in (certfile, keyfile):
        if not Path(path).is_file():
            raise ServingError(f"no such file: {path}")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            certfile, keyfile, password=lambda: "")  # an encrypted key fails here instead of prompting
    except (ssl.SSLError, OSError) as exc:
        raise ServingError(f"cannot use {certfile} with {keyfile} for HTTPS ({getattr(exc, 'reason', None) or exc}): "
                           f"the key must be the certificate's, unencrypted, both in PEM") from None
    check_certificate_dates(Path(certfile))


def check_certificate_dates(certfile: Path, now: datetime.datetime | None = None) -> None:
    """Refuse a chain with a certificate that has expired or is not valid yet (every client would refuse the
    connection; better one error line at start than a server nobody can reach); warn on stderr when one expires
    within EXPIRY_WARNING_DAYS. Dates are read with the cryptography package (the ssl module cannot parse a leaf)."""
    from cryptography import x509

    now = now or datetime.datetime.now(datetime.timezone.utc)
    for certificate in x509.load_pem_x509_certificates(Path(certfile).read_bytes()):
        subject = certificate.subject.rfc4514_string() or "(no subject)"
        starts, ends = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        if now < starts:
            raise ServingError(f"the certificate {subject} in {certfile} is not valid before {starts:%Y-%m-%d %H:%M} "
                               f"UTC (now {now:%Y-%m-%d %H:%M} UTC): clients would refuse it; check the clock or "
                               f"the certificate")
        if now > ends:
            raise ServingError(f"the certificate {subject} in {certfile} expired on {ends:%Y-%m-%d %H:%M} UTC: "
                               f"clients would refuse it; renew it")
        if ends - now < datetime.timedelta(days=EXPIRY_WARNING_DAYS):
            print(f"warning: the certificate {subject} in {certfile} expires on {ends:%Y-%m-%d %H:%M} UTC; renew it",
                  file=sys.stderr, flush=True)


def read_api_key(path: Path) -> str:
    """The API key in `path` (its first line; a file, so the key stays out of the process list and the
    environment): at least 16 characters."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServingError(f"cannot read the API key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not key or len(key[0].strip()) < 16:
        raise ServingError(f"the API key file {path} must hold a key of at least 16 characters on its first line "
                           f"(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > {path})")
    return key[0].strip()


def return_freed_memory() -> None:
    """Make glibc give a decoded image's memory back to the system when it is freed (on Linux; elsewhere nothing
    changes). Decoded images are megabytes; by default glibc raises its mmap threshold after the first ones are
    freed and then keeps such blocks in its heap, so the server stayed ~65 MB above its idle size after a burst
    of large images (benchmarks/decode_memory.py); with a fixed 1 MiB threshold it returns to it."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators decide
        pass


M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one ServingError (uvicorn would log it and exit
    with its start-up failure code, 3, which kdforge documents as "this machine lacks what was asked")."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServingError(f"cannot listen on {host}:{port}: {exc.strerror}; check --host") from None
    listening = socket.socket(family, kind, proto)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind(address)
    except OSError as exc:
        listening.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServingError(f"port {port} on {host} is in use by another program; choose another with "
                               f"--port") from None
        raise ServingError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return listening


def argument_parser() -> argparse.ArgumentParser:
    """The container's command line (its ENTRYPOINT, and the args a Kubernetes manifest adds to it)."""
    parser = argparse.ArgumentParser(prog="python -m kdforge.serve", description="Serve an exported student over HTTP.")
    parser.add_argument("export_dir", type=Path, help="an export folder (exports/NAME) holding metadata.json")
    parser.add_argument("--host", default=os.environ.get("KDFORGE_HOST", "127.0.0.1"),
                        help="address to bind (default: $KDFORGE_HOST, else 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("KDFORGE_PORT", "8000")),
                        help="TCP port (default: $KDFORGE_PORT, else 8000)")
    parser.add_argument("--format", default=os.environ.get("KDFORGE_FORMAT", "auto"), choices=["auto", *SERVABLE],
                        help="auto: the fastest verified format in bench.json, else a verified INT8, else the "
                             "FP32 ONNX (default: $KDFORGE_FORMAT, else auto)")
    parser.add_argument("--providers", default=os.environ.get("KDFORGE_PROVIDERS", ",".join(DEFAULT_PROVIDERS)),
                        help=f"ONNX Runtime providers in order of preference, from {', '.join(ORT_PROVIDERS)} "
                             f"(default: $KDFORGE_PROVIDERS, else {','.join(DEFAULT_PROVIDERS)})")
    parser.add_argument("--engine-cache", type=Path, default=os.environ.get("KDFORGE_ENGINE_CACHE") or None,
                        help="TensorRT provider: where engines built on this GPU are kept for the next start "
                             "(default: $KDFORGE_ENGINE_CACHE)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest request body accepted")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="most images in one batch request")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"largest image decoded, in pixels (default {MAX_PIXELS:,} = 4096x4096)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--api-key-file", type=Path, default=os.environ.get("KDFORGE_API_KEY_FILE") or None,
                        help="a file whose first line is the key every request but /healthz must send "
                             "(Authorization: Bearer KEY or X-API-Key: KEY; default: $KDFORGE_API_KEY_FILE)")
    parser.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help=f"seconds a request body may take to arrive, else 408 (default "
                             f"{DEFAULT_BODY_TIMEOUT_S:g})")
    parser.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                        help=f"seconds a request's headers may take to arrive after connecting or after the last "
                             f"response, else the connection is closed (default {DEFAULT_HEADER_TIMEOUT_S:g})")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help=f"connections served at once, beyond which the server answers 503 (default "
                             f"{DEFAULT_MAX_CONNECTIONS})")
    parser.add_argument("--ssl-certfile", type=Path, default=os.environ.get("KDFORGE_SSL_CERTFILE") or None,
                        help="serve HTTPS with this certificate (PEM; default: $KDFORGE_SSL_CERTFILE)")
    parser.add_argument("--ssl-keyfile", type=Path, default=os.environ.get("KDFORGE_SSL_KEYFILE") or None,
                        help="the certificate's private key (PEM, unencrypted; default: $KDFORGE_SSL_KEYFILE)")
    parser.add_argument("--device-report", type=Path, default=os.environ.get("KDFORGE_DEVICE_REPORT") or None,
                        help="serve only a format that passed on the device of this device-report.json (python -m "
                             "kdforge.serve.probe BUNDLE --verify; default: $KDFORGE_DEVICE_REPORT)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = argument_parser().parse_args(argv)
    try:
        run(args.export_dir, args.host, args.port, args.format, args.max_bytes, args.max_batch, args.top_k,
            tuple(p.strip() for p in args.providers.split(",") if p.strip()), args.engine_cache, args.max_pixels,
            args.api_key_file, args.body_timeout, args.max_connections, args.ssl_certfile, args.ssl_keyfile,
            args.device_report, args.header_timeout)
    except KdforgeError as exc:  # ServingError and ImageError are KdforgeErrors
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
