"""The native ops' argument checks (csrc/checks.h), for the Python and Triton implementations:
the same conditions, the same messages, RuntimeError as TORCH_CHECK raises."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import PoolBlock

FLOATS = (torch.float32, torch.bfloat16)
MAX_TAPS = 64


def _fail(op: str, msg: str) -> None:
    raise RuntimeError(f"{op}: {msg}")


def check_args(op: str, x: torch.Tensor, y: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor,
               slot_offset: torch.Tensor, slot_rank: torch.Tensor) -> None:
    if x.dim() != 2:
        _fail(op, f"x must be 2-D (tokens, in_features), got shape {list(x.shape)}")
    if y.dim() != 2:
        _fail(op, f"y must be 2-D (tokens, out_features), got shape {list(y.shape)}")
    if x.shape[0] != y.shape[0]:
        _fail(op, f"x has {x.shape[0]} tokens but y has {y.shape[0]}")
    if x.shape[1] < 1 or y.shape[1] < 1:
        _fail(op, f"x and y need at least one feature, got x {list(x.shape)} y {list(y.shape)}")
    if x.dtype not in FLOATS or y.dtype not in FLOATS or pool.dtype not in FLOATS:
        _fail(op, f"x, y and pool must be float32 or bfloat16, got x {x.dtype}, y {y.dtype}, pool {pool.dtype}")
    if x.stride(1) != 1 or y.stride(1) != 1 or x.stride(0) < x.shape[1] or y.stride(0) < y.shape[1]:
        _fail(op, f"x and y need unit stride along features and non-overlapping rows, got strides x "
                  f"{list(x.stride())} y {list(y.stride())}")
    if pool.dim() != 1 or not pool.is_contiguous():
        _fail(op, f"pool must be a contiguous 1-D tensor, got shape {list(pool.shape)}")
    if token_slot.dim() != 1 or token_slot.shape[0] != x.shape[0]:
        _fail(op, f"token_slot must be 1-D with one entry per token ({x.shape[0]}), got shape {list(token_slot.shape)}")
    if slot_offset.dim() != 1 or slot_rank.dim() != 1 or slot_offset.shape[0] != slot_rank.shape[0]:
        _fail(op, f"slot_offset and slot_rank must be 1-D of the same length (slots), got {list(slot_offset.shape)} "
                  f"and {list(slot_rank.shape)}")
    for t in (token_slot, slot_offset, slot_rank):
        if t.dtype != torch.int64:
            _fail(op, f"token_slot, slot_offset and slot_rank must be int64, got {t.dtype}")
    for t in (y, pool, token_slot, slot_offset, slot_rank):
        if t.device != x.device:
            _fail(op, f"all tensors must be on one device: x is on {x.device}, another on {t.device}")


@dataclass(frozen=True)
class HostTables:
    """The index tables on the host, checked."""

    token_slot: list[int]
    slot_offset: list[int]
    slot_rank: list[int]
    max_rank: int


def check_tables(op: str, token_slot: torch.Tensor, slot_offset: torch.Tensor, slot_rank: torch.Tensor,
                 pool_numel: int, layout: tuple[PoolBlock, ...]) -> HostTables:
    """Every token's slot in [-1, S), every slot's rank >= 0 and its factors inside the pool.
    One device-to-host copy of the three tables."""
    t, s = token_slot.shape[0], slot_offset.shape[0]
    flat = torch.cat([token_slot, slot_offset, slot_rank]).cpu().tolist()
    ts, off, rank = flat[:t], flat[t : t + s], flat[t + s :]
    per = sum(b.n + b.m for b in layout)
    for i, (o, r) in enumerate(zip(off, rank)):
        if r < 0:
            _fail(op, f"slot {i} has negative rank {r}")
        if r and (o < 0 or o + r * per > pool_numel):
            _fail(op, f"slot {i} (offset {o}, rank {r}, {per} elements per rank) lies outside the pool of "
                      f"{pool_numel} elements")
    max_rank = 0
    for i, v in enumerate(ts):
        if not -1 <= v < s:
            _fail(op, f"token {i} has slot {v}, outside [-1, {s})")
        if v >= 0:
            max_rank = max(max_rank, rank[v])
    return HostTables(ts, off, rank, max_rank)


def check_wavelet(op: str, levels: int, n: int, m: int, dec_lo: torch.Tensor, dec_hi: torch.Tensor) -> tuple[list[float], list[float]]:
    """J in [1, 16] dividing both feature axes; an even-length filter pair. Returns the taps."""
    if not 1 <= levels <= 16:
        _fail(op, f"levels must be in [1, 16], got {levels}")
    step = 1 << levels
    if n % step or m % step:
        _fail(op, f"in_features {n} and out_features {m} must be divisible by 2^levels = {step} (levels={levels})")
    if dec_lo.dim() != 1 or dec_hi.dim() != 1 or dec_lo.shape[0] != dec_hi.shape[0]:
        _fail(op, f"dec_lo and dec_hi must be 1-D of one length, got {list(dec_lo.shape)} and {list(dec_hi.shape)}")
    taps = dec_lo.shape[0]
    if taps < 2 or taps % 2 or taps > MAX_TAPS:
        _fail(op, f"the filters need an even number of taps in [2, {MAX_TAPS}], got {taps}")
    if not dec_lo.is_floating_point() or not dec_hi.is_floating_point():
        _fail(op, f"dec_lo and dec_hi must be floating point, got {dec_lo.dtype} and {dec_hi.dtype}")
    return dec_lo.double().cpu().tolist(), dec_hi.double().cpu().tolist()
