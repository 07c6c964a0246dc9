"""The service's Prometheus metrics (`--metrics-port`), named like vLLM's where an equivalent exists.

Gauges read the engine's own counters when scraped, so nothing on the hot path updates them; latency histograms
are observed on the RPC side, where a request's events arrive.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .engine import Engine

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    """One registry per service (tests run several in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge("tokenwire:num_requests_running", "Requests in the engine's step loop", registry=r)
        self.waiting = Gauge("tokenwire:num_requests_waiting", "Requests waiting to be admitted", registry=r)
        self.generation_tokens = Counter("tokenwire:generation_tokens", "Generated tokens", registry=r)
        self.cancellations = Counter("tokenwire:request_cancellations", "Requests whose client went away",
                                     registry=r)  # fmt: skip
        self.rejected = Counter("tokenwire:requests_rejected", "Requests refused by backpressure", ["reason"],
                                registry=r)  # fmt: skip
        self.finished = Counter("tokenwire:request_success", "Finished choices by reason", ["finished_reason"],
                                registry=r)  # fmt: skip
        self.ttft = Histogram("tokenwire:time_to_first_token_seconds", "Submit to first token", buckets=_LATENCY,
                              registry=r)  # fmt: skip
        self.itl = Histogram("tokenwire:inter_token_latency_seconds", "Between a request's token events",
                             buckets=_LATENCY, registry=r)  # fmt: skip
        self.e2e = Histogram("tokenwire:e2e_request_latency_seconds", "Submit to the last event", buckets=_LATENCY,
                             registry=r)  # fmt: skip
        self.kv_usage = Gauge("tokenwire:kv_cache_usage_perc", "Fraction of the paged KV cache's blocks in use",
                              registry=r)  # fmt: skip
        self.preemptions = Counter("tokenwire:num_preemptions", "Groups preempted (KV cache full; recomputed later)",
                                   registry=r)  # fmt: skip
        self._seen_tokens = 0
        self._seen_cancellations = 0
        self._seen_preemptions = 0

    def bind(self, engine: Engine) -> None:
        """Read the engine's counters at scrape time."""
        self.running.set_function(lambda: float(engine.num_stepping()))
        self.waiting.set_function(lambda: float(engine.num_waiting()))
        self.kv_usage.set_function(engine.kv_usage)
        self._engine = engine

    def sync(self) -> None:
        """Carry the engine's monotonic counters over (called from the event loop after each request)."""
        engine = getattr(self, "_engine", None)
        if engine is None:
            return
        tokens, cancels = engine.generated_tokens, engine.cancellations
        self.generation_tokens.inc(max(0, tokens - self._seen_tokens))
        self.cancellations.inc(max(0, cancels - self._seen_cancellations))
        self._seen_tokens, self._seen_cancellations = tokens, cancels
        self.preemptions.inc(max(0, engine.preemptions - self._seen_preemptions))
        self._seen_preemptions = engine.preemptions

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics on its own port (a thread); return the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
