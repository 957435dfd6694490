"""`python -m kdforge.serve.healthcheck`: the container's HEALTHCHECK. Exit 0 when the server in this container
answers GET /healthz on $KDFORGE_PORT, over HTTPS when it serves HTTPS ($KDFORGE_SSL_CERTFILE is set); else a line
saying why and exit 1."""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request


def main() -> None:
    port = os.environ.get("KDFORGE_PORT", "8000")
    context = None
    if os.environ.get("KDFORGE_SSL_CERTFILE"):
        # the server's own loopback address: its certificate names the host clients use, not 127.0.0.1
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    url = f"{'https' if context else 'http'}://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as answer:
            answer.read()
    except OSError as exc:
        sys.exit(f"unhealthy: {url}: {exc}")


if __name__ == "__main__":
    main()
