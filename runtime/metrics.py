"""Prometheus metrics of one server (its own registry, so several servers fit in one process).

Label cardinality is bounded: a model label exists only while that model is loaded (unknown
names share one ``<unknown>`` label, and `forget` drops an unloaded adapter's series); tenants
come from the config; refusal reasons and outcomes are a fixed set of names."""

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
        self.tier_load = Histogram("wara_adapter_tier_load_seconds", "Time an adapter takes to enter a tier: host (read "
                                   "from the adapter root and checked), device (folded and written to the pool)",
                                   ["tier"], registry=r,
                                   buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))

        self.kernel = Gauge("wara_kernel_info", "The adapter kernel serving each base (1): the native op or the pure "
                            "PyTorch one, and why", ["base", "kernel"], registry=r)
        self.refusals = Counter("wara_refusals", "Requests refused at the edge, by reason (unauthenticated, "
                                "not_admin, tenant_queue_full, server_busy, draining, ...)", ["reason"], registry=r)
        self.tenant_inflight = Gauge("wara_tenant_requests_inflight", "Requests accepted and not yet answered, per tenant",
                                     ["tenant"], registry=r)

    def add_lora_info(self, snapshot) -> None:
        """``wara_lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}``, the
        gauge gateways read for adapter-affinity routing (vLLM's ``lora_requests_info``): built at
        each scrape from ``snapshot() -> (running names, waiting names, max_lora)``, so only the
        current label set exists. Its value is the scrape time."""
        import time

        from prometheus_client.core import GaugeMetricFamily

        class LoraInfo:
            def collect(self):
                running, waiting, max_lora = snapshot()
                family = GaugeMetricFamily("wara_lora_requests_info", "Adapters with running and waiting requests",
                                           labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
                family.add_metric([",".join(sorted(running)), ",".join(sorted(waiting)), str(max_lora)], time.time())
                yield family

        self.registry.register(LoraInfo())

    def add_tiers(self, snapshot) -> None:
        """Per tier, at each scrape: ``wara_adapters_resident{tier}`` and
        ``wara_adapter_bytes_resident{tier}`` (disk: adapters under the root not loaded, bytes of their files;
        host: own factors in memory; device: pages in the pool), and ``wara_adapter_tier_lookups_total{tier,
        result}`` (hit or miss when a batch needs an adapter). ``snapshot() -> (tiers, stats)``
        with tiers ``{name: (count, bytes)}`` and the registry's counters."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        class Tiers:
            def collect(self):
                tiers, stats = snapshot()
                count = GaugeMetricFamily("wara_adapters_resident", "Adapters per tier", labels=["tier"])
                size = GaugeMetricFamily("wara_adapter_bytes_resident", "Adapter bytes per tier", labels=["tier"])
                for tier, (n, nbytes) in tiers.items():
                    count.add_metric([tier], n)
                    if nbytes is not None:
                        size.add_metric([tier], nbytes)
                lookups = CounterMetricFamily("wara_adapter_tier_lookups", "Tier lookups when a batch needs an adapter",
                                              labels=["tier", "result"])
                for tier in ("device", "host"):
                    prefix = "slot" if tier == "device" else "host"
                    lookups.add_metric([tier, "hit"], stats[f"{prefix}_hits"])
                    lookups.add_metric([tier, "miss"], stats[f"{prefix}_misses"])
                yield count
                yield size
                yield lookups

        self.registry.register(Tiers())

    def add_pack_cache(self, snapshot) -> None:
        """At each scrape, where ``snapshot()`` (`runtime.native.pack_cache_stats`) is not None:
        ``wara_pack_cache_entries``, ``wara_pack_cache_bytes``, ``wara_pack_cache_capacity_bytes``
        and ``wara_pack_cache_lookups_total{result}`` of the CPU op's packed-factor cache."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        class PackCache:
            def collect(self):
                stats = snapshot()
                if stats is None:
                    return
                for name, what in (("entries", "Slots' packed factors kept by the CPU wavelet op"),
                                   ("bytes", "Bytes of packed factors kept by the CPU wavelet op"),
                                   ("capacity_bytes", "Bound of the CPU wavelet op's packed-factor cache "
                                                      "(WARA_PACK_CACHE_MB)")):
                    yield GaugeMetricFamily(f"wara_pack_cache_{name}", what, value=stats[name])
                lookups = CounterMetricFamily("wara_pack_cache_lookups", "Packed-factor cache lookups by the CPU "
                                              "wavelet op (a miss packs the slot)", labels=["result"])
                lookups.add_metric(["hit"], stats["hits"])
                lookups.add_metric(["miss"], stats["misses"])
                yield lookups

        self.registry.register(PackCache())

    def forget(self, model: str) -> None:
        """Drop the request-count series labelled with ``model`` (an adapter that was unloaded;
        its gauges are the service's to drop once they are back at 0)."""
        for metric in (self.requests,):
            for labels in list(metric._metrics):  # prometheus_client keeps a dict of label tuples
                if labels[0] == model:
                    metric.remove(*labels)

    def observe_tier_load(self, tier: str, seconds: float) -> None:
        self.tier_load.labels(tier).observe(seconds)

    def observe_batch(self, base: str, rows: int) -> None:
        self.batch_size.labels(base).observe(rows)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Expose /metrics over plain HTTP on ``host:port``; returns (server, thread).

        The endpoint has no authentication and no TLS, and its labels name every tenant
        (``wara_tenant_requests_inflight``) and every loaded adapter (``wara_requests``,
        ``wara_lora_requests_info``: which ones run or wait now). Keep ``host`` loopback and
        scrape from the same host or through an authenticating proxy; the server logs a warning
        at start when ``metrics_host`` is not loopback (`runtime.server.Server._warn_if_open`)."""
        return start_http_server(port, addr=host, registry=self.registry)
