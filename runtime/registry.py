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
from typing import Any, Callable

import torch

from wara_train.artifact import WaraAdapter, adapter_from_files, path_inside, read_artifact_files
from wara_train.errors import AdapterError, ConfigError, IncompatibleAdapterError

from .engine import Folded, TorchEngine
from .errors import ModelNotFound, Overloaded, clip


@dataclass(eq=False)
class Version:
    """One loaded content of an adapter name."""

    name: str
    version: str  # the artifact's content hash
    base_model: str
    labels: list[str] | None
    # The artifact files, to fold again after a host-tier eviction: kept in memory for files a
    # client sent, read again from the adapter root (a callable) for adapters that live there, so
    # host memory holds one copy of an adapter's data, not its files and its folded factors.
    source: "dict[str, bytes] | Callable[[], dict[str, bytes]]"
    folded: Folded | None
    nbytes: int
    pinned: bool = False
    merged: Any = None  # a merged copy of the base for this adapter (the fast path), or None
    leases: int = 0
    retired: bool = False
    slot: int | None = None
    loaded_at: float = field(default_factory=time.time)
    head_size: int | None = None  # outputs of its task head; None: it answers as its base does


# The largest |value| a folded delta (lora_B @ lora_A) or task head may hold: trained deltas are
# far below 1, and values near this already push float32 activations toward overflow (LayerNorm
# squares them), which would serve NaN silently.
MAX_FOLDED_ABS = 1e4


def unknown_model(name: str) -> str:
    """The one NOT_FOUND message for a name that is neither a base nor an adapter the caller may
    use (the same text whether the adapter does not exist or belongs to another tenant)."""
    return f"unknown model {clip(name)}: not a base model and no adapter of that name is loaded"


def inside_root(root: Path, path: Path) -> bool:
    """Whether ``path`` (symlinks followed) lies inside the adapter root."""
    return path_inside(Path(root).resolve(), Path(path))


def read_dir(root: Path, name: str) -> dict[str, bytes]:
    """The files of adapter ``name`` under the adapter root; NOT_FOUND if there is none. The
    directory and both files must resolve inside the root (a symlink out of it is refused).
    Errors name the adapter, never the server's paths."""
    path = Path(root) / name
    if not path.is_dir():
        raise ModelNotFound(f"no adapter directory {name!r} under the adapter root")
    return read_artifact_files(path, source=f"adapter {name!r}", root=root)


def check_folded(name: str, folded: Folded) -> None:
    """Refuse a folded adapter whose factors, delta or head are non-finite or beyond
    `MAX_FOLDED_ABS` (values or alpha that overflow in the fold): checked after the fold and
    before anything serves it."""
    with torch.no_grad():
        for mod, (a, b) in folded.factors.items():
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterError(f"adapter {name!r}: the folded factors of {mod} are not finite "
                                   "(alpha or factor values too large)")
            # max|B A| <= sum_k max_i|B_ik| max_j|A_kj|: O((m + n) R); the exact product only when
            # that bound is not already small enough (for a trained adapter it is)
            bound = float((b.double().abs().amax(dim=0) * a.double().abs().amax(dim=1)).sum()) if a.numel() else 0.0
            if bound <= MAX_FOLDED_ABS:
                continue
            delta = b.float() @ a.float()
            if not torch.isfinite(delta).all():
                raise AdapterError(f"adapter {name!r}: the delta of {mod} is not finite (alpha or factor values too large)")
            peak = float(delta.abs().max()) if delta.numel() else 0.0
            if peak > MAX_FOLDED_ABS:
                raise AdapterError(f"adapter {name!r}: the delta of {mod} reaches {peak:.3g}, over the "
                                   f"{MAX_FOLDED_ABS:g} a served layer can hold (alpha or factor values too large)")
        if folded.head is not None:
            for t in folded.head:
                if t is None:
                    continue
                if not torch.isfinite(t).all():
                    raise AdapterError(f"adapter {name!r}: the task head is not finite")
                if t.numel() and float(t.abs().max()) > MAX_FOLDED_ABS:
                    raise AdapterError(f"adapter {name!r}: the task head has values over {MAX_FOLDED_ABS:g}")


