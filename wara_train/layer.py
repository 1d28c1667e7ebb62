"""`WaraLinear`, `WaraConv1x1`, `WaraConv1D`: a frozen base layer plus WaRA factors, three paths.

* ``explicit``: ``y = W0 x + scale · Σ_s P_row,sᵀ B_s A_s P_col,s x``, with the DWT/IDWT run as
  cascades on the activations (DESIGN.md 2.1). The training default.
* ``folded``:   ``y = W0 x + lora_B (lora_A x)`` with the folded factors (DESIGN.md 2.2).
* ``merged``:   ``y = (W0 + ΔW) x`` with a merged copy built in float32; the base stays pristine.

All three give the same output to float tolerance; tests check that against pywt.

Three kinds of base layer can carry an adapter; `layer_shape`, `weight_matrix` and
`merged_weight` are the only code that knows how each stores its (m, n) = (out, in) matrix:
``nn.Linear`` (out, in), a pointwise ``nn.Conv2d`` (out, in, 1, 1) and the transposed ``Conv1D``
of GPT-2-style transformers models (in, out).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .config import WaraConfig
from .delta import delta_weight, fold
from .errors import ConfigError
from .wavelets import blocks, dwt1_cascade, idwt1_cascade

Path = Literal["explicit", "folded", "merged"]
PATHS: tuple[str, ...] = ("explicit", "folded", "merged")


class WaraLayer(nn.Module):
    """Shared machinery; subclasses say how the base weight is an (m, n) matrix and how
    features are laid out in their inputs."""

    def __init__(self, base: nn.Module, config: WaraConfig) -> None:
        check_wrappable(base, config)
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.config = config
        self.spec = config.spec
        m, n = self.weight_shape
        dtype = getattr(torch, config.dtype)
        dev = self.base.weight.device
        self.wara_A = nn.ParameterDict()
        self.wara_B = nn.ParameterDict()
        for b in blocks(self.spec.levels):
            ms, ns = b.shape(m, n)
            self.wara_A[b.name] = nn.Parameter(torch.empty(config.rank, ns, dtype=dtype, device=dev))
            self.wara_B[b.name] = nn.Parameter(torch.zeros(ms, config.rank, dtype=dtype, device=dev))
        self.reset_parameters()
        self.path: Path = "explicit"
        self._merged: torch.Tensor | None = None

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """LoRA's init: A Kaiming-uniform (a = sqrt 5), B zero, so ΔW = 0."""
        with torch.no_grad():
            for a in self.wara_A.values():
                bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) for fan_in = n_s
                a.uniform_(-bound, bound, generator=generator)
            for b in self.wara_B.values():
                b.zero_()
        self._merged = None

    # --- shape of the base as a matrix -------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, int]:
        return layer_shape(self.base)

    def base_matrix(self) -> torch.Tensor:
        """The frozen base weight as an (m, n) matrix (a view; never modified)."""
        return weight_matrix(self.base)

    # --- pure-math views ---------------------------------------------------------------------
    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (self.wara_A[name], self.wara_B[name]) for name in self.wara_A}

    def delta_weight(self) -> torch.Tensor:
        """ΔW (m, n) in float32 (float64 when the factors are float64)."""
        return delta_weight(self.factors(), shape=self.weight_shape, spec=self.spec, scale=self.config.scale)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold(self.factors(), shape=self.weight_shape, spec=self.spec, scale=self.config.scale)

    # --- paths -------------------------------------------------------------------------------
    def set_path(self, path: Path) -> None:
        if path not in PATHS:
            raise ConfigError(f"unknown forward path {path!r}: valid paths are {', '.join(PATHS)}")
        self.path = path
        self._merged = None
        if path == "merged":
            self.merge()

    def merge(self) -> None:
        """Build the merged copy ``W0 + ΔW`` (float32 math, one cast) and use it."""
        with torch.no_grad():
            self._merged = merged_weight(self.base, self.delta_weight())
        self.path = "merged"

    def unmerge(self) -> None:
        """Drop the merged copy; the base weight was never touched, so nothing can drift."""
        self._merged = None
        self.path = "explicit"

    def _delta_2d(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW applied to rows of a (tokens, n) matrix -> (tokens, m), in the compute dtype."""
        m, n = self.weight_shape
        if self.path == "folded":
            la, lb = self.folded()
            xd = x.to(la.dtype)
            return (xd @ la.T) @ lb.T
        pyr = dwt1_cascade(x, spec=self.spec)
        cdt = pyr.approx[0].dtype
        approx_out: dict[int, torch.Tensor] = {}
        detail_out: dict[int, torch.Tensor] = {}
        for b in blocks(self.spec.levels):
            src = (pyr.approx if b.col == "a" else pyr.detail)[b.level]
            u = (src @ self.wara_A[b.name].to(cdt).T) @ self.wara_B[b.name].to(cdt).T
            dst = approx_out if b.row == "a" else detail_out
            dst[b.level] = dst[b.level] + u if b.level in dst else u
        return self.config.scale * idwt1_cascade(approx_out, detail_out, length=m, spec=self.spec)

    def _merged_weight(self) -> torch.Tensor:
        """``W0 + ΔW`` in the base module's own weight layout."""
        if self._merged is not None and not torch.is_grad_enabled():
            return self._merged
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.wara_A.values()):
            # Training through the merged path: differentiable, recomputed every call.
            return merged_weight(self.base, self.delta_weight(), differentiable=True)
        if self._merged is None:
            self.merge()
        return self._merged  # type: ignore[return-value]


