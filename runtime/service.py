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
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wara_train.artifact import CONFIG_NAME

from .batcher import Batcher, Request
from .config import ServeConfig, resolve_backend
from .engine import TorchEngine
from .errors import DeadlineExceeded, Draining, InvalidRequest, ModelNotFound
from .metrics import Metrics
from .registry import Registry, Version, read_dir

log = logging.getLogger("wara.serve")
SERVER_NAME = "wara-serve"
SERVER_VERSION = "0.1.0"
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


def input_specs(base_model: str) -> list[TensorSpec]:
    if base_model == "minilm":
        return [TensorSpec("text", "BYTES", (-1,)), TensorSpec("input_ids", "INT64", (-1, -1)),
                TensorSpec("attention_mask", "INT64", (-1, -1))]
    return [TensorSpec("images", "FP32", (-1, 3, -1, -1))]


def output_specs(base_model: str, version: Version | None) -> list[TensorSpec]:
    if version is None:
        if base_model == "minilm":
            return [TensorSpec("embeddings", "FP32", (-1, 384))]
        return [TensorSpec("logits", "FP32", (-1, 1000))]
    n = len(version.labels) if version.labels else -1
    specs = [TensorSpec("logits", "FP32", (-1, n))]
    if version.labels:
        specs.append(TensorSpec("labels", "BYTES", (-1,)))
    return specs


def make_engine(config: ServeConfig, base: str) -> TorchEngine:
    """The configured backend for one base model (a registry of two)."""
    if resolve_backend(config, base) == "onnxruntime":
        from .ort_engine import OrtEngine

        return OrtEngine(base, slots=config.slots, max_rank=config.max_rank)
    return TorchEngine(base, slots=config.slots, max_rank=config.max_rank, device=config.device)


