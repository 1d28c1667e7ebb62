"""The serving core, independent of gRPC: models, inputs, outputs, load/unload, drain.

The gRPC servicer only translates protobuf to these calls and back; tests and benchmarks can
call the same methods in-process.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wara_train.artifact import CONFIG_NAME
from wara_train.basespec import BaseSpec, TensorSpec, resolve_base
from wara_train.errors import ConfigError

from .auth import OPEN, Tenant
from .batcher import Batcher, Request
from .config import BaseEntry, ServeConfig, resolve_backend
from .engine import TorchEngine
from .errors import DeadlineExceeded, Draining, InvalidRequest, ModelNotFound, Overloaded, clip
from .inputs import InputConverter, input_specs
from . import native
from .metrics import Metrics
from .catalog import Catalog
from .registry import Registry, Version, read_dir, unknown_model

log = logging.getLogger("wara.serve")
SERVER_NAME = "wara-serve"
SERVER_VERSION = "0.1.0"
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def output_specs(engine: TorchEngine, version: Version | None) -> list[TensorSpec]:
    """A base answers with its embeddings or its own logits (and labels, when its head has
    names); an adapter with its head's logits (and labels, when it names them), or, without a
    head of its own, as its base does."""
    spec = engine.spec
    if version is None or version.head_size is None:
        if spec.output == "embeddings":
            return [TensorSpec("embeddings", "FP32", (-1, engine.feature_dim))]
        n = engine.base_head.out_features if isinstance(engine.base_head, torch.nn.Linear) else -1
        return [TensorSpec("logits", "FP32", (-1, n))] + ([TensorSpec("labels", "BYTES", (-1,))] if spec.labels else [])
    specs = [TensorSpec("logits", "FP32", (-1, version.head_size))]
    if version.labels:
        specs.append(TensorSpec("labels", "BYTES", (-1,)))
    return specs


def make_engine(config: ServeConfig, spec: BaseSpec) -> TorchEngine:
    """The configured backend for one base. Under ``auto``, a base onnxruntime cannot serve
    (its export fails) is served by PyTorch instead, with a warning; ModelMetadata's platform
    says which engine serves it."""
    backend = resolve_backend(config, spec)
    if backend == "onnxruntime":
        from .ort_engine import OrtEngine

        try:
            return OrtEngine(spec, device_budget_mb=config.device_budget_mb, max_rank=config.max_rank)
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if config.backend != "auto":
                raise ConfigError(f"base {spec.name!r}: the onnxruntime engine could not be built ({why}); "
                                  "serve it with backend 'torch' or 'auto'") from None
            log.warning("base %s: the onnxruntime engine could not be built (%s); serving it with PyTorch", spec.name, why)
    return TorchEngine(spec, device_budget_mb=config.device_budget_mb, max_rank=config.max_rank, device=config.device,
                       slot_form=config.slot_form)


def resolve_entry(entry: BaseEntry) -> BaseSpec:
    return resolve_base(entry.source, task=entry.task, name=entry.name)


def tier(version: Version) -> str:
    """Where a loaded adapter's data is: on the device (its pages in the pool), in host memory
    (its own factors), or only on disk (read again on its next request)."""
    if version.slot is not None:
        return f"on device (slot {version.slot}, {version.pages} pages{', own factors' if version.own else ''})"
    return "in host" if version.adapter is not None else "on disk (read again on its next request)"


class Pending:
    """One accepted request: its batch future, and how to turn its rows into outputs."""

    def __init__(self, service: "Service", name: str, base: str, version: Version | None, future, t0: float,
                 timeout: float, deadline: float) -> None:
        self.service, self.name, self.base, self.version = service, name, base, version
        self.future, self.t0, self.timeout, self.deadline = future, t0, timeout, deadline
        self.truncated: list[int] = []  # rows whose text was cut to max_text_length tokens

    @property
    def wait_s(self) -> float:
        """How long the caller may wait for the batch: the deadline, and a second for it to run."""
        return max(0.0, self.deadline - time.perf_counter()) + 1.0

    def fail(self, error: BaseException) -> None:
        """Count the failure and raise it."""
        self.service.metrics.requests.labels(self.service.label(self.name), type(error).__name__).inc()
        raise error

    def finish(self, rows: list) -> tuple[str, dict[str, np.ndarray]]:
        service, version = self.service, self.version
        outputs = service._outputs(rows, self.base, version)
        service.metrics.requests.labels(service.label(self.name), "ok").inc()
        service.metrics.latency.observe(time.perf_counter() - self.t0)
        return (version.version if version else "1"), outputs


class Service:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.specs = {e.name: resolve_entry(e) for e in config.bases}  # every base checked before any is built
        self.engines = {name: make_engine(config, spec) for name, spec in self.specs.items()}
        for name, engine in self.engines.items():
            self.metrics.kernel.labels(name, engine.kernel_name).set(1)
            log.info("base %s: adapter kernel %s", name, engine.kernel_name)
        self.converters = {name: InputConverter(spec, max_text_length=config.max_text_length,
                                                max_text_bytes=config.max_text_bytes,
                                                max_request_text_bytes=config.max_request_text_bytes)
                           for name, spec in self.specs.items()}
        self.registry = Registry(self.engines, host_budget_bytes=int(config.host_budget_mb * (1 << 20)),
                                 max_adapters=config.max_adapters, observe=self.metrics.observe_tier_load)
        self.batchers = {b: Batcher(e, self.registry, max_batch=config.max_batch, max_delay_ms=config.max_delay_ms,
                                    max_queue=config.max_queue, max_queued_bytes=config.max_queued_mb << 20,
                                    resident_wait_ms=config.resident_wait_ms,
                                    on_batch=self._on_batch,
                                    on_start=self._on_start, on_end=self._on_end, on_expire=self._on_expire)
                         for b, e in self.engines.items()}
        self._recent: deque = deque(maxlen=config.auto_merge_window)
        self._auto_merged: dict[str, Version] = {}
        self._merge_lock = threading.Lock()
        self._gauge_lock = threading.Lock()
        self._gauges: dict[tuple[int, str], int] = {}  # (gauge, label) -> value
        self.metrics.add_lora_info(self._lora_snapshot)
        self.metrics.add_tiers(self._tier_snapshot)
        self.metrics.add_pack_cache(native.pack_cache_stats)
        self.ready = False
        self.draining = False
        # Lazy loading: a request for an adapter under the root that is not loaded loads it
        # first, once however many requests ask at the same time; an explicit unload keeps the
        # name NOT_FOUND until an explicit load.
        self._loading: dict[str, Future] = {}
        self._loading_lock = threading.Lock()
        self._unloaded: set[str] = set()
        # The disk tier: the root indexed from configs and header sizes; tensors on first use.
        self.catalog = Catalog(config.adapter_root).scan() if config.adapter_root else None
        if self.catalog is not None and config.preload:
            for name in self.catalog.names():
                problem = self.catalog.entries[name].problem
                if problem is not None:
                    log.warning("skipping adapter %s: %s", name, problem)
                    continue
                try:
                    self.load(name)
                except Exception as e:  # one bad adapter must not stop the server
                    log.warning("skipping adapter %s: %s", name, e)
        self.ready = True

    def _on_batch(self, base: str, rows: int) -> None:
        self.metrics.observe_batch(base, rows)
        self.metrics.evictions.labels("host").set(self.registry.stats["host_evictions"])
        self.metrics.evictions.labels("slot").set(self.registry.stats["slot_evictions"])

    def label(self, name: str) -> str:
        """A model's metric label: its name while it is served, else ``<unknown>`` (so neither
        unknown names nor unloaded adapters grow the metrics)."""
        return name if name in self.engines or name in self.registry.current else "<unknown>"

    def _gauge(self, gauge, label: str, delta: int) -> None:
        """Move a per-model gauge (waiting, running) by ``delta`` under the label the request got
        when it was queued. A series of a model no longer served goes once it is back at 0, so
        a request in flight across an unload neither goes negative nor leaves a series behind."""
        with self._gauge_lock:
            key = (id(gauge), label)
            value = self._gauges.get(key, 0) + delta
            if value == 0 and label != "<unknown>" and self.label(label) != label:
                self._gauges.pop(key, None)
                try:
                    gauge.remove(label)
                except KeyError:
                    pass
                return
            self._gauges[key] = value
            gauge.labels(label).set(value)

    def _tier_snapshot(self) -> tuple[dict[str, tuple[int, int | None]], dict[str, int]]:
        tiers: dict[str, tuple[int, int | None]] = dict(self.registry.tiers())
        if self.catalog is not None:
            loaded = self.registry.current
            on_disk = [e for name, e in list(self.catalog.entries.items()) if name not in loaded]
            tiers["disk"] = (len(on_disk), sum(e.file_bytes for e in on_disk))
        return tiers, dict(self.registry.stats)

    def _lora_snapshot(self) -> tuple[list[str], list[str], int]:
        """(adapters with requests running, adapters with requests waiting, device slots for
        adapters per base) for `Metrics.add_lora_info`."""
        with self._gauge_lock:
            items = list(self._gauges.items())
        running = [label for (g, label), v in items if g == id(self.metrics.running) and v > 0 and label not in self.engines]
        waiting = [label for (g, label), v in items if g == id(self.metrics.waiting) and v > 0 and label not in self.engines]
        return running, waiting, min(e.capacity() for e in self.engines.values())

    def _on_start(self, batch: list[Request]) -> None:
        for r in batch:
            self._gauge(self.metrics.waiting, r.model, -1)
            self._gauge(self.metrics.running, r.model, +1)

    def _on_expire(self, requests: list[Request]) -> None:
        for r in requests:
            self._gauge(self.metrics.waiting, r.model, -1)

    def _on_end(self, batch: list[Request]) -> None:
        for r in batch:
            self._gauge(self.metrics.running, r.model, -1)

    # --- repository -------------------------------------------------------------------------
    def load(self, name: str, files: dict[str, bytes] | None = None, *, keep_folded: bool = False) -> Version:
        t0 = time.perf_counter()
        if not ADAPTER_NAME.match(name) or ".." in name:
            raise InvalidRequest(f"invalid adapter name {clip(name)}: use letters, digits, '.', '_' and '-' (at most 128)")
        reread = None
        if files is None:
            if not self.config.adapter_root:
                raise ModelNotFound(f"no adapter root is configured to load {name!r} from; send the files instead")
            root = Path(self.config.adapter_root)
            try:
                files = read_dir(root, name)
            except ModelNotFound:
                if self.catalog is not None:
                    self.catalog.forget(name)
                raise
            reread = lambda: read_dir(root, name)  # noqa: E731 - the host tier keeps no copy of the files
        self._check_tenant_room(name)
        version = self.registry.load(name, files, pinned=name in self.config.pinned, merged=name in self.config.merged,
                                     reread=reread, keep_folded=keep_folded)
        if reread is not None and self.registry.observe is not None:  # root -> host tier (read, checked, fold-checked)
            self.registry.observe("host", time.perf_counter() - t0)
        if self.catalog is not None and reread is not None:
            self.catalog.get(name)  # indexed (a directory added since start)
        self._unloaded.discard(name)
        self.metrics.loads.inc()
        self.metrics.load_latency.observe(time.perf_counter() - t0)
        return version

    def _check_tenant_room(self, name: str) -> None:
        """RESOURCE_EXHAUSTED when ``name`` is new and a tenant whose patterns it matches
        already has its ``max_adapters`` loaded."""
        if name in self.registry.current:
            return
        for t in self.config.tenants:
            if t.admin or t.max_adapters is None or not t.may_use(name):
                continue
            n = sum(1 for loaded in list(self.registry.current) if t.may_use(loaded))
            if n >= t.max_adapters:
                raise Overloaded(f"adapter {name!r}: tenant {t.name!r} has {n} adapters loaded, its max_adapters; "
                                 "unload one first")

    def unload(self, name: str) -> None:
        if name in self.engines:
            raise InvalidRequest(f"{name!r} is a base model; only adapters can be unloaded")
        self.registry.unload(name)
        if self.config.adapter_root:
            self._unloaded.add(name)
        self.metrics.forget(name)  # its request counts; its gauges go when they are back at 0 (`_gauge`)
        with self._gauge_lock:
            for gauge in (self.metrics.waiting, self.metrics.running):
                if self._gauges.get((id(gauge), name), 0) == 0:
                    self._gauges.pop((id(gauge), name), None)
                    try:
                        gauge.remove(name)
                    except KeyError:
                        pass
        self.metrics.unloads.inc()

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for bases, loaded adapters and unloaded ones on disk."""
        rows = [(b, "1", "READY", "") for b in self.engines]
        loaded = {v.name: v for v in self.registry.index()}
        rows += [(v.name, v.version, "READY", tier(v)) for v in loaded.values()]
        if self.catalog is not None:
            for name, e in list(self.catalog.entries.items()):
                if name in loaded:
                    continue
                if name in self._unloaded:
                    reason = "unloaded"
                elif e.problem:
                    reason = f"on disk, not servable: {e.problem}"
                else:
                    reason = f"on disk (loads on its first request; rank {e.rank}, {e.pages} pages)"
                rows.append((name, "", "UNAVAILABLE", reason))
        return rows

    def needs_load(self, name: str, tenant: Tenant = OPEN) -> bool:
        """Whether a request for ``name`` would load it from the adapter root first: an adapter
        directory there, not loaded, not unloaded on purpose, and one the tenant may use."""
        if self.catalog is None or name in self.engines or name in self.registry.current or name in self._unloaded:
            return False
        if not tenant.may_use(name) or not ADAPTER_NAME.match(name) or ".." in name:
            return False
        return self.catalog.get(name) is not None

    def loadable(self, name: str) -> bool:
        """Whether an adapter on disk looks servable as far as the index can tell (ModelReady of
        an adapter not loaded yet): its first request still runs every check."""
        entry = self.catalog.get(name) if self.catalog is not None else None
        return entry is not None and entry.problem is None

    def ensure_loaded(self, name: str, tenant: Tenant = OPEN) -> None:
        """Load ``name`` from the adapter root if `needs_load`; concurrent callers wait for the
        one load (single flight). Blocking: the edge calls it off its event loop. A load that
        fails raises its error to every waiter, and the next request tries again."""
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

    def resolve(self, name: str, tenant: Tenant = OPEN, *, load: bool = True) -> tuple[str, Version | None]:
        """(base model, leased version or None for the base). Caller must `release`. An adapter
        the tenant may not use is NOT_FOUND with the same message as one that does not exist,
        so a tenant cannot probe another's names. One under the adapter root that is not loaded
        is loaded first (`ensure_loaded`), unless ``load`` is false (metadata and readiness
        describe what is loaded)."""
        if name in self.engines:
            return name, None
        if not tenant.may_use(name):
            raise ModelNotFound(unknown_model(name))
        if load:
            self.ensure_loaded(name, tenant)
        version = self.registry.lease(name)
        return version.base_model, version

    def describe(self, name: str, tenant: Tenant = OPEN) -> tuple[str, list[str], list[TensorSpec], list[TensorSpec]]:
        base, version = self.resolve(name, tenant, load=False)
        try:
            versions = [version.version] if version else ["1"]
            return base, versions, input_specs(self.specs[base]), output_specs(self.engines[base], version)
        finally:
            if version is not None:
                self.registry.release(version)

    # --- inference ------------------------------------------------------------------------
    def infer(self, name: str, inputs: dict[str, np.ndarray], *, timeout: float | None = None,
              requested_version: str = "", tenant: Tenant = OPEN) -> tuple[str, dict[str, np.ndarray]]:
        """Run one request; returns (version that ran, outputs)."""
        if self.draining:
            raise Draining("the server is draining and takes no new requests")
        pending = self.start(name, inputs, timeout=timeout, requested_version=requested_version, tenant=tenant)
        try:
            rows = pending.future.result(timeout=pending.wait_s)
        except FutureTimeout:
            pending.fail(DeadlineExceeded(f"no answer within {pending.timeout:.1f}s"))
        except Exception as e:
            pending.fail(e)
        return pending.finish(rows)

    def start(self, name: str, inputs: dict[str, np.ndarray], *, timeout: float | None = None,
              requested_version: str = "", tenant: Tenant = OPEN) -> "Pending":
        """Resolve, convert and queue one request (it is accepted once this returns); the
        caller waits on ``pending.future`` and calls ``pending.finish(rows)``, or
        ``pending.fail(error)``. Draining does not refuse here: the edge refuses new requests,
        and one it accepted before the drain began still runs."""
        t0 = time.perf_counter()
        try:
            base, version = self.resolve(name, tenant)
        except ModelNotFound:  # one label for every unknown name: clients cannot grow the metric
            self.metrics.requests.labels("<unknown>", "ModelNotFound").inc()
            raise
        submitted = False
        try:
            if requested_version and requested_version != (version.version if version else "1"):
                raise ModelNotFound(f"model {name!r} has no version {requested_version!r}")
            tensors, truncated = self.converters[base].convert(inputs)
            wait = self.config.request_timeout_s if timeout is None else timeout
            deadline = time.perf_counter() + wait
            req = Request(tensors, version, model=self.label(name), deadline=deadline, tenant=tenant.name)
            self._gauge(self.metrics.waiting, req.model, +1)
            try:
                future = self.batchers[base].submit(req)
            except Exception:
                self._gauge(self.metrics.waiting, req.model, -1)
                raise
            submitted = True
            if version is not None:
                # The lease ends when the batch is done with it, not when this caller stops
                # waiting: a timed-out request may still be queued or running.
                future.add_done_callback(lambda _f, v=version: self.registry.release(v))
            self._track(version)
        except Exception as e:
            self.metrics.requests.labels(self.label(name), type(e).__name__).inc()
            raise
        finally:
            if version is not None and not submitted:
                self.registry.release(version)
        pending = Pending(self, name, base, version, future, t0, wait, deadline)
        pending.truncated = truncated
        return pending

    def _track(self, version: Version | None) -> None:
        """Automatic merged fast path: when one adapter has `auto_merge_share` of the last
        `auto_merge_window` requests, build its merged copy in the background (one per base);
        the previous one's copy is dropped."""
        if not self.config.auto_merge:
            return
        with self._merge_lock, self.registry.lock:
            self._recent.append(version)
            if len(self._recent) < self._recent.maxlen:
                return
            counts = Counter(id(v) for v in self._recent if v is not None)
            if not counts:
                return
            vid, n = counts.most_common(1)[0]
            if n < self.config.auto_merge_share * len(self._recent):
                return
            dominant = next(v for v in self._recent if v is not None and id(v) == vid)
            previous = self._auto_merged.get(dominant.base_model)
            if previous is dominant or dominant.merged is not None or dominant.retired:
                return
            if previous is not None:
                self._demote(previous)
            self._auto_merged[dominant.base_model] = dominant
            dominant.pinned = True  # its folded factors and head must stay while the copy serves
            engine = self.engines[dominant.base_model]

        def build() -> None:
            try:
                merged = engine.build_merged(self.registry.fold(dominant))
            except Exception:
                log.exception("auto-merge of %s failed", dominant.name)
                merged = None
            with self._merge_lock, self.registry.lock:
                if merged is not None and not dominant.retired and self._auto_merged.get(dominant.base_model) is dominant:
                    dominant.merged = merged
                    log.info("auto-merged %s (%d of the last %d requests)", dominant.name, n, len(self._recent))
                elif self._auto_merged.get(dominant.base_model) is dominant:
                    self._demote(dominant)
                    del self._auto_merged[dominant.base_model]

        threading.Thread(target=build, name="auto-merge", daemon=True).start()

    def _demote(self, version: Version) -> None:
        """Drop an automatic merged copy (configured ones stay)."""
        if version.name not in self.config.merged:
            version.merged = None
            version.pinned = version.name in self.config.pinned

    def _outputs(self, rows: list[dict[str, Any]], base: str, version: Version | None) -> dict[str, np.ndarray]:
        keys = rows[0].keys()
        out = {k: torch.stack([r[k] for r in rows]).numpy() for k in keys}
        labels = version.labels if version is not None else None
        if (version is None or version.head_size is None) and "logits" in out:  # the base's own head
            spec = self.specs[base]
            labels = list(spec.labels) if spec.labels else None
        if labels and "logits" in out:
            idx = out["logits"].argmax(-1)
            out["labels"] = np.array([labels[i].encode() for i in idx], dtype=object)
        return out

    # --- lifecycle --------------------------------------------------------------------------
    def drain(self) -> None:
        """Refuse new requests, let queued ones finish, stop the workers."""
        self.draining = True
        self.ready = False
        for b in self.batchers.values():
            b.stop()
