"""Prometheus metrics of the server at GET /metrics (prometheus-client, the text format every scraper reads):

    kdforge_requests_total{route, method, status}        requests answered, by route template and status
    kdforge_request_duration_seconds{route, format}      latency histogram per route and served format
    kdforge_requests_in_flight                           requests being answered now
    kdforge_model_info{model, recipe, format, sha256, provider}   the served file (always 1)
    kdforge_ready                                        1 once the model is loaded and warm, 0 while stopping

Routes are labelled by their template (`/v2/models/{name}/infer`), anything else as "other", so a client cannot
grow the label sets. Each app has its own registry (tests start several).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# seconds: a 2-core CPU answers one 224 image in 5-50 ms; batches of 32 and cold TensorRT engines take seconds
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, info: dict[str, Any]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.format = str(info["format"])
        self.requests = Counter("kdforge_requests", "Requests answered, by route template and HTTP status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("kdforge_request_duration_seconds", "Time to answer a request",
                                 ["route", "format"], buckets=BUCKETS, registry=self.registry)
        self.in_flight = Gauge("kdforge_requests_in_flight", "Requests being answered now", registry=self.registry)
        self.ready = Gauge("kdforge_ready", "1 when the model is loaded and warm and the server not stopping",
                           registry=self.registry)
        Info("kdforge_model", "The served model file", registry=self.registry).info(
            {key: str(info.get(key, "")) for key in ("model", "recipe", "format", "sha256", "provider")})

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, self.format).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def route_of(scope: dict[str, Any], routes: list) -> str:
    """The route template a request is for: the one that answered (set by the router), else the one it would
    have reached (a request refused before routing, e.g. without its API key), else "other" (unknown paths)."""
    from starlette.routing import Match

    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] != Match.NONE), None)
    return getattr(route, "path", None) or "other"
