"""One Prometheus endpoint for the whole cluster.

At each scrape every replica's own metrics (`runtime.metrics.Metrics`, the ``wara_lora_requests_info``
gauge included) are fetched and re-exposed with a ``replica`` label, next to the edge's own
series (refusals, per-tenant requests in flight and requests sent again to another replica,
counted in this process) and the cluster's: ``wara_cluster_replicas`` (replicas answering),
``wara_cluster_ready`` and ``wara_cluster_replica_info{replica, pid, node}``.

What a scrape reads of the cluster is the small `Replicas` protocol below, so this module does
not depend on `cluster.Cluster` (which builds a `ClusterMetrics` over itself).
"""

from __future__ import annotations

import logging
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from runtime.metrics import Metrics

from .messages import ReplicaStatus

log = logging.getLogger("wara.serve")
# Counted by the edge, in this process (a replica's series of the same name are left out).
EDGE_FAMILIES = ("wara_refusals", "wara_tenant_requests_inflight", "wara_cluster_retries")


class Replicas(Protocol):
    """What a scrape reads of the cluster."""

    @property
    def replicas(self) -> list[ReplicaStatus]: ...  # those that answered the last status call

    @property
    def ready(self) -> bool: ...

    def replica_metrics(self) -> list[tuple[str, str]]: ...  # (replica, Prometheus text) of each; blocking


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
    process, and ``retries``); `text` and `serve` expose the whole cluster's."""

    def __init__(self, cluster: Replicas) -> None:
        super().__init__()
        self.cluster = cluster
        self.retries = Counter("wara_cluster_retries", "Inference requests sent again to another replica because "
                               "the one serving them stopped before it answered", registry=self.registry)
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
