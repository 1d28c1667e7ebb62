"""The pool layout of the native ops (csrc/layout.h) and the packers that write a slot of it.

One flat tensor per adapted layer (m out, n in). A slot of rank r occupies
``pool[offset : offset + r * per_rank]`` and holds, block after block, ``A_blk`` (r, n_blk)
row-major then ``B_blk`` (m_blk, r) row-major:

* folded LoRA (``wara::sgmv``): one block, A (r, n) and B (m, r); ``per_rank = n + m``.
* own WaRA factors (``wara::wavelet_lowrank``), J levels: the blocks of
  `wara_train.wavelets.blocks` (pywt's order ``a_J, (h_J, v_J, d_J), ..., (h_1, v_1, d_1)``), block
  at level j of shape (m / 2^j, n / 2^j); ``per_rank = Σ_blk (n_blk + m_blk)`` (2 (n + m) for
  J = 1, the same elements as a folded LoRA of rank 2r for an update of rank 4r).

The adapter's scale is folded into the B factors by the packer, so the kernels apply no scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from wara_train.delta import Factors
from wara_train.wavelets import WaveletSpec, blocks, filter_length


@dataclass(frozen=True)
class PoolBlock:
    """Block of a slot: A (r, n) at ``offset + r * prefix``, then B (m, r); it maps the input
    band (``col``, level) to the output band (``row``, level); level 0 is the signal itself."""

    name: str
    level: int
    row_detail: bool
    col_detail: bool
    n: int
    m: int
    prefix: int


def folded_layout(m: int, n: int) -> tuple[PoolBlock, ...]:
    return (PoolBlock("lora", 0, False, False, n, m, 0),)


def own_layout(m: int, n: int, levels: int) -> tuple[PoolBlock, ...]:
    """The blocks of a J-level slot in pool order (m, n divisible by 2^J)."""
    out, prefix = [], 0
    for b in blocks(levels):
        nb, mb = n >> b.level, m >> b.level
        out.append(PoolBlock(b.name, b.level, b.row == "d", b.col == "d", nb, mb, prefix))
        prefix += nb + mb
    return tuple(out)


def per_rank(layout: tuple[PoolBlock, ...]) -> int:
    return sum(b.n + b.m for b in layout)


def folded_numel(m: int, n: int, rank: int) -> int:
    """Pool elements of a folded slot of ``rank``: rank · (n + m)."""
    return rank * (n + m)


def own_numel(m: int, n: int, rank: int, levels: int) -> int:
    """Pool elements of an own-factor slot of ``rank`` at ``levels``."""
    return rank * per_rank(own_layout(m, n, levels))


def pack_folded(lora_a: torch.Tensor, lora_b: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A folded slot: ``lora_a`` (R, n) then ``lora_b`` (m, R), flat (as
    `wara_train.delta.fold` returns them, the scale already in ``lora_b``)."""
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"pack_folded: need lora_A (R, n) and lora_B (m, R), got {tuple(lora_a.shape)} "
                         f"and {tuple(lora_b.shape)}")
    return torch.cat([lora_a.reshape(-1).to(dtype), lora_b.reshape(-1).to(dtype)])


def pack_own(factors: Factors, *, spec: WaveletSpec, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An own-factor slot of one layer: for each block in pywt's order, ``A`` then
    ``scale · B``, flat. ``factors``: block name -> (A (r, n_blk), B (m_blk, r)), every block of
    ``spec.levels``. The scaled B is computed in float32 (float64 stays) and cast once."""
    if spec.effective_mode != "periodization":
        raise ValueError(f"pack_own: the fused op computes periodization only; {spec.wavelet} in mode "
                         f"{spec.mode!r} must be folded (pack_folded) instead")
    names = [b.name for b in blocks(spec.levels)]
    if set(factors) != set(names):
        raise ValueError(f"pack_own: factor blocks {sorted(factors)} do not match levels={spec.levels}: {names}")
    top = factors[names[0]]
    rank, levels = top[0].shape[0], spec.levels
    m, n = top[1].shape[0] << levels, top[0].shape[1] << levels
    parts = []
    for blk in own_layout(m, n, levels):
        a, b = factors[blk.name]
        if tuple(a.shape) != (rank, blk.n) or tuple(b.shape) != (blk.m, rank):
            raise ValueError(f"pack_own: block {blk.name}: A {tuple(a.shape)} / B {tuple(b.shape)}, expected "
                             f"A {(rank, blk.n)} / B {(blk.m, rank)}")
        work = torch.float64 if b.dtype == torch.float64 else torch.float32
        parts += [a.reshape(-1).to(dtype), (b.to(work) * scale).reshape(-1).to(dtype)]
    return torch.cat(parts)


def wavelet_filters(wavelet: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The analysis filters (dec_lo, dec_hi) of an orthogonal wavelet, float64 on the CPU, as the
    fused op takes them."""
    import pywt

    filter_length(wavelet)  # validates the name (a clear error for an unknown wavelet)
    w = pywt.Wavelet(wavelet)
    return torch.tensor(w.dec_lo, dtype=torch.float64), torch.tensor(w.dec_hi, dtype=torch.float64)


def unpack(pool: torch.Tensor, offset: int, rank: int, layout: tuple[PoolBlock, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Views of one slot's factors: block name -> (A (r, n_blk), B (m_blk, r))."""
    out = {}
    for blk in layout:
        start = offset + rank * blk.prefix
        a = pool[start : start + rank * blk.n].view(rank, blk.n)
        b = pool[start + rank * blk.n : start + rank * (blk.n + blk.m)].view(blk.m, rank)
        out[blk.name] = (a, b)
    return out


def stack_slots(slots: Mapping[int, torch.Tensor] | list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Concatenate packed slots into one pool; returns the pool and each slot's offset."""
    items = list(slots.values()) if isinstance(slots, Mapping) else list(slots)
    offsets, at = [], 0
    for t in items:
        offsets.append(at)
        at += t.numel()
    return (torch.cat(items) if items else torch.zeros(0)), offsets
