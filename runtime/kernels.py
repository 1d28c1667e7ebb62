"""Multi-adapter kernels: ``delta[b] = ΔW_s x[b]`` for each row b and its slot s.

The engine calls one function through `LoraKernel`, so a native or CUDA kernel (punica-style
SGMV) can replace the CPU one without touching anything else. A kernel reads each slot's
factors in place from the layer's page pool: folded ``ΔW_s = B_s A_s`` (`SlotLayer.factors`:
views A (r, n), B (m, r) at the slot's own rank) or, for a kernel marked
``reads_own_factors``, the adapter's own WaRA blocks (`SlotLayer.own`); rows of the base
(slot 0) are in no group and cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch.nn.modules import module as _nn_module


@dataclass
class Routing:
    """Which slot each row of the current batch uses; set by the engine before a forward."""

    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (slot, row indices), base rows in none
    rows: int = 0  # the batch size: every adapted layer's input must lead with it
    cache: dict = field(default_factory=dict)  # what a kernel computes once per forward (token slots)


class KernelLayer(Protocol):
    """What a kernel reads of an adapted layer (`runtime.slots.SlotLayer` is the one implementation).

        m, n                    out and in features of the base layer
        base                    the base module (its weight and bias)
        conv                    the base is a 1x1 Conv2d (rows of features are its pixels)
        pool                    the flat page pool every slot's factors live in
        rank[slot]              the slot's rank in this layer (0 or absent: it skips the layer)
        own[slot]               (levels, wavelet) of a slot that holds its own WaRA factors
        factors(slot)           views (A (r, n), B (m, r)) of a folded slot in the pool; None at rank 0
        tables(slots, form)     (offset, rank) tensors over ``slots`` for a native op; cached
        memoized(key, make)     make() once until a slot here changes
        shared                  layers fed the same input whose outputs this layer's call computes
        routing                 the batch's `Routing`
    """

    m: int
    n: int
    base: Any
    conv: bool
    pool: torch.Tensor
    rank: dict[int, int]
    own: dict[int, tuple[int, str]]
    shared: list
    routing: Routing

    def factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def tables(self, slots: tuple[int, ...], form: tuple[int, str] | None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def memoized(self, key: tuple, make: Callable[[], Any]) -> Any: ...


class LoraKernel(Protocol):
    def __call__(self, x: torch.Tensor, layer: "KernelLayer", groups: list[tuple[int, torch.Tensor]],
                 out: torch.Tensor | None = None) -> torch.Tensor | None:
        """x (B, T, n); groups: (slot, row indices) for every non-base slot in the batch; the
        slot's factors from ``layer.factors(slot)`` (or its own factors, see the module). With ``out`` (B, T, m), contiguous: add
        the delta into it in place and return it; without: return the delta. None if no row
        has an adapter and no ``out`` was given."""


def grouped_lora(x: torch.Tensor, layer: "KernelLayer", groups: list[tuple[int, torch.Tensor]],
                 out: torch.Tensor | None = None) -> torch.Tensor | None:
    """CPU/GPU kernel on each slot's real rank.

    One adapter for the whole batch: two GEMMs on the pool's views, the second accumulating
    into ``out`` (no delta tensor, no separate add pass). One adapter on part of the rows: a
    GEMM pair over just its rows. Rows of several adapters: each row's factors are gathered,
    zero-padded to the batch's largest rank, and run as two batched matmuls, the second
    accumulating into ``out``: one pair of calls whatever the number of adapters. (MiniLM,
    batch 32, seq 64, 3 adapters, one thread: a loop of GEMM pairs per adapter cost 1.24x base,
    the gather 1.14x.) On a bfloat16 base these are torch's bfloat16 GEMMs: each accumulates in
    float32, and the rank-r intermediate is rounded to bfloat16 once (the native ops keep it in
    float32)."""
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


def native_lora(x: torch.Tensor, layer: "KernelLayer", groups: list[tuple[int, torch.Tensor]],
                out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The native ops (``torch.ops.wara``, `runtime.native`) on the page pool as it is: per-token
    slot indices, each slot at its own rank, base rows free, no factor copies. Folded slots go to
    ``wara::sgmv``, slots holding own factors to ``wara::wavelet_lowrank`` (one call per
    (levels, wavelet) in the batch), each call skipping the other form's rows. One folded
    adapter on the whole batch stays on `grouped_lora`'s GEMM pair, which sgmv does not beat
    there (benchmarks/results/kernels.json). `runtime.selection.adapter_kernel` picks this only
    where the library is loaded (with CUDA kernels, for a CUDA device).

    It runs once per adapted layer, so the Python is kept to a few lookups: what depends only
    on the batch (the slots, the per-token slot index) is made once per forward and kept in
    ``layer.routing.cache``; what depends on the batch's slots and this layer's pool (the calls
    and their index tables, or the pair's factor views) once per slot set, in ``layer.memo``,
    which the layer clears when a slot changes."""
    return _fused(x, layer, groups, out, "native")


