"""One Ray Serve replica: a whole serving core (`Service`) behind the few methods `cluster.Cluster`
calls, each a call of the service's own API (`runtime.core.ServingCore`).

Inference for an adapter arrives with the adapter's name as Ray's multiplexed model id; the
service loads an adapter on disk itself, and once this replica has served it, `_adapter`
(``@serve.multiplexed``) records it as held here, for the router
(`router.AdapterAffinityRouter`). Repository changes come as ops of the cluster's log
(`repository.RepositoryLog`) and are applied in order, once each (`sync`); a replica Ray starts
later applies the whole log before it takes a request. An adapter unloaded through the cluster
stays NOT_FOUND here even where this replica never had it (``unloaded``), until a load through
the cluster.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from typing import Any, AsyncIterator

import ray
from ray import serve

from runtime.auth import OPEN, Tenant
from runtime.config import ServeConfig
from runtime.core import Answer, IndexRow, ModelInfo, Piece
from runtime.errors import ModelNotFound
from runtime.names import unknown_model
from runtime.service import Service

from .messages import Failed, Op, Outcome, ReplicaStatus, failed

log = logging.getLogger("wara.serve")
KEEP_OUTCOMES = 256  # outcomes of recent ops kept for a broadcast that asks after the replica applied them


class WaraReplica:
    async def __init__(self, config: ServeConfig, log_name: str, namespace: str) -> None:  # type: ignore[misc]
        """Ray Serve awaits an async constructor: the replica takes no request before the
        cluster's repository log so far is applied (a replacement replica catches up here)."""
        import torch

        if config.ray is not None:  # its share of the node's cores, not all of them
            torch.set_num_threads(max(1, int(config.ray.replica_cpus)))
        self.tag = serve.get_replica_context().replica_id.unique_id
        self.service = Service(config)
        self.bases = frozenset(e.name for e in config.bases)
        self.unloaded: set[str] = set()
        self.applied = 0
        self.outcomes: collections.OrderedDict[int, Outcome] = collections.OrderedDict()
        self._sync_lock = asyncio.Lock()
        self.log = ray.get_actor(log_name, namespace=namespace)
        head, ops = await self.log.since.remote(0)
        await self._apply_all(ops, head)
        log.info("replica %s ready (pid %d): %d repository ops applied", self.tag, os.getpid(), len(ops))

    def _refuse_unloaded(self, name: str) -> None:
        if name in self.unloaded:
            raise ModelNotFound(unknown_model(name))

    # --- inference --------------------------------------------------------------------------
    @serve.multiplexed(max_num_models_per_replica=-1)
    async def _adapter(self, name: str) -> str:
        """Record ``name`` as held here (called once this replica served it)."""
        return name

    async def infer(self, name: str, inputs: dict, timeout: float, version: str,
                    tenant: Tenant = OPEN) -> Answer | Failed:
        try:
            self._refuse_unloaded(name)
            answer = await self.service.infer(name, inputs, tenant=tenant, timeout=timeout, version=version)
            if name not in self.bases:
                await self._adapter(name)
            return answer
        except Exception as e:
            return failed(e, self.tag)

    async def generate(self, name: str, prompt: str, params: dict[str, Any],
                       tenant: Tenant = OPEN) -> AsyncIterator[Piece | Failed]:
        """Streamed (``stream=True``): the service's pieces; an error ends the stream as a
        `Failed`. Ray cancels this when the edge closes its end, and the service's generation
        is closed with it."""
        pieces = None
        try:
            self._refuse_unloaded(name)
            pieces = self.service.generate(name, prompt, params, tenant=tenant)
            async for piece in pieces:
                yield piece
        except Exception as e:
            yield failed(e, self.tag)
        finally:
            if pieces is not None and hasattr(pieces, "aclose"):
                await pieces.aclose()

    # --- metadata and readiness -------------------------------------------------------------
    async def metadata(self, name: str, tenant: Tenant = OPEN, load: bool = True) -> ModelInfo | Failed:
        """The service's description of ``name``, an adapter on disk loaded first (and then
        recorded as held here); without ``load``, only of what this replica serves already."""
        try:
            self._refuse_unloaded(name)
            if not load and self.service.repository.needs_load(name, tenant):
                raise ModelNotFound(unknown_model(name))  # on disk, not loaded here
            info = await self.service.metadata(name, tenant=tenant)
            if load and name not in self.bases:
                await self._adapter(name)
            return info
        except Exception as e:
            return failed(e, self.tag)

    async def model_ready(self, name: str, version: str = "", tenant: Tenant = OPEN) -> bool:
        try:
            return name not in self.unloaded and await self.service.model_ready(name, version, tenant=tenant)
        except Exception as e:
            log.warning("replica %s: model_ready(%r) failed: %s", self.tag, name, e)
            return False

    # --- repository -------------------------------------------------------------------------
    async def index(self, tenant: Tenant = OPEN) -> list[IndexRow]:
        """The service's index for ``tenant``, with adapters unloaded through the cluster marked so."""
        rows = await self.service.index(tenant=tenant)
        return [IndexRow(r.name, r.version, r.state, "unloaded") if r.name in self.unloaded and r.state != "READY"
                else r for r in rows]

    async def holds(self, name: str) -> bool:
        return any(r.name == name and r.state == "READY" for r in await self.service.index())

    async def sync(self, seq: int) -> Outcome | None:
        """Apply the log's ops up to at least ``seq``, in order; the outcome of op ``seq`` here
        (None: it was voided before this replica saw it)."""
        async with self._sync_lock:
            if self.applied < seq:
                head, ops = await self.log.since.remote(self.applied)
                await self._apply_all(ops, head)
        return self.outcomes.get(seq)

    async def _apply_all(self, ops: list[Op], head: int) -> None:
        """Apply ``ops`` (the log after `applied`, up to ``head``: voided ops are not in it)."""
        for op in ops:
            if op.seq <= self.applied:
                continue
            self.outcomes[op.seq] = await self._apply(op)
            self.applied = op.seq
            while len(self.outcomes) > KEEP_OUTCOMES:
                self.outcomes.popitem(last=False)
        self.applied = max(self.applied, head)

    async def _apply(self, op: Op) -> Outcome:
        try:
            if op.kind == "load":
                version = await self.service.load(op.name, op.files)
                self.unloaded.discard(op.name)
                return Outcome(had=True, version=version)
            try:
                await self.service.unload(op.name)
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
        return ReplicaStatus(self.tag, os.getpid(), ray.util.get_node_ip_address(), bool(self.service.ready),
                             self.applied)

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
