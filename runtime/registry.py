"""Adapters as models: names, versions (content hashes), leases, the host and device tiers.

* A **version** is one loaded content of a name. Requests *lease* the version current when
  they arrive and hold it until their batch ran, so unload or reload never tears a request:
  the old version drains while new requests see the new one (or NOT_FOUND after an unload).
* The **host tier** keeps folded adapters within a byte budget, least recently used first out,
  pinned ones never; an evicted version is folded again from its source on its next request.
* The **device tier** is the engine's fixed slots; a version gets a slot when a batch needs it
  and gives it up, least recently used first, when no running batch uses it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wara_train.artifact import WaraAdapter, adapter_from_files, read_artifact_files
from wara_train.errors import ConfigError, IncompatibleAdapterError

from .engine import Folded, TorchEngine
from .errors import ModelNotFound, Overloaded


@dataclass(eq=False)
class Version:
    """One loaded content of an adapter name."""

    name: str
    version: str  # the artifact's content hash
    base_model: str
    labels: list[str] | None
    source: dict[str, bytes]  # the artifact files, to fold again after a host-tier eviction
    folded: Folded | None
    nbytes: int
    pinned: bool = False
    merged: Any = None  # a merged copy of the base for this adapter (the fast path), or None
    leases: int = 0
    retired: bool = False
    slot: int | None = None
    loaded_at: float = field(default_factory=time.time)
    head_size: int | None = None  # outputs of its task head; None: it answers as its base does


def read_dir(root: Path, name: str) -> dict[str, bytes]:
    """The files of adapter ``name`` under the adapter root; NOT_FOUND if there is none. Errors
    name the adapter, never the server's paths."""
    path = root / name
    if not path.is_dir():
        raise ModelNotFound(f"no adapter directory {name!r} under the adapter root")
    return read_artifact_files(path, source=f"adapter {name!r}")


class Registry:
    """Name -> current version, for every base engine; thread-safe."""

    def __init__(self, engines: dict[str, TorchEngine], *, host_budget_bytes: int = 2 << 30) -> None:
        self.engines = engines
        self.host_budget = host_budget_bytes
        self.lock = threading.RLock()
        self.current: dict[str, Version] = {}
        self.host: OrderedDict[int, Version] = OrderedDict()  # id(version) -> version, LRU order
        self.slots: dict[str, list[Version | None]] = {b: [None] * e.num_slots for b, e in engines.items()}
        self.slot_lru: dict[str, OrderedDict[int, None]] = {b: OrderedDict() for b in engines}
        self.stats = {"loads": 0, "unloads": 0, "host_evictions": 0, "slot_evictions": 0}

    # --- load / unload --------------------------------------------------------------------
    def load(self, name: str, files: dict[str, bytes], *, pinned: bool = False, merged: bool = False) -> Version:
        """Validate and fold a new version of ``name``; only then make it current. On any error
        nothing changes."""
        if not name or "/" in name or name in self.engines:
            raise ConfigError(f"invalid adapter name {name!r} (a base model's name or containing '/')")
        adapter = adapter_from_files(files, source=f"adapter {name!r}")
        engine = self.bind(name, adapter)
        folded = engine.prepare(adapter)  # validates against the base, folds
        version = Version(name, adapter.content_hash, engine.base_model, adapter.labels, dict(files), folded,
                          folded.nbytes, pinned=pinned or merged,
                          head_size=int(folded.head[0].shape[0]) if folded.head is not None else None)
        if merged:
            version.merged = engine.build_merged(folded)
        with self.lock:
            old = self.current.get(name)
            self.current[name] = version
            self.host[id(version)] = version
            if old is not None:
                self._retire(old)
            self._enforce_host_budget()
            self.stats["loads"] += 1
        return version

    def bind(self, name: str, adapter: WaraAdapter) -> TorchEngine:
        """The served base this adapter was trained on, found by fingerprint (the base may be
        served under another name than the one the adapter records). FAILED_PRECONDITION,
        naming the adapter's base and every served one, when none fits."""
        order = sorted(self.engines.values(), key=lambda e: e.base_model != adapter.base_model)
        reasons = []
        for engine in order:
            why = engine.mismatch(adapter)
            if why is None:
                return engine
            reasons.append(f"{engine.base_model}: {why}")
        raise IncompatibleAdapterError(
            f"adapter {name!r} was trained on base {adapter.base_model!r} (fingerprint "
            f"{adapter.base_fingerprint[:19]}...), and no served base matches it: " + "; ".join(reasons))

    def unload(self, name: str) -> None:
        with self.lock:
            old = self.current.pop(name, None)
            if old is None:
                raise ModelNotFound(f"no adapter {name!r} is loaded")
            self._retire(old)
            self.stats["unloads"] += 1

    def _retire(self, version: Version) -> None:
        version.retired = True
        if version.leases == 0:
            self._drop(version)

    def _drop(self, version: Version) -> None:
        self.host.pop(id(version), None)
        if version.slot is not None:
            self.slots[version.base_model][version.slot] = None
            self.slot_lru[version.base_model].pop(version.slot, None)
            version.slot = None
        version.folded = None
        version.merged = None

    def _enforce_host_budget(self) -> None:
        used = sum(v.nbytes for v in self.host.values() if v.folded is not None)
        for key in list(self.host):
            if used <= self.host_budget:
                break
            v = self.host[key]
            if v.pinned or v.leases or v.folded is None:
                continue
            v.folded = None
            used -= v.nbytes
            self.stats["host_evictions"] += 1

    # --- leases ---------------------------------------------------------------------------
    def lease(self, name: str) -> Version:
        """The current version of ``name``, held until `release`. NOT_FOUND if unknown."""
        with self.lock:
            v = self.current.get(name)
            if v is None:
                raise ModelNotFound(f"unknown model {name!r}: not a base model and no adapter of that name is loaded")
            v.leases += 1
            if id(v) in self.host:
                self.host.move_to_end(id(v))
            return v

    def release(self, version: Version) -> None:
        with self.lock:
            version.leases -= 1
            if version.retired and version.leases == 0:
                self._drop(version)

    # --- device tier (called by the batcher's worker, between forwards) --------------------
    def assign_slots(self, base_model: str, versions: list[Version]) -> dict[int, int]:
        """Give every version of a batch a slot; returns id(version) -> slot index."""
        engine = self.engines[base_model]
        out = {}
        with self.lock:
            table, lru = self.slots[base_model], self.slot_lru[base_model]
            needed = {id(v): v for v in versions}
            for v in needed.values():
                if v.slot is not None and table[v.slot] is v:
                    lru.move_to_end(v.slot)
                    out[id(v)] = v.slot
                    continue
                free = next((i for i in range(1, len(table)) if table[i] is None), None)
                if free is None:
                    free = next((i for i in lru if id(table[i]) not in needed), None)
                    if free is None:
                        raise Overloaded(f"more distinct adapters in one batch than the {len(table) - 1} slots")
                    table[free].slot = None
                    self.stats["slot_evictions"] += 1
                if v.folded is None:  # evicted from the host tier: fold again from its files
                    v.folded = engine.prepare(adapter_from_files(v.source, source=f"adapter {v.name!r}"))
                    self.host[id(v)] = v
                    self.host.move_to_end(id(v))
                    self._enforce_host_budget()
                engine.write_slot(free, v.folded)
                table[free] = v
                v.slot = free
                lru[free] = None
                lru.move_to_end(free)
                out[id(v)] = free
        return out

    def index(self) -> list[Version]:
        with self.lock:
            return list(self.current.values())
