"""The adapter repository: load, unload, index, lazy single-flight loading and quotas, over
the three tiers (disk: `disk.Catalog`; host: `host.HostTier`; device: one `device.DeviceTier`
per base) and the one `prepare` step. Disk I/O and folds run outside the lifecycle lock, so
requests keep flowing while an adapter loads.

An adapter name is loaded (a version current in the host tier), on disk under the adapter root
and not loaded (its first request loads it), or unloaded on purpose (NOT_FOUND until an
explicit load, even though its directory is still there).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

from wara_train.artifact import adapter_from_files

from ..auth import OPEN, Tenant
from ..errors import InvalidRequest, ModelNotFound, Overloaded, clip
from ..names import RULE, is_model_name, unknown_model
from .device import DeviceTier
from .disk import Catalog, owner_of, read_dir, stamp
from .host import HostTier, Version
from .prepare import bind, own_bytes, prepare

log = logging.getLogger("wara.serve")


class Repository:
    """Every adapter of every served base; thread-safe. ``engines``: base name -> engine."""

    def __init__(self, engines: dict, *, root: str | None = None, host_budget_bytes: int = 2 << 30,
                 max_adapters: int = 10000, tenants=(), pinned=(), merged=(),
                 observe: Callable[[str, float], None] | None = None) -> None:
        self.engines = engines
        self.root = Path(root) if root else None
        self.max_adapters = max_adapters  # loaded adapter names in total; RESOURCE_EXHAUSTED past it
        self.tenants = tuple(tenants)
        self.pinned, self.merged = set(pinned), set(merged)
        self.observe = observe  # (tier, seconds) of each entry into the host or device tier
        self.lock = threading.RLock()  # the lifecycle's one lock: versions, leases, slot tables
        self.stats = {"loads": 0, "unloads": 0, "host_evictions": 0, "slot_evictions": 0,
                      "slot_hits": 0, "slot_misses": 0, "host_hits": 0, "host_misses": 0}
        self.host = HostTier(budget=host_budget_bytes, lock=self.lock, stats=self.stats, observe=self._observe,
                             prepare=lambda v, a: prepare(self.engines[v.base_model], v.name, a))
        self.device = {b: DeviceTier(e, lock=self.lock, fold=self.host.fold, stats=self.stats, observe=self._observe)
                       for b, e in engines.items()}
        self.catalog = Catalog(root).scan() if root else None
        self._loading: dict[str, Future] = {}
        self._loading_lock = threading.Lock()
        self._unloaded: set[str] = set()

    def _observe(self, tier: str, seconds: float) -> None:
        if self.observe is not None:
            self.observe(tier, seconds)

    @property
    def current(self) -> dict[str, Version]:
        return self.host.current

    # --- load / unload --------------------------------------------------------------------
    def load(self, name: str, files: dict[str, bytes] | None = None, *, keep_folded: bool = False) -> Version:
        """A new version of ``name`` from the adapter root (``files`` None) or from ``files``:
        read, validated against its base, prepared and bound-checked; only then current. On any
        error nothing changes. The prepared factors are dropped (made again when the adapter
        enters a slot) unless ``keep_folded``: a load for a request that needs it at once."""
        t0 = time.perf_counter()
        if not is_model_name(name):
            raise InvalidRequest(f"invalid adapter name {clip(name)}: {RULE}")
        if name in self.engines:
            raise InvalidRequest(f"{name!r} is a base model's name; an adapter needs a name of its own")
        source = unchanged = None
        if files is None:
            if self.root is None:
                raise ModelNotFound(f"no adapter root is configured to load {name!r} from; send the files instead")
            root = self.root
            try:
                files = read_dir(root, name)
                at_load = stamp(root, name)
            except ModelNotFound:
                if self.catalog is not None:
                    self.catalog.forget(name)
                raise
            source = lambda: read_dir(root, name)  # noqa: E731 - the host tier keeps no copy of the files
            unchanged = lambda: stamp(root, name) == at_load  # noqa: E731
        self._check_room(name)
        adapter = adapter_from_files(files, source=f"adapter {name!r}")
        del files
        engine = bind(self.engines, name, adapter)
        folded = prepare(engine, name, adapter)
        if folded.pages > engine.pages:
            raise Overloaded(f"adapter {name!r} ({folded.form} factors) needs {folded.pages} pages of "
                             f"{engine.page_bytes} bytes in the device pool, more than all {engine.pages} "
                             f"(device_budget_mb); raise device_budget_mb to serve it")
        nbytes = own_bytes(adapter)
        if nbytes > self.host.budget:
            raise Overloaded(f"adapter {name!r} takes {nbytes} bytes, more than the whole host tier "
                             f"({self.host.budget} bytes, host_budget_mb); raise host_budget_mb to serve it")
        merged = name in self.merged
        version = Version(name, adapter.content_hash, engine.base_model, adapter.labels, source, adapter, nbytes,
                          folded.pages, head=folded.head, own=folded.own is not None,
                          pinned=name in self.pinned or merged, fresh=folded if keep_folded else None,
                          head_size=int(folded.head[0].shape[0]) if folded.head is not None else None,
                          unchanged=unchanged)
        if merged:
            version.merged = engine.build_merged(folded.factors)
        with self.lock:
            self._check_room(name)
            self.host.admit(version)
            self.stats["loads"] += 1
        if source is not None:
            self._observe("host", time.perf_counter() - t0)  # root -> host tier (read, checked, prepared)
            if self.catalog is not None:
                self.catalog.get(name)  # indexed (a directory added since start)
        self._unloaded.discard(name)
        return version

    def _check_room(self, name: str) -> None:
        """RESOURCE_EXHAUSTED when ``name`` is new and `max_adapters` are loaded, or a tenant
        whose patterns it matches already has its ``max_adapters`` loaded."""
        with self.lock:
            current = self.host.current
            if name in current:
                return
            if len(current) >= self.max_adapters:
                raise Overloaded(f"adapter {name!r}: {len(current)} adapters are loaded, the server's "
                                 f"limit of {self.max_adapters}; unload one first")
            for t in self.tenants:
                if t.admin or t.max_adapters is None or not t.may_use(name):
                    continue
                n = sum(1 for loaded in current if t.may_use(loaded))
                if n >= t.max_adapters:
                    raise Overloaded(f"adapter {name!r}: tenant {t.name!r} has {n} adapters loaded, its "
                                     "max_adapters; unload one first")

    def unload(self, name: str) -> None:
        if name in self.engines:
            raise InvalidRequest(f"{name!r} is a base model; only adapters can be unloaded")
        with self.lock:
            self.host.remove(name)
            self.stats["unloads"] += 1
        if self.root is not None:
            self._unloaded.add(name)

    # --- lazy loading ---------------------------------------------------------------------
    def may_use(self, name: str, tenant: Tenant) -> bool:
        """Whether ``tenant`` may use adapter ``name``: its patterns allow the name and, under
        the adapter root, the directory the name resolves to (a symlink to another adapter)."""
        if not tenant.may_use(name):
            return False
        if tenant.admin or self.root is None:
            return True
        owner = owner_of(self.root, name)
        return owner is None or owner == name or tenant.may_use(owner)

    def needs_load(self, name: str, tenant: Tenant = OPEN) -> bool:
        """Whether a request for ``name`` loads it from the adapter root first: a directory
        there, not loaded, not unloaded on purpose, and one the tenant may use."""
        if self.catalog is None or name in self.engines or name in self.host.current or name in self._unloaded:
            return False
        if not is_model_name(name) or not self.may_use(name, tenant):
            return False
        return self.catalog.get(name) is not None

    def loadable(self, name: str) -> bool:
        """Whether an adapter on disk looks servable as far as the index can tell (its first
        request still runs every check)."""
        entry = self.catalog.get(name) if self.catalog is not None else None
        return entry is not None and entry.problem is None

    def ensure_loaded(self, name: str, tenant: Tenant = OPEN) -> None:
        """Load ``name`` from the adapter root if `needs_load`; concurrent callers wait for the
        one load (single flight). Blocking. A load that fails raises its error to every waiter,
        and the next request tries again."""
        if not self.needs_load(name, tenant):
            return
        with self._loading_lock:
            future = self._loading.get(name)
            owner = future is None
            if owner:
                future = self._loading[name] = Future()
        if owner:
            try:
                if self.needs_load(name, tenant):  # not loaded meanwhile
                    self.load(name, keep_folded=True)  # its fold serves the request that asked
                future.set_result(None)
            except BaseException as e:
                future.set_exception(e)
            finally:
                with self._loading_lock:
                    self._loading.pop(name, None)
        future.result()

    # --- leases ---------------------------------------------------------------------------
    def lease(self, name: str, tenant: Tenant = OPEN, *, load: bool = True) -> Version:
        """The current version of ``name`` for ``tenant``, loaded first from the root when
        ``load`` and it is on disk; held until `release`. NOT_FOUND, with one message, for a
        name that does not exist and for one the tenant may not use."""
        if not is_model_name(name) or not self.may_use(name, tenant):
            raise ModelNotFound(unknown_model(name))
        if load:
            self.ensure_loaded(name, tenant)
        return self.host.lease(name)

    def release(self, version: Version) -> None:
        self.host.release(version)

    # --- index ----------------------------------------------------------------------------
    def index(self, tenant: Tenant = OPEN) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) of the adapters ``tenant`` may use: loaded ones, and
        those on disk not loaded."""
        with self.lock:
            loaded = dict(self.host.current)
        rows = []
        for v in loaded.values():
            if not self.may_use(v.name, tenant):
                continue
            if v.readable:
                rows.append((v.name, v.version, "READY", tier(v)))
            else:
                why = v.unavailable or "its files changed or vanished under the adapter root since it was loaded"
                rows.append((v.name, v.version, "UNAVAILABLE", why))
        if self.catalog is not None:
            for name, e in list(self.catalog.entries.items()):
                if name in loaded or not self.may_use(name, tenant):
                    continue
                if name in self._unloaded:
                    reason = "unloaded"
                elif e.problem:
                    reason = f"on disk, not servable: {e.problem}"
                else:
                    reason = f"on disk (loads on its first request; rank {e.rank}, {e.pages} pages)"
                rows.append((name, "", "UNAVAILABLE", reason))
        return rows

    def tiers(self) -> tuple[dict[str, tuple[int, int | None]], dict[str, int]]:
        """((adapters, bytes) per tier: disk (not loaded), host, device; the counters)."""
        out: dict[str, tuple[int, int | None]] = {"host": self.host.resident()}
        device = [d.resident() for d in self.device.values()]
        out["device"] = (sum(n for n, _ in device), sum(b for _, b in device))
        if self.catalog is not None:
            loaded = self.host.current
            on_disk = [e for name, e in list(self.catalog.entries.items()) if name not in loaded]
            out["disk"] = (len(on_disk), sum(e.file_bytes for e in on_disk))
        return out, dict(self.stats)


def tier(version: Version) -> str:
    """Where a loaded adapter's data is: on the device (its pages in the pool), in host memory
    (its own factors), or only on disk (read again on its next request)."""
    if version.slot is not None:
        return f"on device (slot {version.slot}, {version.pages} pages{', own factors' if version.own else ''})"
    return "in host" if version.adapter is not None else "on disk (read again on its next request)"
