"""Fused multi-adapter low-rank kernels for one adapted layer ``y = W0 x`` (W0: (m, n)).

Two ops, each in three implementations with one signature (semantics: csrc/ops.cpp; pool
layout: `runtime.native.packing`):

    sgmv(x, y, pool, token_slot, slot_offset, slot_rank)
        y[t] += B_s (A_s x[t])                    for every token with s = token_slot[t] >= 0
    wavelet_lowrank(x, y, pool, token_slot, slot_offset, slot_rank, levels, dec_lo, dec_hi)
        y[t] += ΔW_s x[t] from the slot's own WaRA factors (DWT -> per-block low rank -> IDWT,
        pywt periodization, ``levels`` = J); 2r(m + n) multiply-adds per token at J = 1

* ``native``: ``torch.ops.wara.*`` from the C++ library ``wara_kernels`` (CMakeLists.txt; CPU,
  plus CUDA where it was built with a CUDA toolkit). Built on first use (`load`) and loaded
  with ``torch.ops.load_library``.
* ``triton``: `runtime.native.triton_ops`, the GPU kernels (testable on a CPU under
  ``TRITON_INTERPRET=1``).
* ``torch``: `runtime.native.reference`, plain tensor ops on any device.

x: (T, n), y: (T, m), float32 or bfloat16 (each independently); pool 1-D float32 or bfloat16;
token_slot (T,) int64 with -1 for a base row; slot_offset, slot_rank (S,) int64. All math is
float32; y is added to in place. Bad arguments raise RuntimeError naming the problem.

`sgmv` and `wavelet_lowrank` here pick the implementation for the tensors' device by
`runtime.selection.op_backend` (native where loaded, else Triton on CUDA, else torch), with one
warning naming why the native library is not serving.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch

from ..selection import OpBackend, op_backend
from . import reference
from .packing import (OwnPack, folded_numel, own_delta_bounds, own_layout, own_numel, pack_folded, pack_own,
                      pack_own_many, stack_slots, unpack, wavelet_filters)

__all__ = ["Status", "load", "status", "triton_available", "sgmv", "wavelet_lowrank", "pack_own",
           "pack_own_many", "own_delta_bounds", "OwnPack", "pack_folded", "own_numel", "folded_numel", "own_layout", "wavelet_filters", "stack_slots", "unpack",
           "BACKENDS"]


@dataclass(frozen=True)
class Status:
    """Whether the native library serves, and why not when it does not."""

    native: bool
    cuda: bool = False  # the library has CUDA kernels
    library: str | None = None
    info: str = ""
    reason: str | None = None

    def describe(self) -> str:
        return self.info if self.native else f"pure PyTorch kernels ({self.reason})"


_lock = threading.Lock()
_status: Status | None = None
_warned = False


def load(*, build: bool = True) -> Status:
    """Build (if the sources are here) and load ``wara_kernels`` once per process; later calls
    return the first outcome. ``WARA_NATIVE=0`` turns the native library off. Never raises:
    the returned `Status` says why the library is not there."""
    global _status
    with _lock:
        if _status is None:
            _status = _load(build)
        return _status


def _load(build: bool) -> Status:
    if os.environ.get("WARA_NATIVE", "1") == "0":
        return Status(False, reason="disabled by WARA_NATIVE=0")
    from . import build as builder

    try:
        lib = builder.build() if build and builder.sources_present() else builder.library_path()
    except builder.BuildError as e:
        return Status(False, reason=f"build failed: {e}")
    if not lib.is_file():
        return Status(False, reason=f"no library at {lib} and no sources to build it")
    try:
        torch.ops.load_library(str(lib))
        info = torch.ops.wara.build_info()
    except (OSError, RuntimeError) as e:
        return Status(False, reason=f"loading {lib} failed: {e}")
    return Status(True, cuda=" cuda" in info, library=str(lib), info=info)


def status() -> Status:
    """The native library's status (loads it on first call)."""
    return load()


def pack_cache_stats() -> dict[str, int] | None:
    """The CPU wavelet op's cache of packed factors (``WARA_PACK_CACHE_MB``): entries, bytes,
    hits, misses and capacity_bytes so far in this process; None where the library is not loaded."""
    if not load(build=False).native:
        return None
    return dict(zip(("entries", "bytes", "hits", "misses", "capacity_bytes"), torch.ops.wara.pack_cache_stats()))


@functools.cache
def triton_available() -> bool:
    """Whether triton is installed (not imported: that costs a second); asked once a process."""
    return importlib.util.find_spec("triton") is not None


def _native_impl() -> Any:
    st = load()
    if not st.native:
        raise RuntimeError(f"the native kernels are not loaded: {st.reason}")
    return torch.ops.wara


def _triton_impl() -> ModuleType:
    from . import triton_ops

    return triton_ops


# The implementations, each an object with ``sgmv`` and ``wavelet_lowrank`` of the signatures above.
IMPLEMENTATIONS: dict[str, Callable[[], Any]] = {"native": _native_impl, "triton": _triton_impl,
                                                 "torch": lambda: reference}
BACKENDS: tuple[str, ...] = tuple(IMPLEMENTATIONS)


def _pick(device: torch.device, backend: OpBackend | None) -> Any:
    """The implementation ``backend`` names, or (None) the one `op_backend` picks for ``device``."""
    global _warned
    if backend is None:
        backend = op_backend(device, load(), triton_available())
        if backend == "torch" and not _warned:
            _warned = True
            warnings.warn(f"wara native kernels are not serving on {device.type}: {load().describe()}",
                          RuntimeWarning, stacklevel=3)
    elif backend not in IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return IMPLEMENTATIONS[backend]()


def sgmv(x: torch.Tensor, y: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor, slot_offset: torch.Tensor,
         slot_rank: torch.Tensor, *, backend: OpBackend | None = None) -> None:
    """``y[t] += B_s (A_s x[t])`` in place (module docstring); ``backend`` forces one."""
    _pick(x.device, backend).sgmv(x, y, pool, token_slot, slot_offset, slot_rank)


def wavelet_lowrank(x: torch.Tensor, y: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor,
                    slot_offset: torch.Tensor, slot_rank: torch.Tensor, levels: int, dec_lo: torch.Tensor,
                    dec_hi: torch.Tensor, *, backend: OpBackend | None = None) -> None:
    """``y[t] += ΔW_s x[t]`` from own factors, in place (module docstring); ``backend`` forces one."""
    _pick(x.device, backend).wavelet_lowrank(x, y, pool, token_slot, slot_offset, slot_rank, levels, dec_lo, dec_hi)