class Service:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.engines = {b: make_engine(config, b) for b in config.bases}
        self.registry = Registry(self.engines, host_budget_bytes=int(config.host_budget_mb * (1 << 20)))
        self.batchers = {b: Batcher(e, self.registry, max_batch=config.max_batch, max_delay_ms=config.max_delay_ms,
                                    max_queue=config.max_queue, on_batch=self._on_batch,
                                    on_start=self._on_start, on_end=self._on_end, on_expire=self._on_expire)
                         for b, e in self.engines.items()}
        self._recent: deque = deque(maxlen=config.auto_merge_window)
        self._auto_merged: dict[str, Version] = {}
        self._merge_lock = threading.Lock()
        self._tokenizer = None
        self._tok_lock = threading.Lock()
        self.ready = False
        self.draining = False
        if config.adapter_root:
            for d in sorted(Path(config.adapter_root).iterdir()):
                if (d / CONFIG_NAME).is_file():
                    try:
                        self.load(d.name)
                    except Exception as e:  # one bad adapter must not stop the server
                        log.warning("skipping adapter %s: %s", d.name, e)
        self.ready = True

    def _on_batch(self, base: str, rows: int) -> None:
        self.metrics.observe_batch(base, rows)
        self.metrics.evictions.labels("host").set(self.registry.stats["host_evictions"])
        self.metrics.evictions.labels("slot").set(self.registry.stats["slot_evictions"])

    def _on_start(self, batch: list[Request]) -> None:
        for r in batch:
            self.metrics.waiting.labels(r.model).dec()
            self.metrics.running.labels(r.model).inc()

    def _on_expire(self, requests: list[Request]) -> None:
        for r in requests:
            self.metrics.waiting.labels(r.model).dec()

    def _on_end(self, batch: list[Request]) -> None:
        for r in batch:
            self.metrics.running.labels(r.model).dec()

    # --- repository -------------------------------------------------------------------------
    def load(self, name: str, files: dict[str, bytes] | None = None) -> Version:
        t0 = time.perf_counter()
        if not ADAPTER_NAME.match(name) or ".." in name:
            raise InvalidRequest(f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-' (at most 128)")
        if files is None:
            if not self.config.adapter_root:
                raise ModelNotFound(f"no adapter root is configured to load {name!r} from; send the files instead")
            files = read_dir(Path(self.config.adapter_root) / name)
        version = self.registry.load(name, files, pinned=name in self.config.pinned, merged=name in self.config.merged)
        self.metrics.loads.inc()
        self.metrics.load_latency.observe(time.perf_counter() - t0)
        return version

    def unload(self, name: str) -> None:
        if name in self.engines:
            raise InvalidRequest(f"{name!r} is a base model; only adapters can be unloaded")
        self.registry.unload(name)
        self.metrics.unloads.inc()

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for bases, loaded adapters and unloaded ones on disk."""
        rows = [(b, "1", "READY", "") for b in self.engines]
        loaded = {v.name: v for v in self.registry.index()}
        rows += [(v.name, v.version, "READY", "") for v in loaded.values()]
        if self.config.adapter_root:
            for d in sorted(Path(self.config.adapter_root).iterdir()):
                if (d / CONFIG_NAME).is_file() and d.name not in loaded:
                    rows.append((d.name, "", "UNAVAILABLE", "not loaded"))
        return rows

    def resolve(self, name: str) -> tuple[str, Version | None]:
        """(base model, leased version or None for the base). Caller must `release`."""
        if name in self.engines:
            return name, None
        version = self.registry.lease(name)
        return version.base_model, version

    def describe(self, name: str) -> tuple[str, list[str], list[TensorSpec], list[TensorSpec]]:
        base, version = self.resolve(name)
        try:
            versions = [version.version] if version else ["1"]
            return base, versions, input_specs(base), output_specs(base, version)
        finally:
            if version is not None:
                self.registry.release(version)

    # --- inference ------------------------------------------------------------------------
    def infer(self, name: str, inputs: dict[str, np.ndarray], *, timeout: float | None = None,
              requested_version: str = "") -> tuple[str, dict[str, np.ndarray]]:
        """Run one request; returns (version that ran, outputs)."""
        if self.draining:
            raise Draining("the server is draining and takes no new requests")
        t0 = time.perf_counter()
        try:
            base, version = self.resolve(name)
        except ModelNotFound:  # one label for every unknown name: clients cannot grow the metric
            self.metrics.requests.labels("<unknown>", "ModelNotFound").inc()
            raise
        label = name
        submitted = False
        try:
            if requested_version and requested_version != (version.version if version else "1"):
                raise ModelNotFound(f"model {name!r} has no version {requested_version!r}")
            tensors = self._model_inputs(base, inputs)
            wait = self.config.request_timeout_s if timeout is None else timeout
            deadline = time.perf_counter() + wait
            req = Request(tensors, version, model=label, deadline=deadline)
            self.metrics.waiting.labels(label).inc()
            try:
                future = self.batchers[base].submit(req)
            except Exception:
                self.metrics.waiting.labels(label).dec()
                raise
            submitted = True
            if version is not None:
                # The lease ends when the batch is done with it, not when this caller stops
                # waiting: a timed-out request may still be queued or running.
                future.add_done_callback(lambda _f, v=version: self.registry.release(v))
            self._track(version)
            try:
                rows = future.result(timeout=max(0.0, deadline - time.perf_counter()) + 1.0)
            except FutureTimeout:
                raise DeadlineExceeded(f"no answer within {wait:.1f}s") from None
        except Exception as e:
            self.metrics.requests.labels(label, type(e).__name__).inc()
            raise
        finally:
            if version is not None and not submitted:
                self.registry.release(version)
        outputs = self._outputs(rows, version)
        self.metrics.requests.labels(label, "ok").inc()
        self.metrics.latency.observe(time.perf_counter() - t0)
        return (version.version if version else "1"), outputs

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
            if previous is dominant or dominant.merged is not None or dominant.retired or dominant.folded is None:
                return
            if previous is not None:
                self._demote(previous)
            self._auto_merged[dominant.base_model] = dominant
            dominant.pinned = True  # its folded factors and head must stay while the copy serves
            folded, engine = dominant.folded, self.engines[dominant.base_model]

        def build() -> None:
            try:
                merged = engine.build_merged(folded)
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

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from wara_train.bases import MiniLMTokenizer

        with self._tok_lock:
            if self._tokenizer is None:
                self._tokenizer = MiniLMTokenizer(max_length=self.config.max_text_length)
            enc = self._tokenizer(texts)
        return enc["input_ids"], enc["attention_mask"]

    def _model_inputs(self, base: str, inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        for name, arr in inputs.items():
            if arr.ndim == 0 or arr.shape[0] == 0:
                raise InvalidRequest(f"input {name!r} has an empty batch (shape {list(arr.shape)})")
        if base == "minilm":
            if "text" in inputs:
                extra = set(inputs) - {"text"}
                if extra:
                    raise InvalidRequest(f"send either 'text' or 'input_ids' + 'attention_mask', not both ({sorted(extra)})")
                arr = inputs["text"]
                if arr.dtype != object:
                    raise InvalidRequest("input 'text' must be BYTES")
                if arr.ndim == 2 and arr.shape[1] == 1:
                    arr = arr[:, 0]
                if arr.ndim != 1:
                    raise InvalidRequest(f"input 'text' must have shape [batch] or [batch, 1], got {list(arr.shape)}")
                try:
                    texts = [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in arr]
                except UnicodeDecodeError:
                    raise InvalidRequest("input 'text' is not valid UTF-8") from None
                return self._tokenize(texts)
            missing = [n for n in ("input_ids", "attention_mask") if n not in inputs]
            if missing:
                raise InvalidRequest(f"missing input {missing[0]!r}: minilm takes 'text' (BYTES) or 'input_ids' + 'attention_mask' (INT64)")
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            for n, a in (("input_ids", ids), ("attention_mask", mask)):
                if a.dtype != np.int64:
                    raise InvalidRequest(f"input {n!r} must be INT64, got {a.dtype}")
                if a.ndim != 2:
                    raise InvalidRequest(f"input {n!r} must have shape [batch, seq], got {list(a.shape)}")
            if ids.shape != mask.shape:
                raise InvalidRequest(f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} differ in shape")
            if ids.shape[1] > 512 or ids.min() < 0 or ids.max() >= 30522:
                raise InvalidRequest("input_ids must be token ids in [0, 30522) with at most 512 per row")
            return torch.from_numpy(ids.copy()), torch.from_numpy(mask.copy())
        if "images" not in inputs:
            raise InvalidRequest(f"missing input 'images': {base} takes FP32 images [batch, 3, H, W]")
        img = inputs["images"]
        if img.dtype != np.float32:
            raise InvalidRequest(f"input 'images' must be FP32, got {img.dtype}")
        if img.ndim != 4 or img.shape[1] != 3 or not (32 <= img.shape[2] <= 512 and 32 <= img.shape[3] <= 512):
            raise InvalidRequest(f"input 'images' must have shape [batch, 3, H, W] with 32 <= H, W <= 512, got {list(img.shape)}")
        if not np.isfinite(img).all():
            raise InvalidRequest("input 'images' contains NaN or Inf")
        return (torch.from_numpy(img.copy()),)

    def _outputs(self, rows: list[dict[str, Any]], version: Version | None) -> dict[str, np.ndarray]:
        keys = rows[0].keys()
        out = {k: torch.stack([r[k] for r in rows]).numpy() for k in keys}
        if version is not None and version.labels and "logits" in out:
            idx = out["logits"].argmax(-1)
            out["labels"] = np.array([version.labels[i].encode() for i in idx], dtype=object)
        return out

    # --- lifecycle --------------------------------------------------------------------------
    def drain(self) -> None:
        """Refuse new requests, let queued ones finish, stop the workers."""
        self.draining = True
        self.ready = False
        for b in self.batchers.values():
            b.stop()
