"""`Service`: the serving core of one process (`runtime.core.ServingCore`).

It holds the served bases (one engine, one input converter and one batcher each) and the
adapter repository (`runtime.adapters`), and answers the core's calls: an inference request is
resolved to a leased adapter version (loaded from the root first if it is on disk), converted to
tensors, queued for its base's batcher and answered with its own rows. Blocking work (loading,
tokenizing a big request) runs on the service's threads, never on a caller's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, AsyncIterator, Mapping

import numpy as np
import torch

from wara_train.basespec import BaseSpec, TensorSpec, resolve_base
from wara_train.errors import ConfigError

from . import native
from .adapters import Repository
from .adapters.host import Version
from .auth import OPEN, Tenant, require_admin
from .automerge import AutoMerge
from .batcher import Batcher, Request
from .config import BaseEntry, ServeConfig
from .core import Answer, IndexRow, ModelInfo, Piece
from .engine import TorchEngine
from .errors import DeadlineExceeded, Draining, InvalidRequest, ModelNotFound
from .gauges import ModelGauges
from .inputs import InputConverter, input_specs
from .metrics import Metrics
from .names import unknown_model
from .selection import engine_backend, resolve_dtype

log = logging.getLogger("wara.serve")


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
    says which engine serves it. The base computes in the dtype it asks for (`ServeConfig.dtype_for`;
    onnxruntime runs float32 only: "auto" is float32 there, bfloat16 a ConfigError)."""
    dtype = config.dtype_for(spec.name)
    backend = engine_backend(config, spec, dtype=dtype)
    if backend == "onnxruntime":
        from .ort_engine import OrtEngine

        try:
            resolve_dtype(dtype, backend=backend, device="cpu")
        except ConfigError as e:
            raise ConfigError(f"base {spec.name!r}: {e}") from None

        try:
            return OrtEngine(spec, device_budget_mb=config.device_budget_mb, max_rank=config.max_rank)
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if config.backend != "auto":
                raise ConfigError(f"base {spec.name!r}: the onnxruntime engine could not be built ({why}); "
                                  "serve it with backend 'torch' or 'auto'") from None
            log.warning("base %s: the onnxruntime engine could not be built (%s); serving it with PyTorch", spec.name, why)
    return TorchEngine(spec, device_budget_mb=config.device_budget_mb, max_rank=config.max_rank, device=config.device,
                       slot_form=config.slot_form, dtype=dtype)


ONE_SHOT_TASKS = ("feature-extraction", "text-classification", "image-classification", "custom")


def resolve_entry(entry: BaseEntry) -> BaseSpec:
    """The spec of a served base; a task this server cannot serve yet is a clear refusal."""
    spec = resolve_base(entry.source, task=entry.task, name=entry.name)
    if spec.task not in ONE_SHOT_TASKS:
        raise ConfigError(f"base {spec.name!r} is a {spec.task} model; this server serves one-shot bases "
                          f"({', '.join(ONE_SHOT_TASKS[:-1])}) only: train and export it with `wara train` / "
                          "`wara export`")
    return spec


class Pending:
    """One accepted request: its batch future, and how to turn its rows into an `Answer`."""

    def __init__(self, service: "Service", name: str, base: str, version: Version | None, future, t0: float,
                 timeout: float, deadline: float, truncated: list[int]) -> None:
        self.service, self.name, self.base, self.version = service, name, base, version
        self.future, self.t0, self.timeout, self.deadline = future, t0, timeout, deadline
        self.truncated = truncated  # rows whose text was cut to max_text_length tokens

    @property
    def wait_s(self) -> float:
        """How long the caller may wait for the batch: the deadline, and a second for it to run."""
        return max(0.0, self.deadline - time.perf_counter()) + 1.0

    def fail(self, error: BaseException) -> None:
        """Count the failure and raise it."""
        self.service.metrics.requests.labels(self.service.gauges.label(self.name), type(error).__name__).inc()
        raise error

    def finish(self, rows: list) -> Answer:
        service, version = self.service, self.version
        outputs = service._outputs(rows, self.base, version)
        service.metrics.requests.labels(service.gauges.label(self.name), "ok").inc()
        service.metrics.latency.observe(time.perf_counter() - self.t0)
        return Answer(version.version if version else "1", outputs, tuple(self.truncated),
                      service.converters[self.base].text_tokens if self.truncated else 0)


