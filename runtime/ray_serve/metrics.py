"""One Prometheus endpoint for the whole cluster.

At each scrape every replica's own metrics (`runtime.metrics.Metrics`, the ``wara_lora_requests_info``
gauge included) are fetched and re-exposed with a ``replica`` label, next to the edge's own
series (refusals and per-tenant requests in flight, counted in this process) and the cluster's:
``wara_cluster_replicas`` (replicas answering), ``wara_cluster_ready`` and
``wara_cluster_replica_info{replica, pid, node}``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from runtime.metrics import Metrics

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger("wara.serve")
EDGE_FAMILIES = ("wara_refusals", "wara_tenant_requests_inflight")  # counted by the edge, in this process


def relabel(texts: list[tuple[str, str]]) -> list[Metric]:
    """The families of several replicas' Prometheus texts, merged, each sample labelled with its
    replica (``_created`` series dropped; families the edge counts itself left out)."""
    families: dict[str, Metric] = {}
    for replica, text in texts:
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created") or family.name in EDGE_FAMILIES:
                continue
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                merged.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp)
    return list(families.values())


class ClusterMetrics(Metrics):
    """The edge's `Metrics` (its refusal and tenant series are counted here, as in one
    process); `text` and `serve` expose the whole cluster's."""

    def __init__(self, cluster: "Cluster") -> None:
        super().__init__()
        self.cluster = cluster
        self.cluster_registry = CollectorRegistry()
        self.cluster_registry.register(_Collector(self))

    def text(self) -> bytes:
        return generate_latest(self.cluster_registry)

    def serve(self, port: int, host: str = "127.0.0.1"):
        return start_http_server(port, addr=host, registry=self.cluster_registry)


class _Collector:
    def __init__(self, metrics: ClusterMetrics) -> None:
        self.metrics = metrics

    def collect(self):
        cluster = self.metrics.cluster
        for family in self.metrics.registry.collect():
            if family.name in EDGE_FAMILIES:
                yield family
        replicas = cluster.replicas
        count = GaugeMetricFamily("wara_cluster_replicas", "Replicas answering the edge's status call")
        count.add_metric([], len(replicas))
        yield count
        ready = GaugeMetricFamily("wara_cluster_ready", "1 when every replica is ready and up to date")
        ready.add_metric([], 1.0 if cluster.ready else 0.0)
        yield ready
        info = GaugeMetricFamily("wara_cluster_replica_info", "One series per replica answering",
                                 labels=["replica", "pid", "node"])
        for s in replicas:
            info.add_metric([s.replica, str(s.pid), s.node], 1.0)
        yield info
        try:
            texts = cluster.replica_metrics()
        except Exception as e:  # a scrape still answers with what the edge knows
            log.warning("metrics: the replicas did not answer: %s", e)
            return
        yield from relabel(texts)