class WaraLinear(WaraLayer):
    """WaRA on an ``nn.Linear``: W0 is its (out_features, in_features) weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "merged":
            return F.linear(x, self._merged_weight(), self.base.bias)
        y = self.base(x)
        d = self._delta_2d(x.reshape(-1, x.shape[-1]))
        return y + d.reshape(*x.shape[:-1], d.shape[-1]).to(y.dtype)


class WaraConv1x1(WaraLayer):
    """WaRA on a pointwise ``nn.Conv2d`` (1x1 kernel, groups 1, stride 1): W0 is (out, in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "merged":
            w = self._merged_weight().reshape(self.base.weight.shape)
            # functional_call keeps the base module's own forward (e.g. static same-padding).
            return functional_call(self.base, {"weight": w}, (x,))
        y = self.base(x)
        xc = x.movedim(1, -1)
        d = self._delta_2d(xc.reshape(-1, xc.shape[-1]))
        d = d.reshape(*xc.shape[:-1], d.shape[-1]).movedim(-1, 1)
        return y + d.to(y.dtype)


class WaraConv1D(WaraLayer):
    """WaRA on the ``Conv1D`` of GPT-2-style models (``y = x W + b``, W stored (in, out)):
    W0 is its transpose, so the adapter math is the same as for a Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "merged":
            w = self._merged_weight()
            return torch.addmm(self.base.bias, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[1])
        y = self.base(x)
        d = self._delta_2d(x.reshape(-1, x.shape[-1]))
        return y + d.reshape(*x.shape[:-1], d.shape[-1]).to(y.dtype)


def is_conv1d(module: nn.Module) -> bool:
    """The transposed ``Conv1D`` of transformers' GPT-2 family (matched by shape of its API,
    so this module never imports transformers)."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and getattr(module, "weight", None) is not None and module.weight.dim() == 2)


def is_adaptable(module: nn.Module) -> bool:
    """A layer kind WaRA can carry (shape aside): Linear, pointwise Conv2d, Conv1D."""
    return isinstance(module, nn.Linear) or is_pointwise_conv(module) or is_conv1d(module)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(m, n) = (out, in) of an adaptable layer."""
    w = module.weight
    if is_conv1d(module):
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w.shape[1])


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an (m, n) matrix: a view, never a copy or a modification."""
    if is_conv1d(module):
        return module.weight.T
    return module.weight.reshape(layer_shape(module))


def merged_weight(module: nn.Module, delta: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
    """``W0 + ΔW`` in ``module.weight``'s own layout and dtype: summed in float32 (float64 if
    either is), cast once; the module's weight is untouched. The one merge in the project:
    the layer's merged path, the exporter's merged weights and the server's merged copies all
    call it. ``delta`` is (m, n)."""
    w = module.weight if differentiable else module.weight.detach()
    d = delta if differentiable else delta.detach()
    dt = torch.float64 if torch.float64 in (w.dtype, d.dtype) else torch.float32
    d = d.to(device=w.device, dtype=dt)
    d = d.T if is_conv1d(module) else d.reshape(w.shape)
    return (w.to(dt) + d).to(w.dtype)


def is_pointwise_conv(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and tuple(module.kernel_size) == (1, 1)
        and tuple(module.stride) == (1, 1)
        and module.groups == 1
    )


def check_wrappable(module: nn.Module, config: WaraConfig) -> None:
    """Raise `ConfigError` unless ``module`` can carry this adapter (type and shape); changes
    nothing, so callers can validate every target before wrapping any."""
    if isinstance(module, nn.Conv2d) and not is_pointwise_conv(module):
        raise ConfigError(
            f"WaRA adapts 1x1 convolutions with stride 1 and groups 1 only; got kernel "
            f"{tuple(module.kernel_size)}, stride {tuple(module.stride)}, groups {module.groups}"
        )
    if not is_adaptable(module):
        raise ConfigError(f"WaRA adapts nn.Linear, 1x1 nn.Conv2d and Conv1D modules, not {type(module).__name__}")
    m, n = layer_shape(module)
    config.spec.check_length(m, f"{type(module).__name__} output size")
    config.spec.check_length(n, f"{type(module).__name__} input size")


def wrap(module: nn.Module, config: WaraConfig) -> WaraLayer:
    """The WaRA wrapper for a supported base module (Linear, pointwise Conv2d or Conv1D)."""
    check_wrappable(module, config)
    if is_conv1d(module):
        return WaraConv1D(module, config)
    return WaraLinear(module, config) if isinstance(module, nn.Linear) else WaraConv1x1(module, config)