class Registry:
    """Name -> current version, for every base engine; thread-safe."""

    def __init__(self, engines: dict[str, TorchEngine], *, host_budget_bytes: int = 2 << 30,
                 max_adapters: int = 10000) -> None:
        self.engines = engines
        self.host_budget = host_budget_bytes
        self.max_adapters = max_adapters  # loaded adapter names in total; RESOURCE_EXHAUSTED past it
        self.lock = threading.RLock()
        self.current: dict[str, Version] = {}
        self.host: OrderedDict[int, Version] = OrderedDict()  # id(version) -> version, LRU order
        self.slots: dict[str, list[Version | None]] = {b: [None] * e.num_slots for b, e in engines.items()}
        self.slot_lru: dict[str, OrderedDict[int, None]] = {b: OrderedDict() for b in engines}
        self.stats = {"loads": 0, "unloads": 0, "host_evictions": 0, "slot_evictions": 0,
                      "slot_hits": 0, "slot_misses": 0, "host_hits": 0, "host_misses": 0}

    # --- load / unload --------------------------------------------------------------------
    def load(self, name: str, files: dict[str, bytes], *, pinned: bool = False, merged: bool = False,
             reread: Callable[[], dict[str, bytes]] | None = None) -> Version:
        """Validate and fold a new version of ``name``; only then make it current. On any error
        nothing changes."""
        if not name or "/" in name or name in self.engines:
            raise ConfigError(f"invalid adapter name {name!r} (a base model's name or containing '/')")
        self._check_room(name)
        adapter = adapter_from_files(files, source=f"adapter {name!r}")
        engine = self.bind(name, adapter)
        try:
            folded = engine.prepare(adapter)  # validates against the base, folds
        except (AdapterError, IncompatibleAdapterError) as e:
            if str(e).startswith(f"adapter {name!r}"):
                raise
            raise type(e)(f"adapter {name!r}: {e}") from None
        check_folded(name, folded)
        if folded.nbytes > self.host_budget:
            raise Overloaded(f"adapter {name!r} takes {folded.nbytes} bytes folded, more than the whole host tier "
                             f"({self.host_budget} bytes, host_budget_mb); raise host_budget_mb to serve it")
        version = Version(name, adapter.content_hash, engine.base_model, adapter.labels, reread or dict(files), folded,
                          folded.nbytes, pinned=pinned or merged,
                          head_size=int(folded.head[0].shape[0]) if folded.head is not None else None)
        if merged:
            version.merged = engine.build_merged(folded)
        with self.lock:
            self._check_room(name)
            old = self.current.get(name)
            self.current[name] = version
            self.host[id(version)] = version
            if old is not None:
                self._retire(old)
            self._enforce_host_budget()
            self.stats["loads"] += 1
        return version

    def _check_room(self, name: str) -> None:
        """RESOURCE_EXHAUSTED when ``name`` is new and `max_adapters` are already loaded."""
        with self.lock:
            if name not in self.current and len(self.current) >= self.max_adapters:
                raise Overloaded(f"adapter {name!r}: {len(self.current)} adapters are loaded, the server's "
                                 f"limit of {self.max_adapters}; unload one first")

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
                raise ModelNotFound(unknown_model(name))
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
                    self.stats["slot_hits"] += 1
                    continue
                self.stats["slot_misses"] += 1
                self.stats["host_hits" if v.folded is not None else "host_misses"] += 1
                free = next((i for i in range(1, len(table)) if table[i] is None), None)
                if free is None:
                    free = next((i for i in lru if id(table[i]) not in needed), None)
                    if free is None:
                        raise Overloaded(f"more distinct adapters in one batch than the {len(table) - 1} slots")
                    table[free].slot = None
                    self.stats["slot_evictions"] += 1
                if v.folded is None:  # evicted from the host tier: fold again from its files
                    v.folded = engine.prepare(self._source_adapter(v))
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

    @staticmethod
    def _source_adapter(v: Version) -> WaraAdapter:
        """The adapter a version was loaded from, to fold again; one read again from the root
        must still be the content that was loaded (its hash), else its requests fail and the
        message says to reload it."""
        files = v.source() if callable(v.source) else v.source
        adapter = adapter_from_files(files, source=f"adapter {v.name!r}")
        if adapter.content_hash != v.version:
            raise AdapterError(f"adapter {v.name!r} changed in the adapter root since it was loaded (version "
                               f"{v.version[:12]}); load it again to serve the new content")
        return adapter

    def tiers(self) -> dict[str, tuple[int, int]]:
        """(adapters, bytes) resident per tier: ``host`` (folded factors in memory) and
        ``device`` (adapters in a slot; bytes of their folded factors)."""
        with self.lock:
            host = [v for v in self.host.values() if v.folded is not None]
            device = [v for table in self.slots.values() for v in table if v is not None]
            return {"host": (len(host), sum(v.nbytes for v in host)), "device": (len(device), sum(v.nbytes for v in device))}

    def index(self) -> list[Version]:
        with self.lock:
            return list(self.current.values())
