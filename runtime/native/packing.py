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

import functools
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
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


@functools.lru_cache(maxsize=256)
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
    return pack_own_many({"": factors}, spec=spec, scale=scale, dtype=dtype).views[""]


@dataclass
class OwnPack:
    """Several layers' own-factor slots in one flat tensor (`pack_own_many`)."""

    flat: torch.Tensor
    views: dict[str, torch.Tensor]  # layer -> its slot (`pack_own`), a view of ``flat``
    peaks: torch.Tensor  # max |value| of each part (A, then scale · B, per block per layer), float64
    parts: list[tuple[str, PoolBlock, int]]  # (layer, block, rank), one per A / B pair of ``peaks``


def pack_own_many(layers: Mapping[str, Factors], *, spec: WaveletSpec, scale: float,
                  dtype: torch.dtype = torch.float32) -> OwnPack:
    """`pack_own` for many layers in a handful of tensor ops, however many layers: one
    concatenation, one multiply of the B parts by ``scale`` and one per-part max (the load
    path of an adapter entering the device tier; one op per block and layer made it ~8 ms for
    MiniLM's 36 layers). The values equal `pack_own`'s per block: the same float32 (or float64)
    multiply, one cast."""
    if spec.effective_mode != "periodization":
        raise ValueError(f"pack_own: the fused op computes periodization only; {spec.wavelet} in mode "
                         f"{spec.mode!r} must be folded (pack_folded) instead")
    names = [b.name for b in blocks(spec.levels)]
    levels = spec.levels
    tensors, sizes, parts, spans = [], [], [], {}
    for layer, factors in layers.items():
        if set(factors) != set(names):
            raise ValueError(f"pack_own: factor blocks {sorted(factors)} do not match levels={levels}: {names}")
        top = factors[names[0]]
        rank = top[0].shape[0]
        m, n = top[1].shape[0] << levels, top[0].shape[1] << levels
        start = sum(sizes)
        for blk in own_layout(m, n, levels):
            a, b = factors[blk.name]
            if tuple(a.shape) != (rank, blk.n) or tuple(b.shape) != (blk.m, rank):
                raise ValueError(f"pack_own: block {blk.name}: A {tuple(a.shape)} / B {tuple(b.shape)}, expected "
                                 f"A {(rank, blk.n)} / B {(blk.m, rank)}")
            tensors += [a.reshape(-1), b.reshape(-1)]
            sizes += [a.numel(), b.numel()]
            parts.append((layer, blk, rank))
        spans[layer] = (start, sum(sizes))
    if not tensors:
        return OwnPack(torch.zeros(0, dtype=dtype), {layer: torch.zeros(0, dtype=dtype) for layer in layers},
                       torch.zeros(0, dtype=torch.float64), [])
    work = torch.float64 if any(t.dtype == torch.float64 for t in tensors[1::2]) else torch.float32
    # A keeps its values (cast once to dtype); B is multiplied in `work`, as pack_own did per block.
    flat = torch.cat([t.detach() if t.dtype == work else t.detach().to(work) for t in tensors])
    if scale != 1.0:
        flat.mul_(_scale_vector(tuple(sizes), float(scale), work, flat.device))
    flat = flat.to(dtype)
    # Peaks of the values the slot holds (after the cast: a float64 value past float32's range
    # is inf there); nan stays nan.
    held = flat.float().cpu().numpy()
    starts, nonempty = np.cumsum([0] + sizes[:-1]), np.asarray(sizes) > 0
    peaks = np.zeros(len(sizes))  # an empty part (rank 0) has peak 0
    if nonempty.any():
        peaks[nonempty] = np.maximum.reduceat(np.abs(held), starts[nonempty])
    return OwnPack(flat, {layer: flat[i:j] for layer, (i, j) in spans.items()},
                   torch.from_numpy(peaks.astype(np.float64)), parts)


_SCALE_VECTORS: dict[tuple, torch.Tensor] = {}
_SCALE_CACHE_ELEMENTS = 1 << 23  # cache vectors up to 32 MB (MiniLM's: 0.5 M elements)


def _scale_vector(sizes: tuple[int, ...], scale: float, work: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 over every A part, ``scale`` over every B part (parts alternate A, B). The adapters of
    one base share their sizes, so a small base's vector is kept (the last two); a large
    base's is built per call rather than held outside the host budget."""
    key = (sizes, scale, work, device)
    got = _SCALE_VECTORS.get(key)
    if got is None:
        got = torch.tensor([1.0, scale] * (len(sizes) // 2), dtype=work, device=device).repeat_interleave(
            torch.tensor(sizes, device=device))
        if got.numel() <= _SCALE_CACHE_ELEMENTS:
            if len(_SCALE_VECTORS) >= 2:
                _SCALE_VECTORS.pop(next(iter(_SCALE_VECTORS)))
            _SCALE_VECTORS[key] = got
    return got


def own_delta_bounds(pack: OwnPack) -> dict[str, float]:
    """Per layer, an upper bound on max |ΔW| of its own factors (inf or nan where a value is not
    finite), from the per-part peaks alone: ΔW is an orthonormal 2-D transform of the blocks
    C_b = B_b A_b (periodization, orthogonal filters), so max |ΔW| <= ||ΔW||_F = ||C||_F, and
    ||C_b||_F <= r sqrt(m_b n_b) max|A_b| max|B_b|."""
    peaks = pack.peaks.tolist()
    total: dict[str, float] = {}
    for i, (layer, blk, rank) in enumerate(pack.parts):
        c = rank * math.sqrt(blk.m * blk.n) * peaks[2 * i] * peaks[2 * i + 1]
        total[layer] = total.get(layer, 0.0) + c * c
    return {layer: math.sqrt(v) for layer, v in total.items()}


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