def triton_lora(x: torch.Tensor, layer: "KernelLayer", groups: list[tuple[int, torch.Tensor]],
                out: torch.Tensor | None = None) -> torch.Tensor | None:
    """`native_lora`'s plan run by the Triton implementation of the two ops, through
    `runtime.native.sgmv` and `runtime.native.wavelet_lowrank` (``backend="triton"``): the GPU
    kernel where the native library has no CUDA kernels (`runtime.selection.adapter_kernel`),
    and under ``TRITON_INTERPRET=1`` on CPU tensors too. It calls no ``torch.ops.wara`` op and
    has no whole-layer entry (``linear``): the base runs as it is, and the update adds into its
    output."""
    return _fused(x, layer, groups, out, "triton")


def _fused(x: torch.Tensor, layer: "KernelLayer", groups: list[tuple[int, torch.Tensor]],
           out: torch.Tensor | None, impl: str) -> torch.Tensor | None:
    """The body of `native_lora` and `triton_lora`, whose plans call the ops of ``impl``
    (`_OPS`)."""
    rows, tokens, n = x.shape
    cache = layer.routing.cache
    batch = cache.get((impl, tokens))
    if batch is None or batch[0] is not groups:  # the first layer of a forward with this many tokens
        batch = cache[(impl, tokens)] = _route(groups, rows, tokens, x.device, impl)
    plan = layer.memoized(batch[1], lambda: _plan(layer, *batch[1][1:], impl))
    if not plan:
        return out
    m = layer.m
    xt = x.reshape(rows * tokens, n)
    if plan[0] is _PAIR:  # one folded adapter on every row
        a_t, b_t = plan[1]
        if out is None:
            return (xt @ a_t @ b_t).view(rows, tokens, m)
        out.view(rows * tokens, m).addmm_(xt @ a_t, b_t)
        return out
    if out is None:
        out = x.new_zeros(rows, tokens, m)
    yt = out.view(rows * tokens, m)
    if xt.stride(-1) != 1:  # a conv's (B, HW, C) view of one image reshapes to a column-major view
        xt = xt.contiguous()
    pool, token_slot = layer.pool, batch[2]
    for op, args in plan:
        op(xt, yt, pool, token_slot, *args)
    return out


def _native_ops() -> tuple[Callable, Callable]:
    return torch.ops.wara.sgmv.default, torch.ops.wara.wavelet_lowrank.default


def _triton_ops() -> tuple[Callable, Callable]:
    from functools import partial

    from runtime import native

    return partial(native.sgmv, backend="triton"), partial(native.wavelet_lowrank, backend="triton")


# (sgmv, wavelet_lowrank) of each implementation a fused kernel's plan calls, looked up when a
# plan is made (the native library may load after this module).
_OPS: dict[str, Callable[[], tuple[Callable, Callable]]] = {"native": _native_ops, "triton": _triton_ops}


_PAIR = object()  # a plan's marker: the GEMM pair on one folded adapter's (A^T, B^T) views


def _route(groups: list[tuple[int, torch.Tensor]], rows: int, tokens: int, device: torch.device,
           impl: str = "native") -> tuple[list, tuple, torch.Tensor | None]:
    """(groups, plan key, per-token slot index) of one forward's batch at ``tokens`` tokens a
    row: the same for every layer that sees that many tokens."""
    slots = tuple(s for s, _ in groups)
    whole = len(groups) == 1 and groups[0][1].numel() == rows
    token_slot = None
    if groups and not whole:
        row_slot = torch.full((rows,), -1, dtype=torch.long, device=device)
        for g, (_, idx) in enumerate(groups):
            row_slot[idx] = g
        token_slot = row_slot.repeat_interleave(tokens)
    elif groups:
        token_slot = torch.zeros(rows * tokens, dtype=torch.long, device=device)
    return groups, (impl, slots, whole), token_slot


