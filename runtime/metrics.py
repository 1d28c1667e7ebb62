"""Prometheus metrics of one server (its own registry, so several servers fit in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("wara_requests", "Inference requests by model and outcome", ["model", "outcome"], registry=r)
        self.latency = Histogram("wara_request_latency_seconds", "Inference latency in the server", registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("wara_batch_size", "Rows per forward pass", ["base"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.waiting = Gauge("wara_requests_waiting", "Requests queued for a batch, per model", ["model"], registry=r)
        self.running = Gauge("wara_requests_running", "Requests in the forward pass now, per model", ["model"], registry=r)
        self.loads = Counter("wara_adapter_loads", "Adapter loads (and reloads)", registry=r)
        self.unloads = Counter("wara_adapter_unloads", "Adapter unloads", registry=r)
        self.evictions = Gauge("wara_adapter_evictions", "Host-tier and slot evictions so far", ["tier"], registry=r)
        self.load_latency = Histogram("wara_adapter_load_seconds", "Adapter load latency (validate + fold)", registry=r,
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))

    def observe_batch(self, base: str, rows: int) -> None:
        self.batch_size.labels(base).observe(rows)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Expose /metrics over HTTP; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
