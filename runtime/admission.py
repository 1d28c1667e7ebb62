"""Admission at the edge: what the server has accepted and not yet answered, per tenant and in
all, in requests and bytes. Past a bound a request is refused at once (`Refused`,
RESOURCE_EXHAUSTED), never queued without bound."""

from __future__ import annotations

import asyncio
from collections import Counter

from .auth import OPEN, Tenant
from .config import ServeConfig
from .errors import Draining, Overloaded


class Refused(Overloaded):
    """An admission refusal (RESOURCE_EXHAUSTED), with its metric reason."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Admission:
    """What the edge has accepted and not yet answered: requests per tenant and in all, and
    their bytes. Touched only from the event loop thread, so it needs no lock."""

    def __init__(self, config: ServeConfig, gauge=None) -> None:
        self.gauge = gauge  # requests in flight per tenant (metrics)
        self.max_inflight = config.max_inflight
        self.max_bytes = config.max_queued_mb << 20
        self.inflight = 0
        self.nbytes = 0
        self.per_tenant: Counter[str] = Counter()
        self.closing = False
        self.idle = asyncio.Event()
        self.idle.set()

    def admit(self, tenant: Tenant, nbytes: int) -> None:
        if self.closing:
            raise Draining("the server is shutting down and takes no new requests")
        if tenant is not OPEN and self.per_tenant[tenant.name] >= tenant.max_queue:
            raise Refused(f"tenant {tenant.name!r} has {tenant.max_queue} requests in flight, its max_queue; "
                          "retry later", "tenant_queue_full")
        if self.inflight >= self.max_inflight:
            raise Refused(f"the server has {self.max_inflight} requests in flight (max_inflight); retry later",
                          "server_busy")
        if self.inflight and self.nbytes + nbytes > self.max_bytes:
            raise Refused(f"the server holds {self.nbytes} bytes of requests in flight; this one would pass "
                          "max_queued_mb; retry later", "server_busy_bytes")
        self.inflight += 1
        self.nbytes += nbytes
        self.per_tenant[tenant.name] += 1
        self.idle.clear()
        if self.gauge is not None:
            self.gauge.labels(tenant.name).inc()

    def release(self, tenant: Tenant, nbytes: int) -> None:
        self.inflight -= 1
        self.nbytes -= nbytes
        self.per_tenant[tenant.name] -= 1
        if self.gauge is not None:
            self.gauge.labels(tenant.name).dec()
        if not self.per_tenant[tenant.name]:
            del self.per_tenant[tenant.name]
        if not self.inflight:
            self.idle.set()
