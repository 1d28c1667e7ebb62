"""The single server's gRPC edge over a `Cluster`.

`runtime.server.InferenceServicer` reads the service synchronously on its event loop in a few
handlers (model metadata and readiness, the index, unload). On one process that is a dictionary
lookup; on the cluster it is a broadcast to the replicas, which must not hold up the event loop.
Each of those handlers here awaits the cluster's answer first (`Cluster.ask`, off the loop) and
then runs the single server's own handler, whose synchronous call finds the answer ready. So the
protocol, auth, admission and error mapping are the single server's code, not a copy of it.
"""

from __future__ import annotations

from runtime.auth import require_admin
from runtime.server import InferenceServicer, Server, _model_name
from runtime.wire import MAX_NAME


class ClusterServicer(InferenceServicer):
    async def _ModelReady(self, request, context, tenant):
        name = request.name
        if len(name) <= MAX_NAME:  # a longer one is refused by the handler without asking
            await self.service.ask(("ready", name), lambda: self.service.readiness_async(name, tenant))
        return await super()._ModelReady(request, context, tenant)

    async def _ModelMetadata(self, request, context, tenant):
        name = request.name
        if len(name) <= MAX_NAME:
            await self.service.ask(("describe", name), lambda: self.service.describe_async(name, tenant, load=True))
        return await super()._ModelMetadata(request, context, tenant)

    async def _RepositoryIndex(self, request, context, tenant):
        await self.service.ask(("index",), self.service.index_async)
        return await super()._RepositoryIndex(request, context, tenant)

    async def _RepositoryModelUnload(self, request, context, tenant):
        require_admin(tenant)  # before anything changes, as the handler does
        name = _model_name(request.model_name)
        await self.service.ask(("unload", name), lambda: self.service.unload_async(name))
        return await super()._RepositoryModelUnload(request, context, tenant)


class ClusterServer(Server):
    """`runtime.server.Server` over a `Cluster`: ``server.service`` is the cluster."""

    servicer_class = ClusterServicer
