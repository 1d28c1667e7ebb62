"""Every choice of an engine backend, an op implementation, an adapter kernel or a slot form.

One line per decision (inputs -> output: the rule). Each is a function of what it is given, so
a test can ask the question of any machine on this one; the callers pass what this machine has
(a `runtime.native.Status`, whether triton is installed, the CPU's flags: `resolve_dtype`).

    engine_backend(config, spec, *, dtype) -> "torch" | "onnxruntime"
        an explicit ``config.backend`` the spec supports; "auto": the first of ``spec.backends``
        usable here (torch always; onnxruntime on a CPU with onnxruntime, onnx and onnxscript
        installed, for a graph whose every variable axis is a dynamic ONNX axis) that computes
        in ``dtype`` (the base's requested one; "auto" restricts nothing)
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
    engine_dtype(requested, *, backend, device, cpu_flags, cuda_bf16) -> torch.float32 | torch.bfloat16
        what a base computes in: an explicit dtype the backend runs (``BACKEND_DTYPES``; else a
        ConfigError); "auto": bfloat16 where the backend runs it and the device has matrix
        units for it (CPU flags amx_bf16 or avx512_bf16; CUDA with bf16), else float32

This module imports nothing of the runtime, so the op dispatch (`runtime.native`) can ask it.
"""

from __future__ import annotations

import functools
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


def engine_backend(config: Any, spec: Any, *, dtype: str = "float32") -> str:
    """The engine backend for one base (``config``: a `ServeConfig`; ``spec``: its `BaseSpec`).
    An explicit backend must be one the spec supports. Under "auto", the first of the spec's
    ``backends`` (its preference order: text bases list onnxruntime first, faster at batch 1 on
    a CPU, docs/benchmarks.md) that `ENGINE_BACKENDS` says can serve it here: onnxruntime's
    graph is exported at one size of any axis it does not declare dynamic, so an image base
    that takes any size stays on PyTorch. Where the onnxruntime engine cannot be built, the
    service serves PyTorch instead (`runtime.service.make_engine`). An explicit ``dtype`` (the
    base's requested one) leaves out under "auto" the backends that cannot compute in it."""
    if config.backend != "auto":
        if config.backend not in spec.backends:
            raise ConfigError(f"base {spec.name!r} supports the backends {', '.join(spec.backends)}, "
                              f"not {config.backend!r}")
        return config.backend
    on_cuda = (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    any_size = all(axis in dyn for t, dyn in zip(spec.inputs, spec.onnx_dynamic or ({},) * len(spec.inputs))
                   for axis, size in enumerate(t.shape) if size < 0)
    usable = (b for b in spec.backends if b in ENGINE_BACKENDS and ENGINE_BACKENDS[b](on_cuda, any_size)
              and (dtype == "auto" or dtype in BACKEND_DTYPES.get(b, ("float32",))))
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


# --- dtype ----------------------------------------------------------------------------------

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CHOICES: tuple[str, ...] = (*DTYPES, "auto")

# What each engine backend computes in: onnxruntime's CPU kernels have no bfloat16 MatMul or Gemm.
BACKEND_DTYPES: dict[str, tuple[str, ...]] = {"torch": ("float32", "bfloat16"), "onnxruntime": ("float32",)}

# CPU features (named as /proc/cpuinfo and `torch.cpu.get_capabilities` name them) whose units run
# bfloat16 matmuls faster than float32 ones: AMX tiles, AVX-512 BF16 dot products. Without them
# oneDNN converts bfloat16 to float32 around float32 kernels: no faster, and less exact.
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def check_dtype(name: Any, what: str = "dtype") -> str:
    """``name`` if it is one of `DTYPE_CHOICES`, else a ConfigError listing them."""
    if not isinstance(name, str) or name not in DTYPE_CHOICES:
        raise ConfigError(f"unknown {what} {name!r}: valid values are {', '.join(DTYPE_CHOICES)}")
    return name


def bf16_fast(device: torch.device | str, *, cpu_flags: frozenset[str], cuda_bf16: bool) -> bool:
    """Whether ``device`` runs bfloat16 matmuls at speed: a CPU with one of `BF16_CPU_FLAGS`, a
    CUDA device that supports bfloat16."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_bf16
    return device.type == "cpu" and bool(BF16_CPU_FLAGS & cpu_flags)


def engine_dtype(requested: str, *, backend: str, device: torch.device | str, cpu_flags: frozenset[str],
                 cuda_bf16: bool) -> torch.dtype:
    """What a base served by ``backend`` on ``device`` computes in (module docstring)."""
    supported = BACKEND_DTYPES.get(backend, ("float32",))
    if check_dtype(requested) == "auto":
        fast = "bfloat16" in supported and bf16_fast(device, cpu_flags=cpu_flags, cuda_bf16=cuda_bf16)
        return torch.bfloat16 if fast else torch.float32
    if requested not in supported:
        raise ConfigError(f"the {backend} engine computes in {', '.join(supported)} only, not {requested}: serve the "
                          f"base with dtype {' or '.join(supported)} or auto, or with backend torch")
    return DTYPES[requested]


def cpu_flags(cpuinfo: str = "/proc/cpuinfo", capabilities: dict | None = None) -> frozenset[str]:
    """This CPU's feature flags: those /proc/cpuinfo lists, and those torch's own check
    (`torch.cpu.get_capabilities`, where this torch has it; ``capabilities`` replaces it) finds."""
    flags: set[str] = set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    if capabilities is None:
        get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
        capabilities = dict(get()) if get is not None else {}
    return frozenset(flags | {k for k, v in capabilities.items() if v is True})


@functools.cache
def _this_cpu() -> frozenset[str]:
    return cpu_flags()


def resolve_dtype(requested: str, *, backend: str, device: torch.device | str) -> torch.dtype:
    """`engine_dtype` with this machine's facts (CUDA is asked only for a CUDA device)."""
    device = torch.device(device)
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return engine_dtype(requested, backend=backend, device=device,
                        cpu_flags=_this_cpu() if device.type == "cpu" else frozenset(), cuda_bf16=cuda_bf16)
