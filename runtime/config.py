"""`ServeConfig`: what `wara serve` reads from TOML and flags, validated in one place."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from wara_train.bases import BUILTINS
from wara_train.basespec import parse_source
from wara_train.errors import ConfigError

from .auth import Authenticator, Tenant
from .names import RULE, is_model_name
from .selection import check_dtype
from .tls import TlsConfig

BACKENDS = ("auto", "torch", "onnxruntime")


@dataclass(frozen=True)
class BaseEntry:
    """One served base: its served name and its source (a built-in name, hf:PATH, py:mod:fn),
    with a task for hf sources, and the dtype it computes in (None: the server's ``dtype``).
    ``NAME=SOURCE[@TASK]`` on the command line, a ``[[serve.base]]`` table (name, source, task,
    dtype) in TOML; a bare built-in name serves it under its own name."""

    name: str
    source: str
    task: str | None = None
    dtype: str | None = None  # float32, bfloat16 or auto (`runtime.selection.engine_dtype`)

    def __post_init__(self) -> None:
        if not is_model_name(self.name):
            raise ConfigError(f"base name {self.name!r}: {RULE}")
        kind, _, suffix_task = parse_source(self.source)  # checks the syntax and any @TASK
        if self.task is not None and kind != "hf":
            raise ConfigError(f"base {self.name!r}: a task applies to hf: sources only")
        if self.task is not None and suffix_task is not None and self.task != suffix_task:
            raise ConfigError(f"base {self.name!r}: task {self.task!r} and the source's @{suffix_task} disagree")
        if self.dtype is not None:
            check_dtype(self.dtype, f"dtype of base {self.name!r}")

    @classmethod
    def parse(cls, text: str) -> "BaseEntry":
        """``NAME=SOURCE[@TASK]``, or a built-in name alone."""
        if "=" not in text:
            return cls(text, text)
        name, _, source = text.partition("=")
        return cls(name, source)

    @classmethod
    def from_table(cls, table: Any) -> "BaseEntry":
        if not isinstance(table, dict) or set(table) - {"name", "source", "task", "dtype"} or "source" not in table:
            raise ConfigError(f"[[serve.base]] needs 'source' and takes 'name', 'task' and 'dtype' only, got {table!r}")
        source = table["source"]
        return cls(table.get("name") or source, source, table.get("task"), table.get("dtype"))


@dataclass(frozen=True)
class RayConfig:
    """``[serve.ray]`` (or ``wara serve --ray``): serve as a Ray Serve application of
    ``replicas`` full serving cores behind this process's gRPC edge (`runtime.ray_serve`)."""

    replicas: int = 2
    address: str | None = None  # an existing cluster ("auto" on one of its nodes, "HOST:6379"); None: start a local one
    num_cpus: int | None = None  # CPUs of the local cluster (default: this machine's)
    replica_cpus: float = 1.0  # CPUs each replica reserves (and its torch threads)
    replica_gpus: float = 0.0  # GPUs each replica reserves
    max_ongoing_requests: int = 256  # requests one replica takes at once before its router tries the next
    app_name: str = "wara"  # the Ray Serve application's name (one `wara serve --ray` per name and cluster)

    def __post_init__(self) -> None:
        for name in ("replicas", "max_ongoing_requests"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ray {name} must be a positive integer, got {value!r}")
        if self.num_cpus is not None and (isinstance(self.num_cpus, bool) or not isinstance(self.num_cpus, int)
                                          or self.num_cpus < 1):
            raise ConfigError(f"ray num_cpus must be a positive integer, got {self.num_cpus!r}")
        for name in ("replica_cpus", "replica_gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"ray {name} must be a number >= 0, got {value!r}")
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise ConfigError(f"ray address must be a cluster address such as 'auto' or 'HOST:6379', "
                              f"got {self.address!r}")
        if not is_model_name(self.app_name):
            raise ConfigError(f"ray app_name {self.app_name!r}: {RULE}")

    @classmethod
    def from_table(cls, table: Any) -> "RayConfig":
        known = {f.name for f in fields(cls)}
        if not isinstance(table, dict) or set(table) - known:
            extra = sorted(set(table) - known) if isinstance(table, dict) else table
            raise ConfigError(f"[serve.ray] takes {', '.join(sorted(known))}; got {extra!r}")
        return cls(**table)


# What a slot of the PyTorch engine holds: the folded LoRA (``wara::sgmv`` or the GEMM pair), the
# adapter's own WaRA factors (``wara::wavelet_lowrank``: half the multiply-adds and, at J = 1,
# half the pages), or per adapter whichever `runtime.selection.own_form_wins` measured faster.
SlotForm = Literal["auto", "folded", "own"]
SLOT_FORMS: tuple[str, ...] = ("auto", "folded", "own")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8001  # 0: any free port
    adapter_root: str | None = None  # sub-directories with an adapter: loadable by name, and on first request
    # At start the root is indexed (configs and header sizes; no tensors) and each adapter loads
    # on its first request; true: load (read, check, fold-check) every one at start instead.
    preload: bool = False
    bases: tuple[BaseEntry, ...] = tuple(BaseEntry(b, b) for b in BUILTINS)  # served bases; default: the built-ins
    # "torch", "onnxruntime" (the exporter's multi graph, slot factors as inputs), or "auto":
    # per base, the one that is faster here (`runtime.selection.engine_backend`).
    backend: str = "auto"
    device: str | None = None  # default: cuda when present, else cpu
    # What every base computes in unless its [[serve.base]] table says: "float32", "bfloat16",
    # or "auto": bfloat16 where the device has units for it and the engine runs it, else float32
    # (`runtime.selection.engine_dtype`). Adapters keep theirs on disk and are cast once when
    # prepared; their math accumulates in float32, merges sum in float32, outputs are float32.
    dtype: str = "float32"
    # The device tier per base: a pool of this many MB, cut into pages of one rank of every
    # adapted layer; an adapter takes as many pages as its folded rank (no max-rank padding).
    device_budget_mb: float = 256.0
    max_rank: int = 128  # the largest folded rank an adapter may have (rank x (3 levels + 1))
    # What a slot of the PyTorch engine holds: "folded" LoRA factors, the adapter's "own" WaRA
    # factors (the fused wavelet op; fewer pages), or "auto": per adapter, the form measured
    # faster (`runtime.selection.own_form_wins`). Own factors need the native kernels; the
    # onnxruntime engine always folds.
    slot_form: str = "auto"
    max_batch: int = 32  # rows per forward pass
    max_delay_ms: float = 5.0  # how long the first request of a batch may wait for company
    # With more distinct adapters queued than slots, resident ones go first; a request that has
    # waited this long goes first whatever its adapter (runtime.batcher).
    resident_wait_ms: float = 50.0
    max_queue: int = 1024  # queued requests per base before RESOURCE_EXHAUSTED
    host_budget_mb: float = 1024.0  # adapters' own factors kept in memory (LRU beyond it; read again from the root)
    max_message_mb: int = 64  # largest gRPC message
    request_timeout_s: float = 30.0  # when the client sets no deadline
    grace_s: float = 10.0  # SIGTERM / Ctrl-C: accepted requests complete within it (a second signal exits at once)
    metrics_port: int | None = None  # Prometheus /metrics; None: off
    metrics_host: str = "127.0.0.1"  # the metrics port's address (loopback unless you open it on purpose)
    # The edge (an asyncio gRPC server): accepted requests are bounded in number and bytes; past
    # either, RESOURCE_EXHAUSTED at once. Requests larger than `inline_decode_kb` are decoded and
    # tokenized on `decode_workers` threads, so they never hold up small ones.
    max_inflight: int = 4096  # requests accepted and not yet answered, all tenants together
    # HTTP/2 streams one connection may have open: a client's excess waits on its own side, so
    # one flooding connection cannot fill the server's pending-call queue ahead of everyone
    # (grpc cancels calls past that queue's limits, CANCELLED with no cause).
    max_streams_per_connection: int = 32
    # A request refused for a full tenant queue or a busy server is answered RESOURCE_EXHAUSTED
    # after this pause, so a client that retries at once does not spin the server.
    overload_backoff_ms: float = 100.0
    max_queued_mb: int = 512  # request bytes accepted and not yet answered (and queued model inputs, per base)
    decode_workers: int = 2
    inline_decode_kb: int = 16
    # Tenancy ([[serve.tenant]] tables, runtime.auth.Tenant): none configured means no
    # authentication, every caller an admin (the loopback default). TLS: a server certificate
    # and key (PEM), and a CA that client certificates must chain to for mutual TLS; the files
    # are read again on SIGHUP.
    tenants: tuple[Tenant, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tls_require_client_cert: bool = True  # with tls_client_ca: refuse clients without a certificate
    max_text_length: int = 128  # tokens per text input (server-side tokenization)
    # Per-request limits, checked before anything is allocated (RESOURCE_EXHAUSTED, naming the
    # limit); a request may also hold at most `max_batch` rows.
    max_adapters: int = 10000  # loaded adapters in total; a new one past it is RESOURCE_EXHAUSTED
    max_request_elements: int = 1 << 24  # tensor elements, all inputs together
    max_request_mb: int = 256  # decoded input bytes, all inputs together
    max_bytes_elements: int = 1024  # BYTES elements (texts, images), all inputs together
    max_bytes_element_mb: int = 16  # one BYTES element (an encoded image, a text)
    max_text_bytes: int = 1 << 16  # one text, UTF-8 bytes (tokenized, then cut to max_text_length)
    max_request_text_bytes: int = 1 << 20  # all texts of a request, UTF-8 bytes
    pinned: tuple[str, ...] = ()  # adapters never evicted from the host tier
    merged: tuple[str, ...] = ()  # adapters also kept as a merged copy: their own batches skip the adapter math
    auto_merge: bool = True  # also merge, per base, the one adapter that dominates recent traffic
    auto_merge_window: int = 200  # recent requests looked at
    auto_merge_share: float = 0.9  # share of them one adapter must have
    ray: RayConfig | None = None  # [serve.ray]: scale out on Ray Serve (runtime.ray_serve); None: one process

    def __post_init__(self) -> None:
        if isinstance(self.ray, dict):
            object.__setattr__(self, "ray", RayConfig.from_table(self.ray))
        elif self.ray is not None and not isinstance(self.ray, RayConfig):
            raise ConfigError(f"ray must be a [serve.ray] table, got {self.ray!r}")
        bases = (self.bases,) if isinstance(self.bases, (str, BaseEntry)) else self.bases
        if not isinstance(bases, (list, tuple)) or not bases:
            raise ConfigError("bases must list at least one base (NAME=SOURCE[@TASK] or a built-in name)")
        bases = tuple(b if isinstance(b, BaseEntry) else BaseEntry.parse(b) if isinstance(b, str) else BaseEntry.from_table(b)
                      for b in bases)
        names = [b.name for b in bases]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"base names must be unique; {dup} appear twice")
        object.__setattr__(self, "bases", bases)
        tenants = self.tenants
        if isinstance(tenants, (Tenant, dict)):
            tenants = (tenants,)
        if not isinstance(tenants, (list, tuple)):
            raise ConfigError(f"tenants must be a list of [[serve.tenant]] tables, got {type(tenants).__name__}")
        tenants = tuple(t if isinstance(t, Tenant) else Tenant.from_table(t) for t in tenants)
        Authenticator(tenants)  # names, token hashes and subjects unique across tenants
        object.__setattr__(self, "tenants", tenants)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both tls_cert and tls_key (PEM files)")
        if not isinstance(self.preload, bool):
            raise ConfigError(f"preload must be true or false, got {self.preload!r}")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key as well")
        if self.tls is not None:
            TlsConfig(self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_require_client_cert)  # files readable
        for name in ("pinned", "merged"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a list of names, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{f.name} must be a number, got {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise ConfigError(f"{f.name} must be an integer, got {value!r}")
        if self.slot_form not in SLOT_FORMS:
            raise ConfigError(f"unknown slot_form {self.slot_form!r}: valid forms are {', '.join(SLOT_FORMS)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}: valid backends are {', '.join(BACKENDS)}")
        check_dtype(self.dtype)
        for name in ("max_rank", "max_batch", "max_queue", "max_message_mb", "max_text_length", "max_inflight",
                     "max_streams_per_connection", "max_queued_mb", "decode_workers", "inline_decode_kb",
                     "max_adapters", "max_request_elements", "max_request_mb", "max_bytes_elements", "max_bytes_element_mb",
                     "max_text_bytes", "max_request_text_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.device_budget_mb <= 0:
            raise ConfigError(f"device_budget_mb must be > 0, got {self.device_budget_mb!r}")
        if not (0 <= self.port <= 65535):
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.resident_wait_ms < 0:
            raise ConfigError(f"resident_wait_ms must be >= 0, got {self.resident_wait_ms!r}")
        if self.max_delay_ms < 0 or self.host_budget_mb <= 0 or self.request_timeout_s <= 0 or self.grace_s < 0:
            raise ConfigError("max_delay_ms, grace_s must be >= 0; host_budget_mb, request_timeout_s > 0")
        if not (0.5 < self.auto_merge_share <= 1.0) or self.auto_merge_window < 1:
            raise ConfigError("auto_merge_share must be in (0.5, 1] and auto_merge_window >= 1")
        if self.adapter_root is not None and not Path(self.adapter_root).is_dir():
            raise ConfigError(f"adapter_root {self.adapter_root!r} is not a directory")

    @property
    def tls(self) -> "TlsConfig | None":
        if self.tls_cert is None:
            return None
        return TlsConfig(self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_require_client_cert)

    def dtype_for(self, base: str) -> str:
        """The dtype base ``base`` asks for: its own table's, else the server's."""
        entry = next((b for b in self.bases if b.name == base), None)
        return entry.dtype if entry is not None and entry.dtype is not None else self.dtype

    def replace(self, **changes: Any) -> "ServeConfig":
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        return ServeConfig(**{**current, **{k: v for k, v in changes.items() if v is not None}})

    @classmethod
    def from_toml(cls, path: str | Path) -> "ServeConfig":
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        section = dict(data.get("serve", data))
        if "base" in section:  # [[serve.base]] tables
            if "bases" in section:
                raise ConfigError(f"{path}: give either 'bases' or [[serve.base]] tables, not both")
            tables = section.pop("base")
            if not isinstance(tables, list):
                raise ConfigError(f"{path}: 'base' must be an array of tables: [[serve.base]]")
            section["bases"] = tuple(BaseEntry.from_table(t) for t in tables)
        if "tenant" in section:  # [[serve.tenant]] tables
            tables = section.pop("tenant")
            if not isinstance(tables, list):
                raise ConfigError(f"{path}: 'tenant' must be an array of tables: [[serve.tenant]]")
            section["tenants"] = tuple(tables)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; valid keys are {', '.join(sorted(known))}")
        try:
            return cls(**section)
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None