class Service:
    """The serving core of one process; see `runtime.core.ServingCore` for the contract."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.specs = {e.name: resolve_entry(e) for e in config.bases}  # every base checked before any is built
        self.engines = {name: make_engine(config, spec) for name, spec in self.specs.items()}
        for name, engine in self.engines.items():
            self.metrics.kernel.labels(name, engine.kernel_name).set(1)
            log.info("base %s: %s, adapter kernel %s", name, str(engine.dtype).removeprefix("torch."), engine.kernel_name)
        self.converters = {name: InputConverter(spec, max_text_length=config.max_text_length,
                                                max_text_bytes=config.max_text_bytes,
                                                max_request_text_bytes=config.max_request_text_bytes)
                           for name, spec in self.specs.items()}
        self.repository = Repository(self.engines, root=config.adapter_root,
                                     host_budget_bytes=int(config.host_budget_mb * (1 << 20)),
                                     max_adapters=config.max_adapters, tenants=config.tenants, pinned=config.pinned,
                                     merged=config.merged, observe=self.metrics.observe_tier_load)
        self.gauges = ModelGauges(self.metrics, self.engines, self.repository)
        self.batchers = {b: Batcher(e, self.repository.device[b], max_batch=config.max_batch,
                                    max_delay_ms=config.max_delay_ms, max_queue=config.max_queue,
                                    max_queued_bytes=config.max_queued_mb << 20,
                                    resident_wait_ms=config.resident_wait_ms, on_batch=self._on_batch,
                                    on_start=self.gauges.on_start, on_end=self.gauges.on_end,
                                    on_expire=self.gauges.on_expire)
                         for b, e in self.engines.items()}
        self.automerge = AutoMerge(self.repository, window=config.auto_merge_window, share=config.auto_merge_share,
                                   configured=set(config.merged), pinned=set(config.pinned)) if config.auto_merge else None
        self.metrics.add_lora_info(self.gauges.lora_snapshot)
        self.metrics.add_tiers(self.repository.tiers)
        self.metrics.add_pack_cache(native.pack_cache_stats)
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, config.decode_workers), thread_name_prefix="wara-core")
        self.inline_bytes = config.inline_decode_kb << 10
        self._ready = False
        self.draining = False
        catalog = self.repository.catalog
        if catalog is not None and config.preload:
            for name in catalog.names():
                problem = catalog.entries[name].problem
                if problem is not None:
                    log.warning("skipping adapter %s: %s", name, problem)
                    continue
                try:
                    self.load_now(name)
                except Exception as e:  # one bad adapter must not stop the server
                    log.warning("skipping adapter %s: %s", name, e)
        self._ready = True

    @property
    def ready(self) -> bool:
        return self._ready and not self.draining

    def _on_batch(self, base: str, rows: int) -> None:
        self.metrics.observe_batch(base, rows)
        self.metrics.evictions.labels("host").set(self.repository.stats["host_evictions"])
        self.metrics.evictions.labels("slot").set(self.repository.stats["slot_evictions"])

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # --- repository -------------------------------------------------------------------------
    def load_now(self, name: str, files: dict[str, bytes] | None = None) -> Version:
        """Load a version of ``name`` (blocking; no tenant check: the in-process API)."""
        t0 = time.perf_counter()
        version = self.repository.load(name, files)
        self.metrics.loads.inc()
        self.metrics.load_latency.observe(time.perf_counter() - t0)
        return version

    def unload_now(self, name: str) -> None:
        """Unload ``name`` (no tenant check: the in-process API)."""
        self.repository.unload(name)
        self.metrics.forget(name)  # its request counts; its gauges go when they are back at 0
        self.gauges.forget(name)
        self.metrics.unloads.inc()

    async def load(self, name: str, files: dict[str, bytes] | None = None, *, tenant: Tenant = OPEN) -> str:
        require_admin(tenant)
        return (await self._off_loop(self.load_now, name, files)).version

    async def unload(self, name: str, *, tenant: Tenant = OPEN) -> None:
        require_admin(tenant)
        self.unload_now(name)

    def index_rows(self, tenant: Tenant = OPEN) -> list[IndexRow]:
        rows = [IndexRow(b, "1", "READY") for b in self.engines]
        return rows + [IndexRow(*row) for row in self.repository.index(tenant)]

    async def index(self, *, tenant: Tenant = OPEN, ready_only: bool = False) -> list[IndexRow]:
        return [r for r in self.index_rows(tenant) if not ready_only or r.state == "READY"]

    # --- metadata ---------------------------------------------------------------------------
    def describe(self, name: str, tenant: Tenant = OPEN, *, load: bool = False) -> ModelInfo:
        """The model's description; an adapter on disk is loaded first when ``load``."""
        base, version = self.resolve(name, tenant, load=load)
        try:
            engine = self.engines[base]
            return ModelInfo(name, base, f"{engine.platform}:{base}", [version.version] if version else ["1"],
                             input_specs(self.specs[base]), output_specs(engine, version))
        finally:
            if version is not None:
                self.repository.release(version)

    async def metadata(self, name: str, *, tenant: Tenant = OPEN) -> ModelInfo:
        if self.repository.needs_load(name, tenant):  # its outputs depend on its head: load it first
            return await self._off_loop(lambda: self.describe(name, tenant, load=True))
        return self.describe(name, tenant)

    async def model_ready(self, name: str, version: str = "", *, tenant: Tenant = OPEN) -> bool:
        """Whether ``name`` answers: a base; a loaded adapter whose data can still be read; or,
        without a version, one on disk that its first request will load."""
        if not self.ready:
            return False
        if name in self.engines:
            return version in ("", "1")
        repo = self.repository
        if not version and repo.needs_load(name, tenant):
            return repo.loadable(name)
        if not repo.may_use(name, tenant):
            return False
        v = repo.current.get(name)
        return v is not None and v.readable and (not version or version == v.version)

    # --- inference --------------------------------------------------------------------------
    def resolve(self, name: str, tenant: Tenant = OPEN, *, load: bool = True) -> tuple[str, Version | None]:
        """(base model, leased version or None for the base). Caller must release the version."""
        if name in self.engines:
            return name, None
        version = self.repository.lease(name, tenant, load=load)
        return version.base_model, version

    def start(self, name: str, inputs: Mapping[str, np.ndarray], *, timeout: float | None = None,
              version: str = "", tenant: Tenant = OPEN) -> Pending:
        """Resolve (loading from the root if needed: blocking), convert and queue one request;
        it is accepted once this returns."""
        t0 = time.perf_counter()
        try:
            base, leased = self.resolve(name, tenant)
        except ModelNotFound:  # one label for every unknown name: clients cannot grow the metric
            self.metrics.requests.labels("<unknown>", "ModelNotFound").inc()
            raise
        submitted = False
        try:
            if version and version != (leased.version if leased else "1"):
                raise ModelNotFound(f"model {name!r} has no version {version!r}")
            tensors, truncated = self.converters[base].convert(dict(inputs))
            wait = self.config.request_timeout_s if timeout is None else timeout
            deadline = time.perf_counter() + wait
            req = Request(tensors, leased, model=self.gauges.label(name), deadline=deadline, tenant=tenant.name)
            self.gauges.waiting(req.model, +1)
            try:
                future = self.batchers[base].submit(req)
            except Exception:
                self.gauges.waiting(req.model, -1)
                raise
            submitted = True
            if leased is not None:
                # The lease ends when the batch is done with it, not when this caller stops
                # waiting: a timed-out request may still be queued or running.
                future.add_done_callback(lambda _f, v=leased: self.repository.release(v))
            if self.automerge is not None:
                self.automerge.track(leased)
        except Exception as e:
            self.metrics.requests.labels(self.gauges.label(name), type(e).__name__).inc()
            raise
        finally:
            if leased is not None and not submitted:
                self.repository.release(leased)
        return Pending(self, name, base, leased, future, t0, wait, deadline, truncated)

    def predict(self, name: str, inputs: Mapping[str, np.ndarray], *, timeout: float | None = None,
                version: str = "", tenant: Tenant = OPEN) -> tuple[str, dict[str, np.ndarray]]:
        """One request, in process and blocking: (version that ran, outputs)."""
        if self.draining:
            raise Draining("the server is draining and takes no new requests")
        pending = self.start(name, inputs, timeout=timeout, version=version, tenant=tenant)
        try:
            rows = pending.future.result(timeout=pending.wait_s)
        except FutureTimeout:
            pending.fail(DeadlineExceeded(f"no answer within {pending.timeout:.1f}s"))
        except Exception as e:
            pending.fail(e)
        answer = pending.finish(rows)
        return answer.version, answer.outputs

    async def infer(self, name: str, inputs: Mapping[str, np.ndarray], *, tenant: Tenant = OPEN,
                    timeout: float | None = None, version: str = "") -> Answer:
        """Draining does not refuse here: the edge refuses new requests, and one it accepted
        before the drain began still runs."""
        def start() -> Pending:
            return self.start(name, inputs, timeout=timeout, version=version, tenant=tenant)

        big = _nbytes(inputs) > self.inline_bytes
        if big or self.repository.needs_load(name, tenant):  # tokenize or load off the caller's loop
            pending = await self._off_loop(start)
        else:
            pending = start()
        try:
            rows = await _result(pending.future, pending.wait_s)
        except asyncio.TimeoutError:
            pending.fail(DeadlineExceeded(f"no answer within {pending.timeout:.1f}s"))
        except Exception as e:
            pending.fail(e)
        return pending.finish(rows)

    async def generate(self, name: str, prompt: str, params: Mapping[str, Any], *,
                       tenant: Tenant = OPEN) -> AsyncIterator[Piece]:
        """No served base generates text here: a base is one-shot (classify, embed)."""
        base, version = self.resolve(name, tenant, load=False)
        if version is not None:
            self.repository.release(version)
        raise InvalidRequest(f"model {name!r} does not generate text: its base {base!r} is a "
                             f"{self.specs[base].output} model; send it to infer")
        yield Piece("")  # pragma: no cover - makes this an async generator

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
        for b in self.batchers.values():
            b.stop()
        self.pool.shutdown(wait=False)


def _nbytes(inputs: Mapping[str, np.ndarray]) -> int:
    """Bytes of a request's inputs, texts counted by their length (not by their pointers)."""
    total = 0
    for a in inputs.values():
        if getattr(a, "dtype", None) == object:
            total += sum(len(x) for x in a.flat if isinstance(x, (bytes, str)))
        else:
            total += int(getattr(a, "nbytes", 0))
    return total


async def _result(future: concurrent.futures.Future, timeout: float) -> Any:
    """Await a batcher future without ever cancelling it (the batch sets its result later)."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def copy(f: concurrent.futures.Future) -> None:
        if not waiter.done():
            error = f.exception()
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(f.result())

    future.add_done_callback(lambda f: loop.call_soon_threadsafe(copy, f))
    return await asyncio.wait_for(asyncio.shield(waiter), timeout)


__all__ = ["Service", "Pending", "output_specs", "make_engine", "unknown_model"]
