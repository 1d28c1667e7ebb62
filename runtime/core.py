"""The serving core's contract: the one thing a front door (gRPC today, HTTP next) calls.

A front door translates its protocol to these calls and back and authenticates the caller into
a `Tenant`; it decides nothing else (no loading, no routing, no tenant checks of its own). Two
implementations: `runtime.service.Service` (one process) and `runtime.ray_serve.cluster.Cluster`
(replicas on Ray Serve).

Contract (every method may raise a `runtime.errors` error; the edges map it with
`runtime.errors.status_code`):

    config                                  ServeConfig: the limits the edges enforce (message sizes, admission, grace)
    metrics                                 Metrics: where the edges count refusals and tenants in flight
    ready                                   bool: serving, and not draining
    model_ready(name, version, tenant)      bool: name (at version) answers now, or loads on its first request
    metadata(name, tenant)                  ModelInfo of name; an adapter on disk is loaded first
    infer(name, inputs, tenant, timeout, version) -> Answer: one request, batched with others;
                                            an adapter on disk is loaded first (once, however many ask)
    generate(name, prompt, params, tenant)  AsyncIterator[Piece]: text pieces as they are made; the
                                            caller cancels by closing the iterator (``aclose``)
    load(name, files, tenant)               version: a new version of name, from the adapter root
                                            (files None) or from files; admin only
    unload(name, tenant)                    name answers NOT_FOUND from now on; admin only
    index(tenant, ready_only)               [IndexRow]: bases, loaded adapters and those on disk the
                                            tenant may use
    drain()                                 finish what was accepted, then stop

An adapter another tenant owns is indistinguishable from one that does not exist (NOT_FOUND,
same message). Nothing here blocks the caller's event loop: loading, tokenizing and batching run
on the core's own threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Protocol, runtime_checkable

import numpy as np

from wara_train.basespec import TensorSpec

from .auth import OPEN, Tenant

SERVER_NAME = "wara-serve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("model_repository",)


@dataclass(frozen=True)
class Answer:
    """What one inference request returns."""

    version: str  # the version that ran: an adapter's content hash, "1" for a base
    outputs: dict[str, np.ndarray]  # output name -> one row per input row
    truncated: tuple[int, ...] = ()  # rows whose text was cut to ``text_tokens`` tokens
    text_tokens: int = 0  # the token limit those rows were cut to


@dataclass(frozen=True)
class ModelInfo:
    """A model's description (KServe ModelMetadata)."""

    name: str
    base: str  # the base model it runs on (itself, for a base)
    platform: str  # the engine that serves it, e.g. "wara_pytorch:<base>"
    versions: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass(frozen=True)
class IndexRow:
    """One row of the repository index."""

    name: str
    version: str  # "" for an adapter not loaded
    state: str  # "READY" or "UNAVAILABLE"
    reason: str = ""


@dataclass(frozen=True)
class Piece:
    """One step of a generation: new text, and why it stopped on the last piece."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None  # "stop", "length", or None while it goes on
    usage: Mapping[str, int] = field(default_factory=dict)  # on the last piece: prompt and completion tokens


@runtime_checkable
class ServingCore(Protocol):
    """See the module docstring for each member's contract."""

    config: Any
    metrics: Any

    @property
    def ready(self) -> bool: ...

    async def model_ready(self, name: str, version: str = "", *, tenant: Tenant = OPEN) -> bool: ...

    async def metadata(self, name: str, *, tenant: Tenant = OPEN) -> ModelInfo: ...

    async def infer(self, name: str, inputs: Mapping[str, np.ndarray], *, tenant: Tenant = OPEN,
                    timeout: float | None = None, version: str = "") -> Answer: ...

    def generate(self, name: str, prompt: str, params: Mapping[str, Any], *,
                 tenant: Tenant = OPEN) -> AsyncIterator[Piece]: ...

    async def load(self, name: str, files: dict[str, bytes] | None = None, *, tenant: Tenant = OPEN) -> str: ...

    async def unload(self, name: str, *, tenant: Tenant = OPEN) -> None: ...

    async def index(self, *, tenant: Tenant = OPEN, ready_only: bool = False) -> list[IndexRow]: ...

    def drain(self) -> None: ...