def _plan(layer: "KernelLayer", slots: tuple[int, ...], whole: bool, impl: str = "native") -> tuple:
    """What `native_lora` (``impl`` "native") or `triton_lora` ("triton") runs on ``layer`` for a
    batch of ``slots`` (``whole``: one slot on every row): () for nothing, (_PAIR, (A^T, B^T)),
    or the op calls, each (op, its trailing arguments)."""
    live = [s for s in slots if layer.rank.get(s, 0)]
    if not live:
        return ()
    if whole and live[0] not in layer.own:
        a, b = layer.factors(live[0])
        return (_PAIR, (a.T, b.T))
    sgmv, wavelet_lowrank = _OPS[impl]()
    forms = {layer.own.get(s) for s in live}
    calls = []
    if None in forms:
        calls.append((sgmv, layer.tables(slots, None)))
        forms.discard(None)
    for form in sorted(forms):
        levels, wavelet = form
        calls.append((wavelet_lowrank,
                       (*layer.tables(slots, form), levels, *wavelet_filters(wavelet, layer.pool.device))))
    return tuple(calls)


native_lora.reads_own_factors = True  # the engine may keep adapters' own factors in its slots
triton_lora.reads_own_factors = True


def native_linear(x: torch.Tensor, layer: "KernelLayer") -> torch.Tensor | None:
    """The whole adapted layer, ``y = x W^T + b + ΔW_s x`` for each row's slot s, for a batch with
    slots holding own factors, on the CPU, in one native call; with the layers fed the same
    input after it (``layer.shared``: a query's key and value), whose outputs it leaves in the
    batch's cache for them (`SlotLayer.forward` takes them for the very tensor it was given,
    unchanged). ``wara::wavelet_linear`` (``_shared`` for several layers, from one DWT of x)
    writes ``b + ΔW_s x`` (the bias alone on other rows) into a new y and runs the base GEMM
    accumulating into it (``y += x W^T``); then any folded slots' sgmv adds. The bias copy that
    `torch.addmm` makes before its GEMM is replaced by the op's write, so an update costs no pass
    over y of its own, and the layer costs one Python -> C++ crossing. Returns y in x's shape
    with m features, or None where this does not apply (the caller runs the base and
    `native_lora`): no own-factor slot in the batch, layers whose own slots differ in form, a
    base of another dtype, another device, a forward hook on the base (it must see the base run;
    one on a follower's base: the layer runs alone).

    What the call needs besides x and the batch's token slots is fixed per (layers, batch slots)
    and kept in the layer's ``memo`` with the bases, parameters and pools it read; a plan whose
    layers hold others since (a replaced Parameter or buffer) is made again. This runs once per
    adapted layer, so it is kept to a few lookups, and x goes to the op in its own shape (MiniLM,
    B=1, seq 64, 2-core VM, the model timed with every base GEMM and fused op replaced by a lookup
    of its output, 81 interleaved rounds: the served path's Python over the base's, median of the
    paired differences, was 0.61 ms a forward when `SlotLayer.forward` checked hooks through
    nn.Module attributes and reshaped x and each y in Python; 0.07 ms in this form, of a ~21 ms
    forward)."""
    return _linear(x, layer, bool(layer.shared) and not x.is_inference())  # no version counter: no sharing


def _linear(x: torch.Tensor, layer: "KernelLayer", share: bool) -> torch.Tensor | None:
    routing = layer.routing
    rows, n = routing.rows, x.shape[-1]
    tokens = x.numel() // (rows * n) if n else 0
    cache = routing.cache
    batch = cache.get(("native", tokens))
    if batch is None or batch[0] is not routing.groups:
        batch = cache[("native", tokens)] = _route(routing.groups, rows, tokens, x.device)
    key = ("linear", share, batch[1])
    make = lambda: _linear_plan([layer, *layer.shared] if share else [layer], batch[1], x.device)  # noqa: E731
    plan = layer.memoized(key, make)
    if plan is not None and not _current(plan[5]):  # a base or pool was replaced: plans made afresh
        for each in [layer, *layer.shared]:
            each.memo.clear()
        plan = layer.memoized(key, make)
    if plan is None or x.dtype is not plan[0]:
        return None
    _, op, head, tail, rests, held, hooks = plan
    if any(hooks):  # a forward hook must see its base run
        return _linear(x, layer, False) if share and not any(hooks[:4]) else None
    if not x.is_contiguous():
        x = x.contiguous()
    token_slot = batch[2]
    ys = op(x, *head, token_slot, *tail)
    if not share:
        ys = [ys]
    for k, pool, calls in rests:
        xt, yt = x.view(-1, n), ys[k].view(-1, ys[k].shape[-1])
        for call, args in calls:
            call(xt, yt, pool, token_slot, *args)
    if share:
        version = x._version
        for follower, y in zip(layer.shared, ys[1:]):
            cache[follower] = (x, version, y)
    return ys[0]


