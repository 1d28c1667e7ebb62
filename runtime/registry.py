"""Adapters as models: names, versions (content hashes), leases, the host and device tiers.

* A **version** is one loaded content of a name. Requests *lease* the version current when
  they arrive and hold it until their batch ran, so unload or reload never tears a request:
  the old version drains while new requests see the new one (or NOT_FOUND after an unload).
* The **host tier** keeps each adapter's own factors (the artifact's tensors, about half the
  bytes of their folded LoRA) within a byte budget, least recently used first out, pinned ones
  never; an evicted version is read again from the adapter root on its next request. Adapters a
  client sent (no file to read again) stay, and count against the budget.
* The **device tier** is the engine's page pool: an adapter is folded when it enters it (or at
  load, for the request that loaded it), takes as many pages as its folded rank (fewer where
  the engine keeps its own factors: `runtime.engine.SlotForm`), and leaves it,
  least recently used first, only when no queued or running request holds it.
* Disk I/O and folds run outside the registry's lock, so other requests keep flowing.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

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
    # How to read the artifact files again after a host-tier eviction (adapters under the
    # root); None for files a client sent, which are never evicted (nothing to read back).
    source: Callable[[], dict[str, bytes]] | None
    adapter: WaraAdapter | None  # the host tier: the adapter's own factors (None: evicted)
    nbytes: int  # bytes of its own tensors (what the host tier holds)
    pages: int  # pages it takes in the device pool (its folded rank, or fewer for own factors)
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None  # its task head (small; always kept)
    own: bool = False  # its slot holds its own WaRA factors (else the folded LoRA)
    pinned: bool = False
    merged: object = None  # a merged copy of the base for this adapter (the fast path), or None
    leases: int = 0
    retired: bool = False
    slot: int | None = None
    fresh: Folded | None = None  # folded at load for the request that loaded it; used once
    loaded_at: float = field(default_factory=time.time)
    head_size: int | None = None  # outputs of its task head; None: it answers as its base does


def own_bytes(adapter: WaraAdapter) -> int:
    """Bytes of an adapter's own tensors (factors and saved modules)."""
    total = sum(t.numel() * t.element_size() for blocks in adapter.factors.values() for pair in blocks.values() for t in pair)
    return total + sum(t.numel() * t.element_size() for params in adapter.saved_modules.values() for t in params.values())


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


