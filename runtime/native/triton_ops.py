"""Triton GPU kernels of the two ops (semantics: csrc/ops.cpp), with the same signatures.

Four kernels, all over the tokens in place, with no host-side metadata beyond the one checked
copy of the index tables (`checks.check_tables`):

* ``_shrink``: ``U[t, b] = A_{s,b} X_b[t]`` for every block b of the layout (grid: token
  windows x blocks), ``X_b`` a column band of the input.
* ``_expand``: ``Y_b[t] += B_{s,b} U[t, b]`` into the block's row band (grid: token windows x
  blocks x output tiles). Blocks that share a row band go to separate launches, so no two
  programs add into the same elements.
* ``_dwt_level`` / ``_idwt_level``: one level of pywt's periodization transform along the
  features (a gather over the taps), the inverse adding into its destination.

A window is ``BLOCK_T`` consecutive tokens; a program takes the window's distinct slots one at a
time, masking the other tokens, so a window of one run (the common case: a batch row is a run)
is one tile product, and a mixed window costs one product per slot it holds. Products are
``tl.dot`` in float32 (``input_precision="ieee"``, bfloat16 operands widened: exact).

sgmv is one shrink and one expand; wavelet_lowrank is J DWT levels, one shrink over all
blocks, two expands, and J inverse levels, the last adding into y.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_args, check_tables, check_wavelet
from .packing import PoolBlock, folded_layout, own_layout

BLOCK_T = 16
BLOCK_N = 32
BLOCK_M = 64
BLOCK_K = 64  # wavelet coefficients per program
_BIG = tl.constexpr(2147483647)


@triton.jit
def _shrink(x_ptr, stride_x, u_ptr, stride_u, pool_ptr, slot_ptr, off_ptr, rank_ptr, blk_ptr, T,
            BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """U[t, b*BLOCK_R + k] = sum_i A_b[k, i] X[t, col_b + i]   (k < rank of t's slot, zero after)."""
    b = tl.program_id(1)
    col = tl.load(blk_ptr + b * 4)  # blocks table: (column offset in X, n_b, prefix, unused)
    nb = tl.load(blk_ptr + b * 4 + 1)
    prefix = tl.load(blk_ptr + b * 4 + 2)
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.load(slot_ptr + toks, mask=toks < T, other=-1).to(tl.int32)
    ranks = tl.load(rank_ptr + slots, mask=slots >= 0, other=0)
    todo = ranks > 0
    ks = tl.arange(0, BLOCK_R)
    while tl.sum(todo.to(tl.int32), axis=0) > 0:
        s = tl.min(tl.where(todo, slots, _BIG), axis=0)
        sel = todo & (slots == s)
        r = tl.load(rank_ptr + s)
        a_base = pool_ptr + tl.load(off_ptr + s) + r * prefix
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, nb, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            xt = tl.load(x_ptr + toks[:, None] * stride_x + col + cols[None, :],
                         mask=sel[:, None] & (cols[None, :] < nb), other=0.0)
            at = tl.load(a_base + ks[:, None] * nb + cols[None, :], mask=(ks[:, None] < r) & (cols[None, :] < nb),
                         other=0.0)
            acc += tl.dot(xt.to(tl.float32), tl.trans(at.to(tl.float32)), input_precision="ieee")
        tl.store(u_ptr + toks[:, None] * stride_u + b * BLOCK_R + ks[None, :], acc, mask=sel[:, None])
        todo = todo & (slots != s)


@triton.jit
def _expand(u_ptr, stride_u, y_ptr, stride_y, pool_ptr, slot_ptr, off_ptr, rank_ptr, blk_ptr, T,
            BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Y[t, row_b + j] += sum_k B_b[j, k] U[t, b*BLOCK_R + k], for the blocks of this launch."""
    g = tl.program_id(1)
    b = tl.load(blk_ptr + g * 6)  # launch table: (block index, column offset in Y, m_b, prefix, n_b, unused)
    row = tl.load(blk_ptr + g * 6 + 1)
    mb = tl.load(blk_ptr + g * 6 + 2)
    prefix = tl.load(blk_ptr + g * 6 + 3)
    nb = tl.load(blk_ptr + g * 6 + 4)
    js = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.load(slot_ptr + toks, mask=toks < T, other=-1).to(tl.int32)
    ranks = tl.load(rank_ptr + slots, mask=slots >= 0, other=0)
    todo = (ranks > 0) & (toks * 0 + tl.program_id(2) * BLOCK_M < mb)  # (a vector test: the interpreter mis-types scalar & vector)
    ks = tl.arange(0, BLOCK_R)
    while tl.sum(todo.to(tl.int32), axis=0) > 0:
        s = tl.min(tl.where(todo, slots, _BIG), axis=0)
        sel = todo & (slots == s)
        r = tl.load(rank_ptr + s)
        b_base = pool_ptr + tl.load(off_ptr + s) + r * prefix + r * nb
        u = tl.load(u_ptr + toks[:, None] * stride_u + b * BLOCK_R + ks[None, :],
                    mask=sel[:, None] & (ks[None, :] < r), other=0.0)
        bt = tl.load(b_base + js[None, :] * r + ks[:, None], mask=(ks[:, None] < r) & (js[None, :] < mb), other=0.0)
        acc = tl.dot(u, bt.to(tl.float32), input_precision="ieee")
        mask = sel[:, None] & (js[None, :] < mb)
        ptrs = y_ptr + toks[:, None] * stride_y + row + js[None, :]
        old = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (old + acc).to(y_ptr.dtype.element_ty), mask=mask)
        todo = todo & (slots != s)


@triton.jit
def _dwt_level(in_ptr, stride_in, in_col, out_ptr, stride_out, a_col, d_col, lo_ptr, hi_ptr, slot_ptr, T, half,
               TAPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """a[k] = sum_i lo[i] x[(2k + F/2 - i) mod N], d likewise with hi (pywt periodization)."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    live = tl.load(slot_ptr + toks, mask=toks < T, other=-1) >= 0
    active = live[:, None] & (ks[None, :] < half)
    n = 2 * half
    rows = in_ptr + toks[:, None] * stride_in + in_col
    a = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    d = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for i in tl.static_range(TAPS):
        idx = (2 * ks + TAPS // 2 - i) % n
        idx = tl.where(idx < 0, idx + n, idx)
        v = tl.load(rows + idx[None, :], mask=active, other=0.0).to(tl.float32)
        a += tl.load(lo_ptr + i) * v
        d += tl.load(hi_ptr + i) * v
    out = out_ptr + toks[:, None] * stride_out + ks[None, :]
    tl.store(out + a_col, a, mask=active)
    tl.store(out + d_col, d, mask=active)


@triton.jit
def _idwt_level(in_ptr, stride_in, a_col, d_col, dst_ptr, stride_dst, dst_col, lo_ptr, hi_ptr, slot_ptr, T, half,
                TAPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """dst[p] += sum over taps i and k with 2k + F/2 - i = p (mod N) of lo[i] a[k] + hi[i] d[k]."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ps = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    live = tl.load(slot_ptr + toks, mask=toks < T, other=-1) >= 0
    active = live[:, None] & (ps[None, :] < 2 * half)
    e = ps % 2
    q = ps // 2
    rows = in_ptr + toks[:, None] * stride_in
    out = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for i in tl.static_range(TAPS):
        u = e - TAPS // 2 + i  # out[2q + e] takes tap i from coefficient q + u / 2 when u is even
        even = (u % 2) == 0
        k = (q + (u - (u % 2)) // 2) % half
        k = tl.where(k < 0, k + half, k)
        take = active & even[None, :]
        av = tl.load(rows + a_col + k[None, :], mask=take, other=0.0)
        dv = tl.load(rows + d_col + k[None, :], mask=take, other=0.0)
        out += tl.where(take, tl.load(lo_ptr + i) * av + tl.load(hi_ptr + i) * dv, 0.0)
    ptrs = dst_ptr + toks[:, None] * stride_dst + dst_col + ps[None, :]
    old = tl.load(ptrs, mask=active, other=0.0).to(tl.float32)
    tl.store(ptrs, (old + out).to(dst_ptr.dtype.element_ty), mask=active)


def _block_r(max_rank: int) -> int:
    return max(16, triton.next_power_of_2(max_rank))


def _lowrank(x_bands: torch.Tensor, y_bands: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor,
             slot_offset: torch.Tensor, slot_rank: torch.Tensor, layout: tuple[PoolBlock, ...],
             in_cols: list[int], out_cols: list[int], max_rank: int) -> None:
    """Every block's shrink (from column ``in_cols[b]`` of x_bands) and expand (into column
    ``out_cols[b]`` of y_bands); blocks that share an output band in different launches."""
    tokens, device, br = x_bands.shape[0], x_bands.device, _block_r(max_rank)
    u = torch.empty(tokens, len(layout) * br, dtype=torch.float32, device=device)
    table = torch.tensor([[c, b.n, b.prefix, 0] for c, b in zip(in_cols, layout)], dtype=torch.int64, device=device)
    windows = triton.cdiv(tokens, BLOCK_T)
    _shrink[(windows, len(layout))](x_bands, x_bands.stride(0), u, u.stride(0), pool, token_slot, slot_offset,
                                    slot_rank, table, tokens, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_R=br)
    launches: list[list[int]] = []
    for i in range(len(layout)):  # first launch that does not write this block's band yet
        for group in launches:
            if all(out_cols[j] != out_cols[i] for j in group):
                group.append(i)
                break
        else:
            launches.append([i])
    for group in launches:
        rows = [[i, out_cols[i], layout[i].m, layout[i].prefix, layout[i].n, 0] for i in group]
        table = torch.tensor(rows, dtype=torch.int64, device=device)
        tiles = triton.cdiv(max(layout[i].m for i in group), BLOCK_M)
        _expand[(windows, len(group), tiles)](u, u.stride(0), y_bands, y_bands.stride(0), pool, token_slot,
                                              slot_offset, slot_rank, table, tokens, BLOCK_T=BLOCK_T,
                                              BLOCK_M=BLOCK_M, BLOCK_R=br)


def sgmv(x: torch.Tensor, y: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor, slot_offset: torch.Tensor,
         slot_rank: torch.Tensor) -> None:
    """``y[t] += B_s (A_s x[t])`` in place."""
    op = "wara::sgmv"
    check_args(op, x, y, pool, token_slot, slot_offset, slot_rank)
    layout = folded_layout(y.shape[1], x.shape[1])
    tables = check_tables(op, token_slot, slot_offset, slot_rank, pool.numel(), layout)
    if tables.max_rank == 0:
        return
    _lowrank(x, y, pool, token_slot, slot_offset, slot_rank, layout, [0], [0], tables.max_rank)


def _band_columns(length: int, levels: int) -> dict[tuple[bool, int], int]:
    """Column of each band (detail?, level) in a (T, 2 * sum_j length / 2^j) band buffer."""
    cols, at = {}, 0
    for j in range(1, levels + 1):
        cols[False, j], cols[True, j] = at, at + (length >> j)
        at += 2 * (length >> j)
    return cols


def wavelet_lowrank(x: torch.Tensor, y: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor,
                    slot_offset: torch.Tensor, slot_rank: torch.Tensor, levels: int, dec_lo: torch.Tensor,
                    dec_hi: torch.Tensor) -> None:
    """``y[t] += ΔW_s x[t]`` from own factors, in place."""
    op = "wara::wavelet_lowrank"
    check_args(op, x, y, pool, token_slot, slot_offset, slot_rank)
    n, m = x.shape[1], y.shape[1]
    check_wavelet(op, levels, n, m, dec_lo, dec_hi)
    layout = own_layout(m, n, levels)
    tables = check_tables(op, token_slot, slot_offset, slot_rank, pool.numel(), layout)
    if tables.max_rank == 0:
        return
    tokens, device, taps = x.shape[0], x.device, dec_lo.shape[0]
    windows = triton.cdiv(tokens, BLOCK_T)
    lo = dec_lo.to(device=device, dtype=torch.float32)
    hi = dec_hi.to(device=device, dtype=torch.float32)
    xcol, ycol = _band_columns(n, levels), _band_columns(m, levels)
    xb = torch.empty(tokens, 2 * sum(n >> j for j in range(1, levels + 1)), dtype=torch.float32, device=device)
    yb = torch.zeros(tokens, 2 * sum(m >> j for j in range(1, levels + 1)), dtype=torch.float32, device=device)
    src, src_col = x, 0
    for j in range(1, levels + 1):
        half = n >> j
        _dwt_level[(windows, triton.cdiv(half, BLOCK_K))](src, src.stride(0), src_col, xb, xb.stride(0),
                                                           xcol[False, j], xcol[True, j], lo, hi, token_slot, tokens,
                                                           half, TAPS=taps, BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K)
        src, src_col = xb, xcol[False, j]
    _lowrank(xb, yb, pool, token_slot, slot_offset, slot_rank, layout,
             [xcol[b.col_detail, b.level] for b in layout], [ycol[b.row_detail, b.level] for b in layout],
             tables.max_rank)
    for j in range(levels, 0, -1):  # level j's synthesis adds into the approximation band of level j - 1, or y
        half = m >> j
        dst, dst_col = (yb, ycol[False, j - 1]) if j > 1 else (y, 0)
        _idwt_level[(windows, triton.cdiv(2 * half, BLOCK_K))](yb, yb.stride(0), ycol[False, j], ycol[True, j],
                                                                dst, dst.stride(0), dst_col, lo, hi, token_slot,
                                                                tokens, half, TAPS=taps, BLOCK_T=BLOCK_T,
                                                                BLOCK_K=BLOCK_K)
