"""The gateway's Prometheus metrics (GET /metrics), named like vLLM's where an equivalent exists."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    """One registry per app, so several gateways (tests) can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tokenwire_gateway_requests", "HTTP requests by route and status", ["route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "tokenwire_gateway_request_duration_seconds", "Time to the response head (streams: first chunk)",
            ["route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )  # fmt: skip
        self.streams = Gauge("tokenwire_gateway_open_streams", "SSE streams in progress", registry=self.registry)
        self.events = Counter("tokenwire_gateway_sse_events", "SSE data events written", registry=self.registry)
        self.disconnects = Counter(
            "tokenwire_gateway_client_disconnects", "Streams whose HTTP client left before the end",
            registry=self.registry,
        )  # fmt: skip
