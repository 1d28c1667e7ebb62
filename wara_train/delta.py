"""Delta weight, fold and merge: pure functions of the factors (DESIGN.md 2.1-2.2).

Factors are a mapping ``block name -> (A_s, B_s)`` with ``A_s`` (r, n_s) and ``B_s`` (m_s, r).
All math runs in float32 at least (float64 stays float64); callers cast once at the end.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .wavelets import WaveletSpec, blocks, idwt1_cascade, waverec2

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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
    return fold_many({"": (factors, shape)}, spec=spec, scale=scale)[""]


def fold_many(
    layers: Mapping[str, tuple[Factors, tuple[int, int]]], *, spec: WaveletSpec, scale: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`fold` for many layers at once (``name -> (factors, (m, n))``).

    ``A_s P_col,s`` is the synthesis (the transposed, i.e. inverse, transform) of the rows of
    ``A_s`` placed in block s's sub-band. Layers of one shape and rank are stacked, so each
    side of each such group goes through one inverse cascade with a handful of tensor ops per
    block, however many layers it has: an adapter of 36 MiniLM layers (three shapes) folds in
    about fifty ops, not hundreds (the fold is on the path of an adapter entering the device
    tier). Returns per layer views of the group's contiguous results."""
    groups: dict[tuple, list[str]] = {}
    for name, (factors, (m, n)) in layers.items():
        any_a = next(iter(factors.values()))[0]
        groups.setdefault((m, n, any_a.shape[0], _work_dtype(any_a), any_a.device), []).append(name)
    order = blocks(spec.levels)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for (m, n, r, dt, device), names in groups.items():
        count, rows = len(names), len(order) * r
        sides = {}
        for side, length in (("A", n), ("B", m)):
            bands = {(kind, j): torch.zeros(count, rows, length >> j, dtype=dt, device=device)
                     for kind in ("a", "d") for j in range(1, spec.levels + 1)}
            for i, blk in enumerate(order):  # each block's rows into its sub-band, zeros elsewhere
                if side == "A":
                    t = torch.stack([layers[name][0][blk.name][0] for name in names])  # (L, r, n_s)
                    kind = blk.col
                else:
                    t = torch.stack([layers[name][0][blk.name][1] for name in names]).transpose(1, 2)  # (L, r, m_s)
                    kind = blk.row
                bands[kind, blk.level][:, i * r : (i + 1) * r] = t
            flat = {key: band.view(count * rows, -1) for key, band in bands.items()}
            synth = idwt1_cascade({j: flat["a", j] for j in range(1, spec.levels + 1)},
                                  {j: flat["d", j] for j in range(1, spec.levels + 1)}, length=length, spec=spec)
            sides[side] = synth.view(count, rows, length)
        lora_a = sides["A"].contiguous()
        lora_b = (scale * sides["B"]).transpose(1, 2).contiguous()  # (L, m, R)
        for k, name in enumerate(names):
            out[name] = (lora_a[k], lora_b[k])
    return {name: out[name] for name in layers}
