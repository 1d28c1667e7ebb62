"""Slot layers: a base layer plus the adapters of the device pool, chosen per row.

Every adaptable layer of a served base becomes a `SlotLayer` holding one flat ``pool`` tensor
cut into pages: a page is one rank of the layer ((n + m) values for shape (m, n)), and an adapter
of folded rank R holds R consecutive pages: its ``lora_A`` (R, n) and then its ``lora_B``
(m, R), both row-major and contiguous, so a kernel reads them in place. Where the pages go is
the device tier's decision (`runtime.adapters.device`); a layer only copies what it is told.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from wara_train.layer import is_conv1d, is_pointwise_conv, layer_shape

from .errors import InternalError
from .kernels import LoraKernel, Routing

class SlotLayer(nn.Module):
    """``y = W0 x + ΔW_s x`` for each row's slot s (Linear, 1x1 Conv2d, Conv1D), the slot's
    factors read in place from this layer's page pool: folded ``ΔW_s = B_s A_s`` (A (r, n),
    B (m, r)), or the adapter's own WaRA blocks (`runtime.native.packing.own_layout`; ``own``
    names the slot's (levels, wavelet)).

    Inputs lead with the batch axis; everything between it and the feature axis is tokens
    (sequence positions, or H x W for a Linear on channels-last maps such as ConvNeXt's)."""

    def __init__(self, base: nn.Module, *, pages: int, routing: Routing, kernel: LoraKernel) -> None:
        super().__init__()
        self.base = base
        self.conv = is_pointwise_conv(base)
        self.conv1d = is_conv1d(base)
        self.m, self.n = layer_shape(base)
        dev, dt = base.weight.device, base.weight.dtype
        # Written only in place through views of it (place, place_own, move): the native op keeps
        # packed copies of slots known by the pool's version counter, which those writes bump.
        self.register_buffer("pool", torch.zeros(pages * (self.n + self.m), device=dev, dtype=dt), persistent=False)
        self.routing = routing
        self.kernel = kernel
        self.offset: dict[int, int] = {}  # slot -> element offset of its A in the pool
        self.rank: dict[int, int] = {}  # slot -> its rank in this layer (0: the adapter skips it)
        self.size: dict[int, int] = {}  # slot -> pool elements it occupies here
        self.own: dict[int, tuple[int, str]] = {}  # slot -> (levels, wavelet) of a slot holding own factors
        # What a kernel derives from the slots' places (index tables, call plans), cleared
        # whenever a slot here (or in a layer it computes with, ``shared``) is placed, moved or
        # dropped.
        self.memo: dict[tuple, Any] = {}
        # A kernel's entry for the whole layer (base GEMM included: `runtime.kernels.native_linear`),
        # where the base is a plain Linear or Conv1D whose forward it can stand in for: it returns
        # the layer's output, or None where it does not apply (a hooked base among them).
        self.linear = getattr(kernel, "linear", None) if _plain_gemm(base) else None
        # Layers a forward feeds this layer's input right after it (the key and value of a query;
        # `TorchEngine._share_inputs`): ``linear`` computes their outputs with this one's, from one
        # transform of the input, and they pick them up (``leader``: the layer that computes yours).
        self.shared: list[SlotLayer] = []
        self.leader: SlotLayer | None = None

    def memoized(self, key: tuple, make) -> Any:
        """``memo[key]``, made by ``make()`` on first use (the memo is bounded: many distinct
        mixes of adapters start it afresh)."""
        got = self.memo.get(key, _MISSING)
        if got is _MISSING:
            if len(self.memo) > 256:
                self.memo.clear()
            got = self.memo[key] = make()
        return got

    def _changed(self) -> None:
        """A slot's place changed: forget what was derived from the places, here and in the
        layer that computes this one's output."""
        self.memo.clear()
        if self.leader is not None:
            self.leader.memo.clear()

    def factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views (A (r, n), B (m, r)) of a folded slot's factors in the pool; None for rank 0."""
        r = self.rank.get(slot, 0)
        if r == 0:
            return None
        if slot in self.own:
            raise InternalError(f"slot {slot} holds own WaRA factors, which this kernel cannot read")
        off, n, m = self.offset[slot], self.n, self.m
        return self.pool[off : off + r * n].view(r, n), self.pool[off + r * n : off + r * (n + m)].view(m, r)

    def place(self, slot: int, page: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Copy folded factors (A (r, n), B (m, r); None: rank 0) into the pages from ``page``."""
        off = page * (self.n + self.m)
        r = 0 if a is None else a.shape[0]
        self.offset[slot], self.rank[slot], self.size[slot] = off, r, r * (self.n + self.m)
        self.own.pop(slot, None)
        self._changed()
        if r:
            n, m = self.n, self.m
            self.pool[off : off + r * n].view(r, n).copy_(a)
            self.pool[off + r * n : off + r * (n + m)].view(m, r).copy_(b)

    def place_own(self, slot: int, page: int, packed: torch.Tensor, *, rank: int, levels: int, wavelet: str) -> None:
        """Copy an adapter's own factors (`runtime.native.pack_own`, WaRA rank ``rank``) into the
        pages from ``page``."""
        off = page * (self.n + self.m)
        self.offset[slot], self.rank[slot], self.size[slot] = off, rank, packed.numel()
        self.own[slot] = (levels, wavelet)
        self._changed()
        self.pool[off : off + packed.numel()].copy_(packed)

    def move(self, slot: int, page: int) -> None:
        """Move a slot's factors to start at ``page`` (compaction: never past its old place)."""
        size, off = self.size[slot], self.offset[slot]
        new = page * (self.n + self.m)
        if size and new != off:
            self.pool[new : new + size].copy_(self.pool[off : off + size].clone())
        self.offset[slot] = new
        self._changed()

    def drop(self, slot: int) -> None:
        for table in (self.offset, self.rank, self.size, self.own):
            table.pop(slot, None)
        self._changed()

    def tables(self, slots: tuple[int, ...], form: tuple[int, str] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot_offset, slot_rank) for a native op over ``slots`` (a batch's groups, in order):
        the slots of ``form`` (None: folded; else own factors at (levels, wavelet)) at their
        rank, every other slot at rank 0 (skipped). Cached until a slot here changes."""
        def make():
            dev = self.pool.device
            off = torch.tensor([self.offset.get(s, 0) for s in slots], dtype=torch.long, device=dev)
            rank = torch.tensor([self.rank.get(s, 0) if self.own.get(s) == form else 0 for s in slots],
                                dtype=torch.long, device=dev)
            return off, rank

        return self.memoized(("tables", slots, form), make)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        if not routing.groups:
            return self.base(x)
        if self.leader is not None:  # computed with the leader's, if it saw this very input, unchanged
            got = routing.cache.pop(self, None)
            if got is not None and got[0] is x and got[1] == x._version:
                return got[2]
        if x.shape[0] != routing.rows:
            raise InternalError(f"an adapted layer sees inputs of shape {list(x.shape)} whose first axis is not the "
                              f"batch of {routing.rows}: this model cannot be served with per-row adapters")
        if self.linear is not None:  # the whole layer in one native call, where it applies
            y = self.linear(x, self)
            if y is not None:
                return y
        y = self.base(x)
        if self.conv:  # (B, C, H, W) -> (B, HW, C) rows of features
            xs = x.flatten(2).transpose(1, 2)
            d = self.kernel(xs, self, self.routing.groups)
            return y if d is None else y + d.transpose(1, 2).reshape(y.shape)
        xs = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, tokens, n)
        if y.is_contiguous():
            self.kernel(xs, self, self.routing.groups, out=y.view(y.shape[0], -1, y.shape[-1]))  # in place
            return y
        d = self.kernel(xs, self, self.routing.groups)
        return y if d is None else y + d.reshape(y.shape)


_MISSING = object()


def _plain_gemm(base: nn.Module) -> bool:
    """Whether ``base``'s forward is exactly ``x W0^T + bias`` on its parameters: an nn.Linear (not
    a subclass, which may compute otherwise) or a Conv1D."""
    return type(base) is nn.Linear or is_conv1d(base)


class HeadTap(nn.Module):
    """Stands where the task head was: passes the features through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
