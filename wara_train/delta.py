"""Delta weight, fold and merge: pure functions of the factors (DESIGN.md 2.1-2.2).

Factors are a mapping ``block name -> (A_s, B_s)`` with ``A_s`` (r, n_s) and ``B_s`` (m_s, r).
All math runs in float32 at least (float64 stays float64); callers cast once at the end.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .wavelets import WaveletSpec, axis_operator, blocks, waverec2

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_factors(factors: Factors, *, shape: tuple[int, int], rank: int, spec: WaveletSpec) -> None:
    """Raise ValueError unless every block has factors of the right shape and nothing else."""
    m, n = shape
    expected = {b.name: b.shape(m, n) for b in blocks(spec.levels)}
    if set(factors) != set(expected):
        raise ValueError(f"factor blocks {sorted(factors)} do not match the pyramid's {list(expected)}")
    for name, (a, b) in factors.items():
        ms, ns = expected[name]
        if tuple(a.shape) != (rank, ns) or tuple(b.shape) != (ms, rank):
            raise ValueError(
                f"block {name}: A {tuple(a.shape)} / B {tuple(b.shape)}, expected A {(rank, ns)} / B {(ms, rank)}"
            )


def delta_weight(
    factors: Factors, *, shape: tuple[int, int], spec: WaveletSpec, scale: float
) -> torch.Tensor:
    """``ΔW = scale · IDWT2(C)``, ``C_s = B_s @ A_s``: shape (m, n), float32 (float64 in, float64 out)."""
    any_a = next(iter(factors.values()))[0]
    dt = _work_dtype(any_a)
    coeffs = {name: b.to(dt) @ a.to(dt) for name, (a, b) in factors.items()}
    return scale * waverec2(coeffs, shape=shape, spec=spec)


def fold(
    factors: Factors, *, shape: tuple[int, int], spec: WaveletSpec, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold WaRA factors into one LoRA pair ``(lora_A (R, n), lora_B (m, R))`` with
    ``lora_B @ lora_A == ΔW`` exactly up to rounding, ``R = #blocks · r`` (4r for one level):

        ΔW = Σ_s (scale · P_row,sᵀ B_s)(A_s P_col,s)

    Blocks are stacked in pywt's order; the scale is folded into ``lora_B``."""
    m, n = shape
    any_a = next(iter(factors.values()))[0]
    dt, device = _work_dtype(any_a), any_a.device
    a_parts, b_parts = [], []
    for blk in blocks(spec.levels):
        a, b = factors[blk.name]
        p_row = axis_operator(m, blk.row, blk.level, spec=spec).to(device, dt)
        p_col = axis_operator(n, blk.col, blk.level, spec=spec).to(device, dt)
        a_parts.append(a.to(dt) @ p_col)
        b_parts.append(scale * (p_row.T @ b.to(dt)))
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def merge_weight(base: torch.Tensor, delta: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A merged copy ``W0 + ΔW``: summed in float32 (or float64), cast once. ``base`` is untouched."""
    dt = torch.float64 if torch.float64 in (base.dtype, delta.dtype) else torch.float32
    merged = base.detach().to(dt) + delta.detach().to(dt).reshape(base.shape)
    return merged.to(out_dtype or base.dtype)
