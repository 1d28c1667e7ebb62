"""The host tier: adapter versions, their leases, and their own factors in host memory.

* A **version** is one loaded content of a name. Requests *lease* the version current when
  they arrive and hold it until their batch ran, so unload or reload never tears a request:
  the old version drains while new requests see the new one (or NOT_FOUND after an unload).
* The tier keeps each adapter's own factors (the artifact's tensors, about half the bytes of
  their folded LoRA) within a byte budget, least recently used first out, pinned ones never;
  an evicted version is read again from the adapter root when it next enters a device slot.
  Adapters a client sent (no file to read again) stay, and count against the budget.
* A version whose files changed or vanished under the root since it was loaded can no longer
  be read back: it is marked ``unavailable`` (not ready; FAILED_PRECONDITION), and stays so
  until an admin loads the name again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from wara_train.artifact import WaraAdapter, adapter_from_files
from wara_train.errors import WaraError

from ..errors import AdapterUnavailable, InternalError, ModelNotFound, Overloaded
from ..names import unknown_model
from .prepare import Folded


@dataclass(eq=False)
class Version:
    """One loaded content of an adapter name."""

    name: str
    version: str  # the artifact's content hash
    base_model: str
    labels: list[str] | None
    # How to read the artifact files again after a host-tier eviction (adapters under the
    # root), and whether they still look as they did at load (size and mtime); None for files
    # a client sent, which are never evicted (nothing to read back).
    source: Callable[[], dict[str, bytes]] | None
    adapter: WaraAdapter | None  # its own factors while in the host tier (None: evicted)
    nbytes: int  # bytes of its own tensors (what the host tier holds)
    pages: int  # pages it takes in the device pool (its folded rank, or fewer for own factors)
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None  # its task head (small; always kept)
    own: bool = False  # its slot holds its own WaRA factors (else the folded LoRA)
    pinned: bool = False
    merged: object = None  # a merged copy of the base for this adapter (the fast path), or None
    leases: int = 0
    retired: bool = False
    slot: int | None = None
    fresh: Folded | None = None  # prepared at load for the request that loaded it; used once
    loaded_at: float = field(default_factory=time.time)
    head_size: int | None = None  # outputs of its task head; None: it answers as its base does
    unchanged: Callable[[], bool] | None = None  # its files on disk still look as at load
    unavailable: str | None = None  # why it can no longer be served (its files changed or vanished)

    @property
    def readable(self) -> bool:
        """Whether its next request can be served: in host memory, or its files unchanged."""
        if self.unavailable is not None:
            return False
        return self.adapter is not None or self.unchanged is None or self.unchanged()


class HostTier:
    """Name -> current version, leases, and the own factors kept within ``budget`` bytes.
    ``prepare(version, adapter)`` makes an adapter read back ready for a slot."""

    def __init__(self, *, budget: int, lock: threading.RLock, stats: dict,
                 prepare: Callable[[Version, WaraAdapter], Folded],
                 observe: Callable[[str, float], None] | None = None) -> None:
        self.budget = budget
        self.lock = lock
        self.stats = stats
        self.prepare = prepare
        self.observe = observe
        self.current: dict[str, Version] = {}
        self.held: OrderedDict[int, Version] = OrderedDict()  # id(version) -> version with own factors, LRU order

    # --- versions -------------------------------------------------------------------------
    def admit(self, version: Version) -> None:
        """Make ``version`` current for its name (under the lock); the old one retires."""
        if version.source is None:  # a client's files cannot be read back: they stay, within the budget
            kept = sum(v.nbytes for v in self.held.values() if v.source is None or v.pinned)
            if kept + version.nbytes > self.budget:
                raise Overloaded(f"adapter {version.name!r}: the host tier holds {kept} bytes of adapters it cannot "
                                 f"evict (sent by clients, or pinned) and this one needs {version.nbytes} more, over "
                                 f"host_budget_mb; unload one first")
        old = self.current.get(version.name)
        self.current[version.name] = version
        self.held[id(version)] = version
        if old is not None:
            self.retire(old)
        self._enforce_budget()

    def remove(self, name: str) -> None:
        old = self.current.pop(name, None)
        if old is None:
            raise ModelNotFound(f"no adapter {name!r} is loaded")
        self.retire(old)

    def retire(self, version: Version) -> None:
        version.retired = True
        if version.leases == 0:
            self._drop(version)

    def _drop(self, version: Version) -> None:
        """Forget a retired version with no requests. Its pages go back when the device tier
        next needs room (the batch worker owns the pool; this may run on any thread)."""
        self.held.pop(id(version), None)
        version.adapter = version.fresh = version.merged = None

    def _enforce_budget(self) -> None:
        used = sum(v.nbytes for v in self.held.values())
        for key in list(self.held):
            if used <= self.budget:
                break
            v = self.held[key]
            if v.pinned or v.leases or v.source is None:
                continue
            del self.held[key]
            v.adapter = v.fresh = None
            used -= v.nbytes
            self.stats["host_evictions"] += 1

    # --- leases ---------------------------------------------------------------------------
    def lease(self, name: str) -> Version:
        """The current version of ``name``, held until `release`. NOT_FOUND if unknown;
        FAILED_PRECONDITION if its files changed under the root since it was loaded."""
        with self.lock:
            v = self.current.get(name)
            if v is None:
                raise ModelNotFound(unknown_model(name))
            if v.unavailable is not None:
                raise AdapterUnavailable(v.unavailable)
            v.leases += 1
            if id(v) in self.held:
                self.held.move_to_end(id(v))
            return v

    def release(self, version: Version) -> None:
        with self.lock:
            version.leases -= 1
            if version.retired and version.leases == 0:
                self._drop(version)

    # --- read back ------------------------------------------------------------------------
    def fold(self, version: Version) -> Folded:
        """A version prepared for a slot, from its own factors in this tier (read again from
        the adapter root first if they were evicted). Blocking I/O and math: call it without
        the lock. `AdapterUnavailable` if its files changed or vanished since it was loaded."""
        with self.lock:
            adapter = version.adapter
            self.stats["host_hits" if adapter is not None else "host_misses"] += 1
        if adapter is None:
            t0 = time.perf_counter()
            adapter = self._read_back(version)
            with self.lock:
                if not version.retired or version.leases:
                    version.adapter = adapter
                    self.held[id(version)] = version
                    self._enforce_budget()
            if self.observe is not None:
                self.observe("host", time.perf_counter() - t0)
        return self.prepare(version, adapter)

    def _read_back(self, v: Version) -> WaraAdapter:
        """The adapter a version was loaded from, read again from the root; it must still be
        the content that was loaded (its hash)."""
        if v.source is None:
            raise InternalError(f"adapter {v.name!r} left the host tier with nothing to read it back from")
        try:
            adapter = adapter_from_files(v.source(), source=f"adapter {v.name!r}")
            changed = adapter.content_hash != v.version
        except WaraError:  # vanished, unreadable or no longer valid
            changed = True
        if changed:
            v.unavailable = (f"adapter {v.name!r} changed or vanished under the adapter root since it was loaded "
                             f"(version {v.version[:12]}); an admin must load it again to serve it")
            raise AdapterUnavailable(v.unavailable)
        return adapter

    def resident(self) -> tuple[int, int]:
        """(adapters, bytes) whose own factors are in memory."""
        with self.lock:
            host = [v for v in self.held.values() if v.adapter is not None]
            return len(host), sum(v.nbytes for v in host)
