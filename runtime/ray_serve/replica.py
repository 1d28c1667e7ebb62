"""One Ray Serve replica: a whole serving core (`Service`) behind a few methods the edge calls.

Inference for an adapter arrives with the adapter's name as Ray's multiplexed model id. The
first request for it on this replica goes through `_adapter` (``@serve.multiplexed``), which
loads it through the service's lazy path from the shared adapter root and so records it as
held here, for the router (`router.AdapterAffinityRouter`). Repository changes come as ops of
the cluster's log (`repository.RepositoryLog`) and are applied in order, once each (`sync`).
An adapter unloaded through the cluster stays NOT_FOUND here even where this replica never had
it (``unloaded``), until a load through the cluster.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading

import ray
from ray import serve

from runtime.auth import OPEN, Tenant
from runtime.config import ServeConfig
from runtime.errors import ModelNotFound
from runtime.registry import unknown_model
from runtime.server import answer
from runtime.service import Service

from .messages import Failed, Op, Outcome, Reply, ReplicaStatus, failed

log = logging.getLogger("wara.serve")
KEEP_OUTCOMES = 256  # outcomes of recent ops kept for a broadcast that asks after the replica applied them


class WaraReplica:
    def __init__(self, config: ServeConfig, log_name: str, namespace: str) -> None:
        import torch

        if config.ray is not None:  # its share of the node's cores, not all of them
            torch.set_num_threads(max(1, int(config.ray.replica_cpus)))
        self.tag = serve.get_replica_context().replica_id.unique_id
        self.service = Service(config)
        self.unloaded: set[str] = set()
        self.applied = 0
        self.outcomes: collections.OrderedDict[int, Outcome] = collections.OrderedDict()
        self._sync_lock = asyncio.Lock()
        self._apply_lock = threading.Lock()
        self.log = ray.get_actor(log_name, namespace=namespace)
        head, ops = ray.get(self.log.since.remote(0))
        self._apply_all(ops, head)  # the cluster's repository so far (a replacement replica catches up here)
        log.info("replica %s ready (pid %d): %d repository ops applied", self.tag, os.getpid(), len(ops))

    # --- inference --------------------------------------------------------------------------
    @serve.multiplexed(max_num_models_per_replica=-1)
    async def _adapter(self, name: str) -> str:
        """Load ``name`` here if it is not (the lazy path, off the event loop); only a name that
        is then served is recorded as held (a ModelNotFound is not)."""
        await asyncio.get_running_loop().run_in_executor(None, self.service.ensure_loaded, name)
        self.service.describe(name)
        return name

    async def infer(self, name: str, inputs: dict, timeout: float, requested_version: str,
                    tenant: Tenant = OPEN) -> Reply | Failed:
        try:
            if name not in self.service.engines:
                if name in self.unloaded or not tenant.may_use(name):
                    raise ModelNotFound(unknown_model(name))
                await self._adapter(name)
            pending = self.service.start(name, inputs, timeout=timeout, requested_version=requested_version,
                                         tenant=tenant)
            version, outputs = await answer(pending)
            return Reply(version, outputs, pending.base, list(pending.truncated), self.tag)
        except Exception as e:
            return failed(e, self.tag)

    async def describe(self, name: str, tenant: Tenant = OPEN, load: bool = False):
        """The service's description of ``name``; with ``load``, an adapter on disk is loaded
        first (ModelMetadata, as on one server: its outputs depend on its head)."""
        try:
            if name in self.unloaded:
                raise ModelNotFound(unknown_model(name))
            if load and name not in self.service.engines and tenant.may_use(name):
                await self._adapter(name)
            return self.service.describe(name, tenant)
        except Exception as e:
            return failed(e, self.tag)

    async def readiness(self, name: str, tenant: Tenant = OPEN) -> tuple:
        """(description or refusal, on disk here and not loaded, and sound as far as the index
        tells): what the single server's ModelReady decides on."""
        answer = await self.describe(name, tenant)
        on_disk = name not in self.unloaded and self.service.needs_load(name, tenant)
        return answer, on_disk, on_disk and bool(self.service.loadable(name))

    # --- repository -------------------------------------------------------------------------
    async def index(self) -> list[tuple[str, str, str, str]]:
        """The service's index, with adapters unloaded through the cluster marked so."""
        return [(n, v, s, "unloaded" if n in self.unloaded and s != "READY" else r) for n, v, s, r in self.service.index()]

    async def holds(self, name: str) -> bool:
        return any(n == name and s == "READY" for n, _, s, _ in self.service.index())

    async def sync(self, seq: int) -> Outcome | None:
        """Apply the log's ops up to at least ``seq``, in order; the outcome of op ``seq`` here
        (None: it was voided before this replica saw it)."""
        async with self._sync_lock:
            if self.applied < seq:
                head, ops = await self.log.since.remote(self.applied)
                await asyncio.get_running_loop().run_in_executor(None, self._apply_all, ops, head)
        return self.outcomes.get(seq)

    def _apply_all(self, ops: list[Op], head: int) -> None:
        """Apply ``ops`` (the log after `applied`, up to ``head``: voided ops are not in it)."""
        with self._apply_lock:
            for op in ops:
                if op.seq <= self.applied:
                    continue
                self.outcomes[op.seq] = self._apply(op)
                self.applied = op.seq
                while len(self.outcomes) > KEEP_OUTCOMES:
                    self.outcomes.popitem(last=False)
            self.applied = max(self.applied, head)

    def _apply(self, op: Op) -> Outcome:
        try:
            if op.kind == "load":
                self.service.load(op.name, op.files)
                self.unloaded.discard(op.name)
                return Outcome(had=True)
            try:
                self.service.unload(op.name)
                had = True
            except ModelNotFound:  # not loaded here; NOT_FOUND here from now on all the same
                had = False
            self.unloaded.add(op.name)
            return Outcome(had=had)
        except Exception as e:
            log.warning("replica %s: repository op %d (%s %s) failed: %s", self.tag, op.seq, op.kind, op.name, e)
            return Outcome(error=failed(e, self.tag))

    # --- health and metrics -----------------------------------------------------------------
    async def status(self, head: int = 0) -> ReplicaStatus:
        """This replica's state; a ``head`` past what it has applied makes it catch up (in the
        background: the edge asks again)."""
        if head > self.applied and not self._sync_lock.locked():
            asyncio.get_running_loop().create_task(self.sync(head))
        bases = {b: (e.platform, self.service.converters[b].text_tokens) for b, e in self.service.engines.items()}
        return ReplicaStatus(self.tag, os.getpid(), ray.util.get_node_ip_address(), bool(self.service.ready),
                             self.applied, bases)

    async def metrics(self) -> tuple[str, str]:
        return self.tag, self.service.metrics.text().decode()

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose service stopped is replaced."""
        if not self.service.ready:
            raise RuntimeError(f"replica {self.tag}: the serving core is not ready (draining or stopped)")

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.drain()
