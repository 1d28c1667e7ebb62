"""Every choice of an engine backend, an op implementation, an adapter kernel or a slot form.

One line per decision (inputs -> output: the rule). Each is a function of what it is given, so
a test can ask the question of any machine on this one; the callers pass what this machine has
(a `runtime.native.Status`, whether triton is installed).

    engine_backend(config, spec) -> "torch" | "onnxruntime"
        an explicit ``config.backend`` the spec supports; "auto": the first of ``spec.backends``
        usable here (torch always; onnxruntime on a CPU with onnxruntime, onnx and onnxscript
        installed, for a graph whose every variable axis is a dynamic ONNX axis)
    op_backend(device, status, triton) -> "native" | "triton" | "torch"
        the first of ``OP_BACKENDS[device.type]`` whose needs the machine meets (native: the
        library loaded, with CUDA kernels on cuda; triton: installed), else "torch"
    adapter_kernel(device, status, triton) -> (kernel name, description)
        ``ADAPTER_KERNELS[op_backend(...)]``, a name in `runtime.kernels.KERNELS`: native_lora,
        triton_lora or grouped_lora
    own_form_wins(*, wavelet, levels, rank, shapes) -> bool
        under slot_form "auto", whether an adapter's slots hold its own factors: haar from width
        256 (128 at J >= 2), another wavelet from width 256 at J >= 2 and rank >= 8; the
        narrowest layer decides

This module imports nothing of the runtime, so the op dispatch (`runtime.native`) can ask it.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Literal, Protocol

import torch

from wara_train.errors import ConfigError

OpBackend = Literal["native", "triton", "torch"]


class NativeStatus(Protocol):
    """What a choice reads of the native library's state (`runtime.native.Status`)."""

    native: bool  # the library is loaded
    cuda: bool  # it has CUDA kernels
    info: str  # its build, where loaded
    reason: str | None  # why it is not loaded


# --- engine backend ------------------------------------------------------------------------

# What each engine backend needs to serve a base under "auto": (on_cuda: the engine's device is
# CUDA; any_size: every variable axis of the base's inputs is a dynamic axis of its ONNX graph).
ENGINE_BACKENDS: dict[str, Callable[[bool, bool], bool]] = {
    "torch": lambda on_cuda, any_size: True,
    "onnxruntime": lambda on_cuda, any_size: (not on_cuda and any_size
                                              and _installed("onnxruntime", "onnx", "onnxscript")),
}


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def engine_backend(config: Any, spec: Any) -> str:
    """The engine backend for one base (``config``: a `ServeConfig`; ``spec``: its `BaseSpec`).
    An explicit backend must be one the spec supports. Under "auto", the first of the spec's
    ``backends`` (its preference order: text bases list onnxruntime first, faster at batch 1 on
    a CPU, docs/benchmarks.md) that `ENGINE_BACKENDS` says can serve it here: onnxruntime's
    graph is exported at one size of any axis it does not declare dynamic, so an image base
    that takes any size stays on PyTorch. Where the onnxruntime engine cannot be built, the
    service serves PyTorch instead (`runtime.service.make_engine`)."""
    if config.backend != "auto":
        if config.backend not in spec.backends:
            raise ConfigError(f"base {spec.name!r} supports the backends {', '.join(spec.backends)}, "
                              f"not {config.backend!r}")
        return config.backend
    on_cuda = (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    any_size = all(axis in dyn for t, dyn in zip(spec.inputs, spec.onnx_dynamic or ({},) * len(spec.inputs))
                   for axis, size in enumerate(t.shape) if size < 0)
    usable = (b for b in spec.backends if b in ENGINE_BACKENDS and ENGINE_BACKENDS[b](on_cuda, any_size))
    return next(usable, "torch")


# --- op implementation and adapter kernel ---------------------------------------------------

# Per device type, the op implementations to try in order, each with what it needs of the
# machine (the native library's status, whether triton is installed); "torch" serves the rest.
OP_BACKENDS: dict[str, tuple[tuple[OpBackend, Callable[[NativeStatus, bool], bool]], ...]] = {
    "cpu": (("native", lambda st, triton: st.native),),
    "cuda": (("native", lambda st, triton: st.native and st.cuda), ("triton", lambda st, triton: triton)),
}

# The engine's adapter kernel (a name in `runtime.kernels.KERNELS`) for each op implementation,
# and how ModelMetadata / the kernel gauge describe it.
ADAPTER_KERNELS: dict[OpBackend, tuple[str, Callable[[NativeStatus, torch.device], str]]] = {
    "native": ("native_lora", lambda st, dev: f"native sgmv + wavelet_lowrank ({st.info})"),
    "triton": ("triton_lora", lambda st, dev: f"triton sgmv + wavelet_lowrank ({_not_native(st, dev)})"),
    "torch": ("grouped_lora", lambda st, dev: f"pure PyTorch grouped_lora ({_not_native(st, dev)})"),
}


def _not_native(st: NativeStatus, device: torch.device) -> str:
    return st.reason or f"no native kernel for {device.type}"


def op_backend(device: torch.device | str, status: NativeStatus, triton: bool) -> OpBackend:
    """The implementation of the fused ops that serves tensors on ``device`` (module docstring)."""
    device = torch.device(device)
    return next((name for name, has in OP_BACKENDS.get(device.type, ()) if has(status, triton)), "torch")


def adapter_kernel(device: torch.device | str, status: NativeStatus, triton: bool) -> tuple[str, str]:
    """(kernel name, what serves) for an engine on ``device``: the kernel over the op
    implementation `op_backend` picks (native where its library is built and loaded: `make test`
    and `make demo` build it)."""
    device = torch.device(device)
    name, describe = ADAPTER_KERNELS[op_backend(device, status, triton)]
    return name, describe(status, device)


# --- slot form ------------------------------------------------------------------------------

def own_form_wins(*, wavelet: str, levels: int, rank: int, shapes: list[tuple[int, int]]) -> bool:
    """Whether a WaRA adapter (``wavelet``, ``levels``, ``rank``) on layers of ``shapes`` (m, n)
    is served faster from its own factors by ``wara::wavelet_lowrank`` than folded by the GEMM
    pair; the narrowest layer decides. The widths come from the measured sweep
    (``python -m benchmarks.kernels --rule`` -> benchmarks/results/kernels_rule.json, tabled in
    docs/benchmarks.md). Own factors also take fewer pages ((3 - 2^(1-J)) r instead of
    (3J + 1) r), so where the two tie, own factors still win the pool."""
    width = min((min(m, n) for m, n in shapes), default=0)
    if wavelet == "haar":
        return width >= 256 or (width >= 128 and levels >= 2)
    return width >= 256 and levels >= 2 and rank >= 8
