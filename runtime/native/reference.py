"""Pure-PyTorch twins of the native ops, and the float64 row-by-row references.

* `sgmv` and `wavelet_lowrank`: the same signatures and semantics as ``torch.ops.wara.*``
  (csrc/ops.cpp), in plain tensor ops on any device: what serves where the native library is
  not built. Tokens are grouped by slot (one pair of matmuls per slot in the batch).
* `sgmv_delta_f64` and `wavelet_delta_f64`: slow, obviously-correct oracles that loop over the
  tokens in float64 and return the update alone; the wavelet one builds each slot's ΔW with
  ``pywt.waverec2`` (periodization), independent of every transform in this repository.
"""

from __future__ import annotations

import torch

from .checks import check_args, check_tables, check_wavelet
from .packing import PoolBlock, folded_layout, own_layout, unpack


def _groups(tables) -> list[tuple[int, list[int]]]:
    """(slot, token indices) for every slot of rank > 0 that has tokens."""
    rows: dict[int, list[int]] = {}
    for t, s in enumerate(tables.token_slot):
        if s >= 0 and tables.slot_rank[s] > 0:
            rows.setdefault(s, []).append(t)
    return sorted(rows.items())


def _add_rows(y: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> None:
    """y[rows] += delta, summed in float32 and rounded once."""
    y[rows] = (y[rows].float() + delta).to(y.dtype)


def sgmv(x: torch.Tensor, y: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor, slot_offset: torch.Tensor,
         slot_rank: torch.Tensor) -> None:
    """``y[t] += B_s (A_s x[t])`` for every token t with ``s = token_slot[t] >= 0`` (in place)."""
    op = "wara::sgmv"
    check_args(op, x, y, pool, token_slot, slot_offset, slot_rank)
    n, m = x.shape[1], y.shape[1]
    layout = folded_layout(m, n)
    tables = check_tables(op, token_slot, slot_offset, slot_rank, pool.numel(), layout)
    for s, idx in _groups(tables):
        rows = torch.tensor(idx, device=x.device)
        f = unpack(pool, tables.slot_offset[s], tables.slot_rank[s], layout)["lora"]
        a, b = f[0].float(), f[1].float()
        _add_rows(y, rows, (x[rows].float() @ a.T) @ b.T)


def _roll(t: torch.Tensor, c: int) -> torch.Tensor:
    """``out[..., k] = t[..., (k + c) mod len]``."""
    return torch.roll(t, shifts=-c, dims=-1) if c else t


def dwt_level(x: torch.Tensor, lo: list[float], hi: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """pywt periodization, one level along the last axis: ``a[k] = Σ_i lo[i] x[(2k + F/2 - i) mod N]``."""
    taps = len(lo)
    even, odd = x[..., 0::2], x[..., 1::2]
    a = torch.zeros_like(even)
    d = torch.zeros_like(even)
    for i in range(taps):
        s = taps // 2 - i  # x[2k + s] = (even if s is even else odd)[k + floor(s / 2)]
        src = _roll(even if s % 2 == 0 else odd, s // 2)
        a = a + lo[i] * src
        d = d + hi[i] * src
    return a, d


def idwt_level(a: torch.Tensor, d: torch.Tensor, lo: list[float], hi: list[float]) -> torch.Tensor:
    """The adjoint (= inverse, the filters being orthogonal) of `dwt_level`."""
    taps = len(lo)
    out = [torch.zeros_like(a), torch.zeros_like(a)]  # even, odd samples
    for i in range(taps):
        e = (taps // 2 - i) % 2  # out[2q + e] takes tap i from coefficient q + (e - F/2 + i) / 2
        c = (e - taps // 2 + i) // 2
        out[e] = out[e] + lo[i] * _roll(a, c) + hi[i] * _roll(d, c)
    return torch.stack(out, dim=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])


def _band(bands: dict, detail: bool, level: int) -> torch.Tensor:
    return bands["d" if detail else "a"][level]


def wavelet_lowrank(x: torch.Tensor, y: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor,
                    slot_offset: torch.Tensor, slot_rank: torch.Tensor, levels: int, dec_lo: torch.Tensor,
                    dec_hi: torch.Tensor) -> None:
    """``y[t] += ΔW_s x[t]`` from own factors (in place): DWT of x along the input features, per
    block ``B (A band)`` into its output band, inverse DWT along the output features."""
    op = "wara::wavelet_lowrank"
    check_args(op, x, y, pool, token_slot, slot_offset, slot_rank)
    n, m = x.shape[1], y.shape[1]
    lo, hi = check_wavelet(op, levels, n, m, dec_lo, dec_hi)
    layout = own_layout(m, n, levels)
    tables = check_tables(op, token_slot, slot_offset, slot_rank, pool.numel(), layout)
    for s, idx in _groups(tables):
        rows = torch.tensor(idx, device=x.device)
        factors = unpack(pool, tables.slot_offset[s], tables.slot_rank[s], layout)
        _add_rows(y, rows, _wavelet_delta(x[rows].float(), factors, layout, levels, m, lo, hi))


def _wavelet_delta(x: torch.Tensor, factors: dict, layout: tuple[PoolBlock, ...], levels: int, m: int,
                   lo: list[float], hi: list[float]) -> torch.Tensor:
    inp = {"a": {0: x}, "d": {}}
    for j in range(1, levels + 1):
        inp["a"][j], inp["d"][j] = dwt_level(inp["a"][j - 1], lo, hi)
    out = {k: {j: x.new_zeros(x.shape[0], m >> j) for j in range(1, levels + 1)} for k in ("a", "d")}
    for blk in layout:
        a, b = factors[blk.name]
        band = _band(inp, blk.col_detail, blk.level)
        _band(out, blk.row_detail, blk.level).add_((band @ a.float().T) @ b.float().T)
    cur = out["a"][levels]
    for j in range(levels, 0, -1):
        cur = idwt_level(cur, out["d"][j], lo, hi)
        if j > 1:
            cur = cur + out["a"][j - 1]
    return cur


# ------------------------------------------------------------------------------------------
# float64 oracles (tests, benchmarks' correctness checks)


def sgmv_delta_f64(x: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor, slot_offset: torch.Tensor,
                   slot_rank: torch.Tensor, *, out_features: int) -> torch.Tensor:
    """The update `sgmv` adds, token by token in float64: (T, out_features); base rows zero."""
    n, m = x.shape[1], out_features
    layout = folded_layout(m, n)
    out = torch.zeros(x.shape[0], m, dtype=torch.float64)
    for t, s in enumerate(token_slot.tolist()):
        r = int(slot_rank[s]) if s >= 0 else 0
        if r:
            a, b = unpack(pool.cpu(), int(slot_offset[s]), r, layout)["lora"]
            out[t] = b.double() @ (a.double() @ x[t].cpu().double())
    return out


def pywt_delta_weight(factors: dict, *, shape: tuple[int, int], wavelet: str, levels: int) -> torch.Tensor:
    """ΔW (m, n) of one slot's factors by ``pywt.waverec2`` in float64 (periodization); the
    scale is already in B."""
    import numpy as np
    import pywt

    c = {name: (b.double() @ a.double()).numpy() for name, (a, b) in factors.items()}
    coeffs = [c[f"a{levels}"]] + [(c[f"h{j}"], c[f"v{j}"], c[f"d{j}"]) for j in range(levels, 0, -1)]
    out = pywt.waverec2(coeffs, wavelet, mode="periodization")
    if out.shape != shape:
        raise ValueError(f"pywt.waverec2 gave shape {out.shape}, expected {shape}")
    return torch.from_numpy(np.ascontiguousarray(out))


def wavelet_delta_f64(x: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor, slot_offset: torch.Tensor,
                      slot_rank: torch.Tensor, *, out_features: int, levels: int, wavelet: str) -> torch.Tensor:
    """The update `wavelet_lowrank` adds, token by token in float64 with each slot's dense ΔW
    from ``pywt.waverec2``: (T, out_features); base rows zero."""
    n, m = x.shape[1], out_features
    layout = own_layout(m, n, levels)
    weights: dict[int, torch.Tensor] = {}
    out = torch.zeros(x.shape[0], m, dtype=torch.float64)
    for t, s in enumerate(token_slot.tolist()):
        r = int(slot_rank[s]) if s >= 0 else 0
        if not r:
            continue
        if s not in weights:
            factors = unpack(pool.cpu(), int(slot_offset[s]), r, layout)
            weights[s] = pywt_delta_weight(factors, shape=(m, n), wavelet=wavelet, levels=levels)
        out[t] = weights[s] @ x[t].cpu().double()
    return out
