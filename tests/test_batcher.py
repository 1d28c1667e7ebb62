"""The batcher's choice of requests, with a recording engine and device tier (no model): fair turns
over tenants, resident adapters first when slots are short, and a bounded wait for the rest."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from runtime.batcher import Batcher, Request


class Engine:
    """A pool of one page: one adapter per batch; records who ran together."""

    base_model = "b"
    pages = 1

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def forward(self, inputs, slots):
        return [{"x": inputs[0][i]} for i in range(inputs[0].shape[0])]


class Device:
    """A device tier of one slot: placing a version evicts whatever was there."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def place(self, versions):
        for v in versions:  # what is in the one adapter slot now
            for other in self.all:
                other.slot = None
            v.slot = 1
        return {id(v): 1 for v in versions}, [], {}


def version(name: str, slot=None):
    return SimpleNamespace(name=name, slot=slot, merged=None, head=None, pages=1)


def run(requests: list[Request], key=lambda r: r.model, max_batch: int = 32, **kw) -> list[list[str]]:
    """Submit ``requests`` at once; returns each batch as the ``key`` of its requests."""
    engine = Engine()
    device = Device(engine)
    device.all = [r.version for r in requests if r.version is not None]
    order: list[list[str]] = []
    batcher = Batcher(engine, device, max_batch=max_batch, max_delay_ms=30.0,
                      on_start=lambda batch: order.append([key(r) for r in batch]), **kw)
    try:
        for r in requests:
            batcher.submit(r)
        for r in requests:
            r.future.result(timeout=10)
    finally:
        batcher.stop()
    return order


def req(model: str, v, tenant: str = "-", arrived: float | None = None) -> Request:
    r = Request((torch.zeros(1, 4, dtype=torch.int64),), v, model=model, tenant=tenant)
    if arrived is not None:
        r.arrived = arrived
    return r


def test_resident_adapter_goes_first_when_slots_are_short():
    cold, hot = version("cold"), version("hot", slot=1)
    batches = run([req("cold", cold), req("hot", hot), req("hot", hot)])
    assert batches[0] == ["hot", "hot"] and batches[1] == ["cold"]


def test_a_request_that_waited_goes_first_whatever_its_adapter():
    cold, hot = version("cold"), version("hot", slot=1)
    long_ago = time.perf_counter() - 1.0  # waited past resident_wait_ms
    batches = run([req("hot", hot), req("cold", cold, arrived=long_ago)], resident_wait_ms=50.0)
    assert batches[0] == ["cold"] and batches[1] == ["hot"]


def test_tenants_take_turns():
    """Six requests of one tenant queued before one of another, two rows a batch: the other
    tenant's request is in the first batch, not behind all six."""
    requests = [req("b", None, tenant="flood") for _ in range(6)] + [req("b", None, tenant="quiet")]
    order = run(requests, key=lambda r: r.tenant, max_batch=2)
    assert order[0] == ["flood", "quiet"], order
