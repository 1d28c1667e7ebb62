"""Multi-adapter LoRA kernels: ``delta[b] = B[s_b] (A[s_b] x[b])`` for each row b and its slot s_b.

The engine calls one function through `LoraKernel`, so a native or CUDA kernel (punica-style
SGMV) can replace the CPU one without touching anything else. Slot 0 is the base: zero factors,
and rows on it are skipped.
"""

from __future__ import annotations

from typing import Protocol

import torch


class LoraKernel(Protocol):
    def __call__(self, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 groups: list[tuple[int, torch.Tensor]], ranks: list[int]) -> torch.Tensor | None:
        """x (B, T, n); lora_a (S, R, n); lora_b (S, m, R); groups: (slot, row indices) for
        every non-base slot in the batch; ranks[s]: the rank in use in slot s (the rest is
        zero padding, which a kernel may skip). Returns the delta (B, T, m), or None if no row
        has an adapter."""


def grouped_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 groups: list[tuple[int, torch.Tensor]], ranks: list[int]) -> torch.Tensor | None:
    """CPU kernel: one pair of matmuls per distinct adapter over its rows (a grouped GEMM),
    on the slot's real rank only (the padding is zeros)."""
    if not groups:
        return None
    if len(groups) == 1 and groups[0][1].numel() == x.shape[0]:
        slot = groups[0][0]
        r = ranks[slot]
        return (x @ lora_a[slot, :r].T) @ lora_b[slot, :, :r].T
    out = x.new_zeros(*x.shape[:-1], lora_b.shape[1])
    for slot, rows in groups:
        r = ranks[slot]
        out[rows] = (x[rows] @ lora_a[slot, :r].T) @ lora_b[slot, :, :r].T
    return out


def reference_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   groups: list[tuple[int, torch.Tensor]], ranks: list[int] | None = None) -> torch.Tensor | None:
    """Slow oracle: row by row, float64."""
    if not groups:
        return None
    out = torch.zeros(*x.shape[:-1], lora_b.shape[1], dtype=torch.float64)
    for slot, rows in groups:
        for r in rows.tolist():
            out[r] = (x[r].double() @ lora_a[slot].double().T) @ lora_b[slot].double().T
    return out.to(x.dtype)