def _current(held: tuple) -> bool:
    """Whether the (layer, base, weight, bias, pool) a plan holds are still the layers' own (a
    few dict reads: nn.Module's attribute lookup would cost more than the op's fixed cost)."""
    for layer, base, w, b, pool in held:
        if (layer._modules["base"] is not base or base._parameters["weight"] is not w
                or base._parameters.get("bias") is not b or layer._buffers["pool"] is not pool):
            return False
    return True


_SET_DTYPES = (torch.float32, torch.bfloat16)  # what the native ops take


def _linear_plan(layers: list["KernelLayer"], key: tuple, device: torch.device) -> tuple | None:
    """`native_linear`'s plan for a batch of plan ``key``: (the dtype x must have, the op, its
    arguments before and after the token slots, (index, pool, calls) of each layer with other
    calls in its `native_lora` plan, run after the op: sgmv adds; the (layer, base, weight,
    bias, pool) it read, for `_current`; the hook dicts that must all be empty for the op to
    stand in for the bases: the two global ones, the first layer's, then the others'), or None
    where no slot of the batch holds own factors in these layers, the op has no kernel here, or
    the bases' dtypes are not one it takes. A layer the batch's adapters skip still runs in the
    op (rank 0 everywhere: y = bias + x W^T)."""
    if device.type != "cpu":
        return None
    _, slots, whole = key
    forms = sorted({layer.own[s] for layer in layers for s in slots if layer.rank.get(s, 0) and s in layer.own})
    if not forms:
        return None
    levels, wavelet = forms[0]
    if any(layer.m % (1 << levels) or layer.n % (1 << levels) for layer in layers):  # a layer no adapter here
        return None  # could hold at these levels (skipped by all of them): computed one by one
    bases = [layer.base for layer in layers]
    dtype = bases[0].weight.dtype
    if dtype not in _SET_DTYPES or any(b.weight.dtype != dtype or layer.pool.dtype != dtype
                                       for b, layer in zip(bases, layers)):
        return None
    if len({layer.conv1d for layer in layers}) > 1:
        return None
    lo, hi = wavelet_filters(wavelet, layers[0].pool.device)
    op = torch.ops.wara.wavelet_lowrank.default
    offs, ranks, rests = [], [], []
    for layer in layers:
        plan = layer.memoized(key, lambda layer=layer: _plan(layer, slots, whole))
        if plan and plan[0] is _PAIR:
            return None
        off, rank = layer.tables(slots, forms[0])
        offs.append(off), ranks.append(rank)
        # The op runs this form: the rest are the other calls (a wavelet call is known by
        # its levels and filters, which `wavelet_filters` makes once per wavelet and device).
        rest = tuple(c for c in plan if not (c[0] is op and c[1][2] == levels and c[1][3] is lo))
        if rest:
            rests.append((len(offs) - 1, layer.pool, rest))
    transposed = layers[0].conv1d
    weights, biases, pools = [b.weight for b in bases], [b.bias for b in bases], [layer.pool for layer in layers]
    held = tuple(zip(layers, bases, weights, biases, pools))
    # Hooks are registered into these dicts in place, so the plan sees one added after it was made.
    hooks = (_nn_module._global_forward_hooks, _nn_module._global_forward_pre_hooks,
             *(d for b in bases for d in (b._forward_hooks, b._forward_pre_hooks)))
    if len(layers) == 1:
        return (dtype, torch.ops.wara.wavelet_linear.default, (weights[0], biases[0], pools[0]),
                (offs[0], ranks[0], levels, lo, hi, transposed), rests, held, hooks)
    return (dtype, torch.ops.wara.wavelet_linear_shared.default, (weights, biases, pools),
            (offs, ranks, levels, lo, hi, transposed), rests, held, hooks)


native_lora.linear = native_linear  # SlotLayer runs the whole layer through it where it applies

# The engine's adapter kernels by name (`runtime.selection.adapter_kernel` names one).
KERNELS: dict[str, LoraKernel] = {"native_lora": native_lora, "triton_lora": triton_lora, "grouped_lora": grouped_lora}

_filters: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def wavelet_filters(wavelet: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(dec_lo, dec_hi) of ``wavelet`` as the fused op takes them, made once per device."""
    got = _filters.get((wavelet, device))
    if got is None:
        from runtime.native import wavelet_filters as make

        got = _filters[(wavelet, device)] = tuple(t.to(device) for t in make(wavelet))
    return got