def folded_bounds(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Per layer, sum_k max_i|B_ik| max_j|A_kj| >= max|B A| (nan or inf where a value is not
    finite), in a few ops per distinct layer shape (MiniLM: 3), not per layer."""
    groups: dict[tuple, list[str]] = {}
    for mod, (a, b) in factors.items():
        groups.setdefault((tuple(a.shape), tuple(b.shape)), []).append(mod)
    out: dict[str, float] = {}
    for (shape_a, shape_b), mods in groups.items():
        if 0 in shape_a or 0 in shape_b:
            out.update(dict.fromkeys(mods, 0.0))
            continue
        a = torch.stack([factors[m][0] for m in mods]).abs().amax(dim=2)  # (layers, R)
        b = torch.stack([factors[m][1] for m in mods]).abs().amax(dim=1)  # (layers, R)
        out.update(zip(mods, (b.float() * a.float()).sum(dim=1).tolist()))
    return out


def check_folded(name: str, folded: Folded) -> None:
    """Refuse a prepared adapter whose factors, delta or head are non-finite or beyond
    `MAX_FOLDED_ABS` (values or alpha that overflow in the fold): checked after `prepare` and
    before anything serves it. Each layer's delta is bounded from its factors first (own
    factors: `runtime.native.own_delta_bounds`, from the peaks `prepare` measured; folded:
    `folded_bounds`); the exact delta, from the fold, is computed only where that bound is not
    finite or not small enough (for a trained adapter it is both)."""
    with torch.no_grad():
        own = folded.own_bounds is not None
        bounds = folded.own_bounds if own else folded_bounds(folded.factors)
        for mod in folded.factors:
            bound = bounds[mod]
            if own and not math.isfinite(bound):
                raise AdapterError(f"adapter {name!r}: the factors of {mod} are not finite "
                                   "(alpha or factor values too large)")
            if bound <= MAX_FOLDED_ABS:  # False for nan
                continue
            a, b = folded.factors[mod]
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterError(f"adapter {name!r}: the folded factors of {mod} are not finite "
                                   "(alpha or factor values too large)")
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
                 max_adapters: int = 10000, observe: Callable[[str, float], None] | None = None) -> None:
        self.engines = engines
        self.host_budget = host_budget_bytes
        self.max_adapters = max_adapters  # loaded adapter names in total; RESOURCE_EXHAUSTED past it
        self.observe = observe  # (tier, seconds) of each entry into the host or device tier
        self.lock = threading.RLock()
        self.current: dict[str, Version] = {}
        self.host: OrderedDict[int, Version] = OrderedDict()  # id(version) -> version with own factors, LRU order
        self.resident: dict[str, OrderedDict[int, Version]] = {b: OrderedDict() for b in engines}  # slot -> version, LRU
        self._next_slot = {b: 1 for b in engines}
        self._free_slots: dict[str, list[int]] = {b: [] for b in engines}
        self.stats = {"loads": 0, "unloads": 0, "host_evictions": 0, "slot_evictions": 0,
                      "slot_hits": 0, "slot_misses": 0, "host_hits": 0, "host_misses": 0}

    # --- load / unload --------------------------------------------------------------------
    def load(self, name: str, files: dict[str, bytes], *, pinned: bool = False, merged: bool = False,
             reread: Callable[[], dict[str, bytes]] | None = None, keep_folded: bool = False) -> Version:
        """Validate and fold a new version of ``name``; only then make it current. On any error
        nothing changes. The fold is checked and then dropped (it is made again when the
        adapter enters the device tier), unless ``keep_folded``: a load for a request that
        needs it at once."""
        if not name or "/" in name or name in self.engines:
            raise ConfigError(f"invalid adapter name {name!r} (a base model's name or containing '/')")
        self._check_room(name)
        adapter = adapter_from_files(files, source=f"adapter {name!r}")
        del files
        engine = self.bind(name, adapter)
        folded = self._prepare(engine, name, adapter)
        if folded.pages > engine.pages:
            raise Overloaded(f"adapter {name!r} ({folded.form} factors) needs {folded.pages} pages of "
                             f"{engine.page_bytes} bytes in the device pool, more than all {engine.pages} "
                             f"(device_budget_mb); raise device_budget_mb to serve it")
        nbytes = own_bytes(adapter)
        if nbytes > self.host_budget:
            raise Overloaded(f"adapter {name!r} takes {nbytes} bytes, more than the whole host tier "
                             f"({self.host_budget} bytes, host_budget_mb); raise host_budget_mb to serve it")
        version = Version(name, adapter.content_hash, engine.base_model, adapter.labels, reread, adapter, nbytes,
                          folded.pages, head=folded.head, own=folded.own is not None, pinned=pinned or merged,
                          fresh=folded if keep_folded else None,
                          head_size=int(folded.head[0].shape[0]) if folded.head is not None else None)
        if merged:
            version.merged = engine.build_merged(folded)
        with self.lock:
            self._check_room(name)
            if reread is None:  # a client's files cannot be read back: they stay, within the budget
                kept = sum(v.nbytes for v in self.host.values() if v.source is None or v.pinned)
                if kept + nbytes > self.host_budget:
                    raise Overloaded(f"adapter {name!r}: the host tier holds {kept} bytes of adapters it cannot evict "
                                     f"(sent by clients, or pinned) and this one needs {nbytes} more, over "
                                     f"host_budget_mb; unload one first")
            old = self.current.get(name)
            self.current[name] = version
            self.host[id(version)] = version
            if old is not None:
                self._retire(old)
            self._enforce_host_budget()
            self.stats["loads"] += 1
        return version

    @staticmethod
    def _prepare(engine: TorchEngine, name: str, adapter: WaraAdapter) -> Folded:
        try:
            folded = engine.prepare(adapter)  # validates against the base, folds
        except (AdapterError, IncompatibleAdapterError) as e:
            if str(e).startswith(f"adapter {name!r}"):
                raise
            raise type(e)(f"adapter {name!r}: {e}") from None
        check_folded(name, folded)
        return folded

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
        """Forget a retired version with no requests. Its pages go back when the device tier
        next needs room (the batch worker owns the pool; this may run on any thread)."""
        self.host.pop(id(version), None)
        version.adapter = version.fresh = version.merged = None

    def _enforce_host_budget(self) -> None:
        used = sum(v.nbytes for v in self.host.values())
        for key in list(self.host):
            if used <= self.host_budget:
                break
            v = self.host[key]
            if v.pinned or v.leases or v.source is None:
                continue
            del self.host[key]
            v.adapter = v.fresh = None
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

    # --- the host tier ----------------------------------------------------------------------
    def fold(self, version: Version) -> Folded:
        """A version's folded factors, from its own factors in the host tier (read again from
        the adapter root first if they were evicted). Blocking I/O and math: call it without
        the registry's lock."""
        with self.lock:
            adapter = version.adapter
            self.stats["host_hits" if adapter is not None else "host_misses"] += 1
        if adapter is None:
            t0 = time.perf_counter()
            adapter = self._source_adapter(version)
            with self.lock:
                if not version.retired or version.leases:
                    version.adapter = adapter
                    self.host[id(version)] = version
                    self._enforce_host_budget()
            if self.observe is not None:
                self.observe("host", time.perf_counter() - t0)
        return self._prepare(self.engines[version.base_model], version.name, adapter)

    @staticmethod
    def _source_adapter(v: Version) -> WaraAdapter:
        """The adapter a version was loaded from, read again from the root; it must still be
        the content that was loaded (its hash), else its requests fail and the message says to
        reload it."""
        if v.source is None:
            raise AdapterError(f"internal: adapter {v.name!r} left the host tier with nothing to read it back from")
        adapter = adapter_from_files(v.source(), source=f"adapter {v.name!r}")
        if adapter.content_hash != v.version:
            raise AdapterError(f"adapter {v.name!r} changed in the adapter root since it was loaded (version "
                               f"{v.version[:12]}); load it again to serve the new content")
        return adapter

    # --- device tier (called by the batcher's worker, between forwards) --------------------
    def assign_slots(self, base_model: str, versions: list[Version]) -> tuple[dict[int, int], list[Version]]:
        """Give every version of a batch a slot: (id(version) -> slot, versions deferred). A
        version that needs pages evicts least recently used adapters that no queued or running
        request holds; one that still finds no room is deferred (its requests wait for the next
        batch, after the adapters that hold the pool have run). Folds run outside the lock."""
        engine = self.engines[base_model]
        needed = {id(v): v for v in versions}
        out: dict[int, int] = {}
        misses = []
        with self.lock:
            table = self.resident[base_model]
            for v in needed.values():
                if v.slot is not None:
                    table.move_to_end(v.slot)
                    out[id(v)] = v.slot
                    self.stats["slot_hits"] += 1
                else:
                    misses.append(v)
                    self.stats["slot_misses"] += 1
        deferred = []
        for v in misses:
            with self.lock:
                if not self._make_room(base_model, v.pages, needed):
                    deferred.append(v)
                    continue
                folded, v.fresh = v.fresh, None
            t0 = time.perf_counter()
            if folded is None:
                folded = self.fold(v)
            with self.lock:  # the room made above is still free: only this batch's worker writes the pool
                slot = self._free_slots[base_model].pop() if self._free_slots[base_model] else self._take_slot_id(base_model)
                engine.write_slot(slot, folded)
                v.slot = slot
                table[slot] = v
                out[id(v)] = slot
            if self.observe is not None:
                self.observe("device", time.perf_counter() - t0)
        return out, deferred

    def _take_slot_id(self, base_model: str) -> int:
        slot = self._next_slot[base_model]
        self._next_slot[base_model] += 1
        return slot

    def _make_room(self, base_model: str, pages: int, needed: dict[int, Version]) -> bool:
        """Evict (under the lock) until ``pages`` are free: retired versions first, then the
        least recently used ones no request holds. False when that is not enough."""
        engine, table = self.engines[base_model], self.resident[base_model]
        if engine.pool.free >= pages:
            return True
        order = [s for s, v in table.items() if v.retired and v.leases == 0]
        order += [s for s, v in table.items() if not v.retired and v.leases == 0 and id(v) not in needed]
        for slot in order:
            self._evict(base_model, slot)
            if engine.pool.free >= pages:
                return True
        return False

    def _evict(self, base_model: str, slot: int) -> None:
        """Take a version out of the device tier (under the lock; it has no requests)."""
        v = self.resident[base_model].pop(slot)
        self.engines[base_model].free_slot(slot)
        v.slot = None
        self._free_slots[base_model].append(slot)
        if not v.retired:
            self.stats["slot_evictions"] += 1

    def tiers(self) -> dict[str, tuple[int, int]]:
        """(adapters, bytes) resident per tier: ``host`` (own factors in memory) and ``device``
        (adapters in the page pool; bytes of the pages they take)."""
        with self.lock:
            host = [v for v in self.host.values() if v.adapter is not None]
            device = [(v, self.engines[b].page_bytes) for b, table in self.resident.items() for v in table.values()
                      if not v.retired]
            return {"host": (len(host), sum(v.nbytes for v in host)),
                    "device": (len(device), sum(v.pages * size for v, size in device))}

    def index(self) -> list[Version]:
        with self.lock:
            return list(self.current.values())
