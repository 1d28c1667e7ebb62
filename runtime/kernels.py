"""Multi-adapter LoRA kernels: ``delta[b] = B_s (A_s x[b])`` for each row b and its slot s.

The engine calls one function through `LoraKernel`, so a native or CUDA kernel (punica-style
SGMV) can replace the CPU one without touching anything else. A kernel reads each slot's
factors in place from the layer's page pool (`SlotLayer.factors`: views A (r, n), B (m, r) at
the slot's own rank); rows of the base (slot 0) are in no group and cost nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .engine import SlotLayer


class LoraKernel(Protocol):
    def __call__(self, x: torch.Tensor, layer: "SlotLayer", groups: list[tuple[int, torch.Tensor]],
                 out: torch.Tensor | None = None) -> torch.Tensor | None:
        """x (B, T, n); groups: (slot, row indices) for every non-base slot in the batch; the
        slot's factors from ``layer.factors(slot)``. With ``out`` (B, T, m), contiguous: add
        the delta into it in place and return it; without: return the delta. None if no row
        has an adapter and no ``out`` was given."""


def grouped_lora(x: torch.Tensor, layer: "SlotLayer", groups: list[tuple[int, torch.Tensor]],
                 out: torch.Tensor | None = None) -> torch.Tensor | None:
    """CPU/GPU kernel on each slot's real rank.

    One adapter for the whole batch: two GEMMs on the pool's views, the second accumulating
    into ``out`` (no delta tensor, no separate add pass). One adapter on part of the rows: a
    GEMM pair over just its rows. Rows of several adapters: each row's factors are gathered,
    zero-padded to the batch's largest rank, and run as two batched matmuls, the second
    accumulating into ``out``: one pair of calls whatever the number of adapters. (MiniLM,
    batch 32, seq 64, 3 adapters, one thread: a loop of GEMM pairs per adapter cost 1.24x base,
    the gather 1.14x.)"""
    pairs = [(idx, f) for slot, idx in groups if (f := layer.factors(slot)) is not None]
    if not pairs:
        return out
    m = layer.m
    if len(pairs) == 1 and pairs[0][0].numel() == x.shape[0]:
        a, b = pairs[0][1]
        u = x.reshape(-1, x.shape[-1]) @ a.T
        if out is None:
            return (u @ b.T).reshape(*x.shape[:-1], m)
        out.view(-1, m).addmm_(u, b.T)
        return out
    if out is None:
        out = x.new_zeros(*x.shape[:-1], m)
    if len(pairs) == 1:
        idx, (a, b) = pairs[0]
        return out.index_add_(0, idx, (x[idx] @ a.T) @ b.T)
    r = max(a.shape[0] for _, (a, _) in pairs)
    ga = x.new_zeros(x.shape[0], r, x.shape[-1])  # base rows keep zeros
    gb = x.new_zeros(x.shape[0], m, r)
    for idx, (a, b) in pairs:
        ga[idx, : a.shape[0]] = a
        gb[idx, :, : b.shape[1]] = b
    return out.baddbmm_(torch.bmm(x, ga.transpose(1, 2)), gb.transpose(1, 2))


def sgmv_lora(x: torch.Tensor, layer: "SlotLayer", groups: list[tuple[int, torch.Tensor]],
              out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The native SGMV op (`runtime.native`, ``torch.ops.wara.sgmv``) on the page pool as it is:
    per-token slot indices, each slot at its own rank, base rows free, no factor copies. One
    adapter on the whole batch stays on `grouped_lora`'s GEMM pair, which the op does not beat
    there (benchmarks/results/kernels.json: 0.5-0.8x at 2048 tokens, 2-core VM); mixed batches
    go to the op (1.2-11x faster than the gather there). `default_kernel` picks it only where
    the library is loaded, so it calls the op directly (it runs once per adapted layer)."""
    live = [(slot, idx) for slot, idx in groups if layer.rank.get(slot, 0)]
    if not live:
        return out
    if len(live) == 1 and live[0][1].numel() == x.shape[0]:
        return grouped_lora(x, layer, live, out)
    rows, tokens, n = x.shape
    key = ("token_slot", tokens)
    token_slot = layer.routing.cache.get(key)
    if token_slot is None:  # the same for every layer of a forward: computed once
        row_slot = torch.full((rows,), -1, dtype=torch.long, device=x.device)
        for g, (_, idx) in enumerate(groups):
            row_slot[idx] = g
        token_slot = layer.routing.cache[key] = row_slot.repeat_interleave(tokens)
    slot_offset = torch.tensor([layer.offset.get(s, 0) for s, _ in groups], dtype=torch.long, device=x.device)
    slot_rank = torch.tensor([layer.rank.get(s, 0) for s, _ in groups], dtype=torch.long, device=x.device)
    if out is None:
        out = x.new_zeros(rows, tokens, layer.m)
    torch.ops.wara.sgmv(x.reshape(rows * tokens, n), out.view(rows * tokens, layer.m), layer.pool, token_slot,
                        slot_offset, slot_rank)
    return out


def default_kernel(device: torch.device) -> tuple[LoraKernel, str]:
    """(kernel, what serves) for an engine on ``device``: the native op where its library is
    built and loaded (`make test` and `make demo` build it), else `grouped_lora`, and why."""
    from runtime import native

    st = native.load(build=False)
    if native.backend_for(device) == "native":
        return sgmv_lora, f"native sgmv ({st.info})"
    return grouped_lora, f"pure PyTorch grouped_lora ({st.reason or 'no native kernel for ' + device.type})"
