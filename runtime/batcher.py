"""Dynamic batching across adapters: one worker thread per base model.

Requests queue up; the worker takes the first, then keeps adding requests (of any adapter, or
the base) until the batch holds ``max_batch`` rows or ``max_delay`` has passed since the first
arrived. A batch is filled fairly: one request from each tenant in turn (in order of their
oldest request, starting after the tenant that led the last batch), so a tenant with a thousand
queued requests takes one row in turn with a tenant that has one. The queue is bounded in
requests (``max_queue``) and in input bytes (``max_queued_bytes``): past either, RESOURCE_EXHAUSTED
at once. When more distinct adapters are queued than the pool holds, requests whose
adapter is already resident go first (no slot miss, no fold), but a request that has waited
``resident_wait_ms`` goes first whatever its adapter, so none starves. Text rows are padded to the longest sequence (the attention mask keeps the result the
same); images must share a size to share a batch. Each request's future gets its own rows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
import torch

from .errors import DeadlineExceeded, Draining, Overloaded


@dataclass(eq=False)
class Request:
    inputs: tuple[torch.Tensor, ...]  # each (rows, ...)
    version: object | None  # a leased `runtime.adapters.host.Version`; None: the base model
    model: str = ""  # the name the client asked for (metrics)
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.perf_counter)
    deadline: float | None = None
    tenant: str = "-"

    @property
    def rows(self) -> int:
        return self.inputs[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.inputs)


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    mixed_batches: int = 0  # batches holding rows of two or more different models
    max_models_in_batch: int = 0
    merged_batches: int = 0  # batches run on a merged copy (one merged adapter only)
    batch_sizes: list[int] = field(default_factory=list)


class Batcher:
    def __init__(self, engine, device, *, max_batch: int = 32, max_delay_ms: float = 5.0,
                 max_queue: int = 1024, max_queued_bytes: int = 1 << 30, resident_wait_ms: float = 50.0, on_batch=None, on_start=None, on_end=None, on_expire=None) -> None:
        self.engine = engine  # forward(inputs, slots), forward_merged, base_model, pages
        self.device = device  # the base's device tier: place(versions) -> (slots, deferred, failed)
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.max_queued_bytes = max_queued_bytes
        self.resident_wait = resident_wait_ms / 1000.0
        self.queued_bytes = 0
        self.last_lead: str | None = None  # the tenant first in the last batch
        self.queue: deque[Request] = deque()
        self.cond = threading.Condition()
        self.stats = BatchStats()
        self.on_batch = on_batch
        self.on_start = on_start  # called with a batch's requests before its forward
        self.on_end = on_end  # ... and after it, whatever happened
        self.on_expire = on_expire  # called with requests dropped because their deadline passed
        self.running = True
        self.thread = threading.Thread(target=self._loop, name=f"batcher-{engine.base_model}", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Future:
        with self.cond:
            if not self.running:
                raise Draining("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise Overloaded(f"base {self.engine.base_model!r}: the queue is full ({self.max_queue} requests); retry later")
            nbytes = request.nbytes
            if self.queue and self.queued_bytes + nbytes > self.max_queued_bytes:
                raise Overloaded(f"base {self.engine.base_model!r}: queued inputs would take "
                                 f"{self.queued_bytes + nbytes} bytes, over max_queued_mb; retry later")
            self.queued_bytes += nbytes
            self.queue.append(request)
            self.cond.notify()
        return request.future

    def pending(self) -> int:
        with self.cond:
            return len(self.queue)

    def stop(self) -> None:
        """Finish what is queued, then stop the worker."""
        with self.cond:
            self.running = False
            self.cond.notify()
        self.thread.join()

    def _take(self) -> list[Request]:
        with self.cond:
            while not self.queue and self.running:
                self.cond.wait()
            if not self.queue:
                return []
            first = self.queue[0]
            until = first.arrived + self.max_delay
            while self.running:
                rows = sum(r.rows for r in self.queue)
                left = until - time.perf_counter()
                if rows >= self.max_batch or left <= 0:
                    break
                self.cond.wait(timeout=left)
            batch, rows, models, pages = [], 0, set(), 0
            limit = self.engine.pages
            keep: deque[Request] = deque()
            order = self._prefer_resident(self._fair_order())
            self.queue.clear()
            for r in order:
                model = id(r.version) if r.version is not None else None
                fits = rows + r.rows <= self.max_batch or not batch
                same_shape = not batch or self._compatible(batch[0], r)
                new_model = model is not None and model not in models
                if fits and same_shape and not (new_model and models and pages + r.version.pages > limit):
                    batch.append(r)
                    self.queued_bytes -= r.nbytes
                    rows += r.rows
                    if new_model:
                        models.add(model)
                        pages += r.version.pages
                else:
                    keep.append(r)
            self.queue.extend(sorted(keep, key=lambda r: r.arrived))
            if batch:
                self.last_lead = batch[0].tenant
            return batch

    def _prefer_resident(self, order: list[Request]) -> list[Request]:
        """``order`` regrouped, each group keeping the tenants' turns: requests that have waited
        ``resident_wait`` first (none starves), then those that cost no slot miss (the base, an
        adapter in a slot), then the rest. Reading ``slot`` unlocked is a hint:
        `DeviceTier.place` decides under its lock."""
        now = time.perf_counter()
        waited, resident, rest = [], [], []
        for r in order:
            if now - r.arrived >= self.resident_wait:
                waited.append(r)
            elif r.version is None or r.version.slot is not None:
                resident.append(r)
            else:
                rest.append(r)
        return waited + resident + rest

    def _fair_order(self) -> list[Request]:
        """The queue in the order a batch is filled: round robin over tenants (each tenant's
        requests oldest first; tenants by their oldest request, the last batch's lead last)."""
        by_tenant: dict[str, deque[Request]] = {}
        for r in self.queue:
            by_tenant.setdefault(r.tenant, deque()).append(r)
        if len(by_tenant) == 1:
            return list(self.queue)
        tenants = list(by_tenant)
        if self.last_lead in by_tenant and len(tenants) > 1:
            tenants.remove(self.last_lead)
            tenants.append(self.last_lead)
        order: list[Request] = []
        while tenants:
            for t in list(tenants):
                order.append(by_tenant[t].popleft())
                if not by_tenant[t]:
                    tenants.remove(t)
        return order

    def _compatible(self, a: Request, b: Request) -> bool:
        if len(a.inputs) != len(b.inputs):
            return False
        if a.inputs[0].dtype in (torch.int64, torch.int32):  # token ids: pad sequences
            return True
        return a.inputs[0].shape[1:] == b.inputs[0].shape[1:]

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            now = time.perf_counter()
            live, expired = [], []
            for r in batch:
                (expired if r.deadline is not None and now > r.deadline else live).append(r)
            if expired and self.on_expire is not None:
                self.on_expire(expired)
            for r in expired:
                r.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
            if live:
                self._run(live)

    def _requeue(self, requests: list[Request]) -> None:
        """Put requests back, in arrival order (their adapters found no room this time)."""
        with self.cond:
            self.queue = deque(sorted([*requests, *self.queue], key=lambda r: r.arrived))
            self.queued_bytes += sum(r.nbytes for r in requests)

    def _place(self, batch: list[Request]) -> tuple[list[Request], dict[int, int] | None, bool]:
        """(requests that run now, their slots or None for the merged copy, merged). Requests
        whose adapter could not be made ready fail here, alone."""
        first = batch[0].version
        if first is not None and first.merged is not None and all(r.version is first for r in batch):
            return batch, None, True
        versions = [r.version for r in batch if r.version is not None]
        slot_of, deferred, failed = self.device.place(versions) if versions else ({}, [], {})
        batch = self._fail(batch, failed)
        if not deferred:
            return batch, slot_of, False
        later = {id(v) for v in deferred}
        now = [r for r in batch if r.version is None or id(r.version) not in later]
        self._requeue([r for r in batch if r.version is not None and id(r.version) in later])
        # The pool is held by queued requests of resident adapters: run them now, so their
        # adapters can make room for the deferred ones once no request holds them.
        extra = self._take_resident(sum(r.rows for r in now), now[0] if now else None)
        if extra:
            more, still, failed = self.device.place([r.version for r in extra if r.version])
            extra = self._fail(extra, failed)
            slot_of.update(more)
            if still:  # not resident after all (evicted meanwhile): back to the queue
                gone = {id(v) for v in still}
                self._requeue([r for r in extra if r.version is not None and id(r.version) in gone])
                extra = [r for r in extra if r.version is None or id(r.version) not in gone]
            now += extra
        if not now:
            time.sleep(0.001)
        return now, slot_of, False

    def _fail(self, requests: list[Request], failed: dict[int, BaseException]) -> list[Request]:
        """Fail the requests whose adapter is in ``failed`` (id(version) -> error); the rest."""
        if not failed:
            return requests
        gone = [r for r in requests if r.version is not None and id(r.version) in failed]
        if self.on_expire is not None:
            self.on_expire(gone)  # no longer waiting
        for r in gone:
            if not r.future.done():
                r.future.set_exception(failed[id(r.version)])
        return [r for r in requests if r.version is None or id(r.version) not in failed]

    def _take_resident(self, rows: int, like: Request | None) -> list[Request]:
        """Queued requests whose adapter is in the pool (or the base), up to a full batch."""
        taken, keep = [], deque()
        with self.cond:
            for r in self.queue:
                resident = r.version is None or r.version.slot is not None
                if (resident and rows + r.rows <= self.max_batch and (like is None or self._compatible(like, r))):
                    taken.append(r)
                    rows += r.rows
                    like = like or r
                else:
                    keep.append(r)
            self.queue = keep
            self.queued_bytes -= sum(r.nbytes for r in taken)
        return taken

    def _run(self, batch: list[Request]) -> None:
        """Forward one batch. ``on_end`` runs before any request's future is resolved, so a
        client that has its answer never sees its request still counted as running."""
        try:
            batch, slot_of, merged = self._place(batch)
        except Exception as e:  # a broken placement fails its batch, never the worker
            if self.on_expire is not None:
                self.on_expire(batch)  # no longer waiting
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(e)
            return
        if not batch:
            return
        if self.on_start is not None:
            self.on_start(batch)
        error = None
        try:
            outputs, merged = self._forward(batch, slot_of, merged)
        except Exception as e:  # a failed batch fails its own requests, never the worker
            error = e
        finally:
            if self.on_end is not None:
                self.on_end(batch)
        if error is not None:
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(error)
            return
        self._finish(batch, outputs, merged=merged)

    def _forward(self, batch: list[Request], slot_of: dict[int, int] | None, merged: bool) -> tuple[list, bool]:
        """(one output row per input row, whether the merged copy ran)."""
        first = batch[0].version
        # Read once: another thread may drop the merged copy between a check and a use.
        copy = first.merged if merged and first is not None else None
        if copy is not None:
            return self.engine.forward_merged(copy, first.head, _concat([r.inputs for r in batch])), True
        if slot_of is None:  # the merged copy went since `_place`: place the batch now
            versions = [r.version for r in batch if r.version is not None]
            slot_of, deferred, failed = self.device.place(versions)
            if failed:
                raise next(iter(failed.values()))
            if deferred:
                raise Overloaded("the device pool has no room for this batch's adapters; retry")
        slots: list[int] = []
        for r in batch:
            slots += [slot_of[id(r.version)] if r.version is not None else 0] * r.rows
        return self.engine.forward(_concat([r.inputs for r in batch]), slots), False

    def _finish(self, batch: list[Request], outputs: list, *, merged: bool = False) -> None:
        s = self.stats
        rows = len(outputs)
        s.batches += 1
        s.rows += rows
        s.batch_sizes.append(rows)
        if merged:
            s.merged_batches += 1
        distinct = {id(r.version) if r.version is not None else None for r in batch}
        s.max_models_in_batch = max(s.max_models_in_batch, len(distinct))
        if len(distinct) > 1:
            s.mixed_batches += 1
        if self.on_batch is not None:
            self.on_batch(self.engine.base_model, rows)
        start = 0
        for r in batch:
            r.future.set_result(outputs[start : start + r.rows])
            start += r.rows


def _concat(parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Stack requests' inputs along the batch; integer (token) inputs are right-padded with 0."""
    out = []
    for k in range(len(parts[0])):
        ts = [p[k] for p in parts]
        if ts[0].dim() == 2 and ts[0].dtype in (torch.int64, torch.int32):
            width = max(t.shape[1] for t in ts)
            ts = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in ts]
        out.append(torch.cat(ts, 0))
    return tuple(out)

