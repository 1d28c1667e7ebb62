"""The PyTorch engine: one base model, a device tier of rank-aware slots in a page pool.

Every adaptable layer of the base becomes a `SlotLayer` holding one flat ``pool`` tensor. The
pool is cut into pages; a page is one rank of every adapted layer ((n + m) values per layer of
shape (m, n)), and an adapter of folded rank R takes R consecutive pages in every layer: its
``lora_A`` (R, n) and then its ``lora_B`` (m, R), both row-major and contiguous, so a kernel
reads them in place (no padding to a fixed max rank, no per-slot copies). The number of pages
comes from a byte budget (``device_budget_mb``), so a budget holds many rank-4 adapters or fewer
rank-16 ones, in the spirit of S-LoRA's unified paging. A *slot* is a resident adapter's id
(1, 2, ...; 0 is the base); its pages may move when the pool is compacted, between forwards.
The task head is tapped: the model returns its features and each row gets its own adapter's
head, so adapters with different label sets share one forward pass.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from wara_train.artifact import WaraAdapter, fingerprint
from wara_train.basespec import BaseSpec, resolve_base
from wara_train.errors import ConfigError, IncompatibleAdapterError
from wara_train.layer import is_conv1d, is_pointwise_conv, layer_shape, merged_weight, weight_matrix
from wara_train.model import adaptable_layers, find_targets, set_submodule

from .config import SLOT_FORMS, SlotForm
from .errors import Overloaded
from .kernels import LoraKernel, default_kernel, grouped_lora, own_form_wins

DEFAULT_DEVICE_BUDGET_MB = 256.0


class NoRoom(Overloaded):
    """The device pool has too few free pages for an adapter (the caller may evict and retry)."""


@dataclass
class Routing:
    """Which slot each row of the current batch uses; set by the engine before a forward."""

    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    rows: int = 0  # the batch size: every adapted layer's input must lead with it
    cache: dict = field(default_factory=dict)  # what a kernel computes once per forward (token slots)


class PagePool:
    """Which pages each slot holds: contiguous runs, first fit, compaction on demand."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.runs: dict[int, tuple[int, int]] = {}  # slot -> (first page, pages)

    @property
    def used(self) -> int:
        return sum(n for _, n in self.runs.values())

    @property
    def free(self) -> int:
        return self.pages - self.used

    def find(self, count: int) -> int | None:
        """The first page of the first free run of ``count`` pages, or None."""
        at = 0
        for start, n in sorted(self.runs.values()):
            if start - at >= count:
                return at
            at = start + n
        return at if self.pages - at >= count else None

    def compaction(self) -> list[tuple[int, int, int]]:
        """Moves (slot, from page, to page), in order, that pack every run to the front."""
        moves, at = [], 0
        for slot, (start, n) in sorted(self.runs.items(), key=lambda kv: kv[1][0]):
            if start != at:
                moves.append((slot, start, at))
            at += n
        return moves


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
            raise ConfigError(f"internal: slot {slot} holds own WaRA factors, which this kernel cannot read")
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
            raise ConfigError(f"an adapted layer sees inputs of shape {list(x.shape)} whose first axis is not the "
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


class LazyFold(Mapping):
    """The folded factors (layer -> (A (R, n), B (m, R))) of an adapter whose slot holds its own
    factors, folded from those on first use (a merged copy, or a bound that needs the exact
    delta), not at load: its slot never reads them. They are folded from the values the slot
    holds (in the model's dtype, the scale in B), so a merged copy matches the served path."""

    def __init__(self, own: dict[str, torch.Tensor], *, rank: int, spec, shapes: dict[str, tuple[int, int]]) -> None:
        self._own, self._rank, self._spec, self._shapes = own, rank, spec, shapes
        self._folded: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def folded(self) -> bool:
        return self._folded is not None

    def _fold(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._folded is None:
            from runtime.native import own_layout, unpack
            from wara_train.delta import fold_many

            layers = {}
            for t, packed in self._own.items():
                m, n = self._shapes[t]
                views = unpack(packed.float(), 0, self._rank, own_layout(m, n, self._spec.levels))
                layers[t] = (views, (m, n))
            self._folded = fold_many(layers, spec=self._spec, scale=1.0)  # the scale is in the packed B
        return self._folded

    def __getitem__(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fold()[key]

    def __iter__(self):
        return iter(self._own)

    def __len__(self) -> int:
        return len(self._own)


@dataclass
class Folded:
    """An adapter prepared for the device tier, float32, CPU: its folded factors (what a merged
    copy is built from, and the bound check's exact fallback), its head, and, where the engine
    serves it unfolded, its own factors packed as a slot holds them (then ``factors`` is a
    `LazyFold`, folded only if something asks)."""

    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    head: tuple[torch.Tensor, torch.Tensor | None] | None
    labels: list[str] | None
    own: dict[str, torch.Tensor] | None = None  # layer -> `runtime.native.pack_own` of its blocks
    own_rank: int = 0  # the WaRA rank of each own block
    own_form: tuple[int, str] | None = None  # (levels, wavelet) of the own factors
    own_bounds: dict[str, float] | None = None  # layer -> bound on max |ΔW| (`own_delta_bounds`)
    pages: int = -1  # pages it takes in the device pool (-1: its folded rank)

    def __post_init__(self) -> None:
        if self.pages < 0:
            self.pages = self.rank

    @property
    def rank(self) -> int:
        """Its largest folded rank ((3J + 1) r for own factors, without folding them)."""
        if self.own is not None:
            return (3 * self.own_form[0] + 1) * self.own_rank if self.own else 0
        return max((a.shape[0] for a, _ in self.factors.values()), default=0)

    @property
    def form(self) -> str:
        """What its slot holds: "own" factors or the "folded" LoRA."""
        return "folded" if self.own is None else "own"

    @property
    def nbytes(self) -> int:
        """Bytes its slot holds (float32), plus its head."""
        total = (sum(t.numel() for t in self.own.values()) if self.own is not None
                 else sum(a.numel() + b.numel() for a, b in self.factors.values()))
        if self.head is not None:
            total += self.head[0].numel() + (self.head[1].numel() if self.head[1] is not None else 0)
        return 4 * total


class TorchEngine:
    """A base model with a device pool of adapter slots; runs heterogeneous batches in one forward."""

    platform = "wara_pytorch"

    def __init__(self, base: BaseSpec | str, *, device_budget_mb: float = DEFAULT_DEVICE_BUDGET_MB,
                 max_rank: int = 128, device: str | None = None, kernel: LoraKernel | None = None,
                 slot_form: SlotForm = "auto") -> None:
        if slot_form not in SLOT_FORMS:
            raise ConfigError(f"unknown slot_form {slot_form!r}: valid forms are {', '.join(SLOT_FORMS)}")
        self.spec = spec = base if isinstance(base, BaseSpec) else resolve_base(base)
        self.base_model = spec.name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = spec.build(None)
        # Every layer an adapter of this base may target: the family's defaults, else every
        # adaptable layer (the fallback's divisibility by 2^J is the adapter's own business).
        self.targets = (find_targets(model, spec.default_targets) if spec.default_targets
                        else adaptable_layers(model, exclude=(spec.head,)))
        # One page: one rank of every adapted layer, at the base's weight precision.
        shapes = [layer_shape(model.get_submodule(t)) for t in self.targets]
        itemsize = next(model.parameters()).element_size()
        self.page_bytes = itemsize * sum(m + n for m, n in shapes)
        self.pages = int(device_budget_mb * (1 << 20)) // self.page_bytes
        if self.pages < 1:
            raise ConfigError(f"device_budget_mb {device_budget_mb:g} is smaller than one rank of base {spec.name!r} "
                              f"({self.page_bytes} bytes over its {len(shapes)} adapted layers)")
        self.pool = PagePool(self.pages)
        self.routing = Routing()
        if kernel is None:
            kernel, self.kernel_name = default_kernel(self.device)
        else:
            self.kernel_name = getattr(kernel, "__name__", type(kernel).__name__)
        # Own factors need a kernel that computes the wavelet update; with any other the
        # slots hold folded factors whatever slot_form says (kernel_name says which serves).
        self.slot_form: SlotForm = slot_form if getattr(kernel, "reads_own_factors", False) else "folded"
        self._fingerprints: dict[tuple[str, ...], str] = {}  # target set -> hash of its base weights
        for name in self.targets:
            set_submodule(model, name, SlotLayer(model.get_submodule(name), pages=self.pages,
                                                 routing=self.routing, kernel=kernel))
        try:
            self.base_head: nn.Module | None = model.get_submodule(spec.head)
        except AttributeError:  # a feature-extraction base: no head of its own
            self.base_head = None
        if self.base_head is None and spec.output == "logits":
            raise ConfigError(f"base {spec.name!r} answers with logits but has no head {spec.head!r}")
        set_submodule(model, spec.head, HeadTap())
        self.model = model.to(self.device).eval()
        if self.base_head is not None:
            self.base_head = self.base_head.to(self.device).eval()
        self.layers: dict[str, SlotLayer] = {n: model.get_submodule(n) for n in self.targets}
        self._share_inputs()
        self.max_rank = max_rank
        self.feature_dim = self._feature_dim()
        self.heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> its task head (weight, bias)
        self.lock = threading.Lock()  # one forward or slot write at a time
        self._hash_lock = threading.Lock()
        self.fingerprint(tuple(self.targets))  # the usual target set, hashed once at start-up

    def _share_inputs(self) -> None:
        """Find the adapted layers a forward feeds one input tensor (the query, key and value of
        an attention; the gate and up projections of a gated MLP), from one sample forward, and
        let the first of each compute the others' outputs with its own (`SlotLayer.shared`):
        one transform of the input and one shrink per band serve them all. A follower takes the
        output only if it gets the very tensor the leader got, unchanged, in the same forward,
        so a model whose calls differ from the sample's is still served exactly."""
        fed: list[tuple[torch.Tensor, list[SlotLayer]]] = []

        def note(layer: SlotLayer, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):  # called by keyword: not grouped
                return
            for seen, members in fed:
                if seen is x:
                    if layer not in members:
                        members.append(layer)
                    return
            fed.append((x, [layer]))

        fusable = [layer for layer in self.layers.values() if layer.linear is not None]
        if len(fusable) < 2 or self.device.type != "cpu":  # `native_linear` runs on the CPU
            return
        hooks = [layer.register_forward_pre_hook(note) for layer in fusable]
        try:
            with torch.no_grad():
                self.model(*[t.to(self.device) for t in self.spec.sample(1, 4)])
        finally:
            for h in hooks:
                h.remove()
        for _, members in fed:
            free = [m for m in members if m.leader is None and not m.shared]
            if len(free) > 1 and len({m.n for m in free}) == 1:
                free[0].shared = free[1:]
                for m in free[1:]:
                    m.leader = free[0]

    def _feature_dim(self) -> int:
        """What the head sees: the base head's input, or (no head) the model's output on a sample."""
        if isinstance(self.base_head, nn.Linear):
            return self.base_head.in_features
        with torch.no_grad():
            return int(self.model(*[t.to(self.device) for t in self.spec.sample(1, 4)]).shape[-1])

    def fingerprint(self, targets: tuple[str, ...]) -> str:
        """The hash of this base's weights at ``targets`` (as adapters record it), cached: the
        base never changes."""
        targets = tuple(sorted(targets))
        with self._hash_lock:
            if targets not in self._fingerprints:
                if len(self._fingerprints) >= 64:  # adapters with unusual target subsets: bounded
                    self._fingerprints.pop(next(iter(self._fingerprints)))
                self._fingerprints[targets] = fingerprint({t: weight_matrix(self.layers[t].base).detach()
                                                           for t in targets})
            return self._fingerprints[targets]

    def mismatch(self, adapter: WaraAdapter) -> str | None:
        """Why ``adapter`` does not fit this base (None: it does): targets, shapes, fingerprint."""
        unknown = [t for t in adapter.config.target_modules if t not in self.layers]
        if unknown:
            return f"it targets layers this base does not have or adapt ({', '.join(unknown[:3])})"
        for t in adapter.config.target_modules:
            if layer_shape(self.layers[t].base) != adapter.shape(t):
                return f"{t} is {layer_shape(self.layers[t].base)} here, {adapter.shape(t)} in the adapter"
        got = self.fingerprint(tuple(adapter.config.target_modules))
        if got != adapter.base_fingerprint:
            return f"its weights hash to {got[:19]}..., the adapter's base to {adapter.base_fingerprint[:19]}..."
        return None

    # --- adapters -------------------------------------------------------------------------
    def prepare(self, adapter: WaraAdapter) -> Folded:
        """Validate ``adapter`` against this base and prepare it for a slot (load time, not per
        request): folded, or its own factors packed (folded later only if something asks)."""
        why = self.mismatch(adapter)
        if why is not None:
            raise IncompatibleAdapterError(f"the adapter (trained on base {adapter.base_model!r}) does not fit "
                                           f"base {self.base_model!r}: {why}")
        head = self._head(adapter)
        if self._serves_own(adapter):
            folded = self._pack_own(adapter, head)
        else:
            folded = Folded(adapter.folded_all(), head, adapter.labels)
        if folded.rank > self.max_rank:
            raise IncompatibleAdapterError(
                f"folded rank {folded.rank} exceeds the server's max_rank {self.max_rank}; raise max_rank")
        return folded

    def _head(self, adapter: WaraAdapter) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The adapter's task head (float32), checked against this base and its labels."""
        head_name = self.spec.head
        extra = sorted(set(adapter.saved_modules) - {head_name})
        if extra:
            raise IncompatibleAdapterError(f"this server applies only the task head {head_name!r} from "
                                           f"modules_to_save; the adapter also saves {extra}")
        head = None
        params = adapter.saved_modules.get(head_name)
        if params is not None:
            w, b = params.get("weight"), params.get("bias")
            if w is None or w.dim() != 2 or w.shape[1] != self.feature_dim or set(params) - {"weight", "bias"}:
                raise IncompatibleAdapterError(f"task head {head_name} must be a Linear on {self.feature_dim} features")
            if b is not None and tuple(b.shape) != (w.shape[0],):
                raise IncompatibleAdapterError(f"task head bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
            head = (w.float(), b.float() if b is not None else None)
        if adapter.labels is not None:
            if head is None:
                raise IncompatibleAdapterError("the adapter names labels but saves no task head")
            if len(adapter.labels) != head[0].shape[0]:
                raise IncompatibleAdapterError(f"{len(adapter.labels)} labels for a head of {head[0].shape[0]} outputs")
        return head

    def _serves_own(self, adapter: WaraAdapter) -> bool:
        """Whether ``adapter``'s slot holds its own factors: under slot_form "own" whenever the
        fused op computes its transform (periodization), under "auto" where it also measured
        faster (`runtime.kernels.own_form_wins`)."""
        spec = adapter.config.spec
        if self.slot_form == "folded" or spec.effective_mode != "periodization":
            return False
        shapes = [adapter.shape(t) for t in adapter.config.target_modules]
        return self.slot_form == "own" or own_form_wins(wavelet=spec.wavelet, levels=spec.levels,
                                                        rank=adapter.config.rank, shapes=shapes)

    def _pack_own(self, adapter: WaraAdapter, head) -> Folded:
        """The adapter with its own factors packed as its slots hold them (one flat tensor, a few
        ops for all layers), their bounds on max |ΔW|, and a fold made only on demand."""
        from runtime.native import own_delta_bounds, own_numel, pack_own_many

        spec, dtype, rank = adapter.config.spec, next(self.model.parameters()).dtype, adapter.config.rank
        targets = adapter.config.target_modules
        pack = pack_own_many({t: adapter.factors[t] for t in targets}, spec=spec, scale=adapter.config.scale,
                             dtype=dtype)
        shapes = {t: adapter.shape(t) for t in targets}
        pages = max((math.ceil(own_numel(*shapes[t], rank, spec.levels) / sum(shapes[t])) for t in targets), default=0)
        return Folded(LazyFold(pack.views, rank=rank, spec=spec, shapes=shapes), head, adapter.labels,
                      own=pack.views, own_rank=rank, own_form=(spec.levels, spec.wavelet),
                      own_bounds=own_delta_bounds(pack), pages=pages)

    def write_slot(self, slot: int, folded: Folded) -> None:
        """Device tier: put an adapter into slot ``slot`` (>= 1; one already there is replaced),
        on as many pages as its rank, compacting the pool when its free pages are split.
        `NoRoom` when the pool has fewer free pages than the adapter's rank."""
        if slot < 1:
            raise ConfigError(f"slot {slot}: slot 0 is the base")
        with self.lock:
            self._release(slot)
            rank = folded.pages
            page = self.pool.find(rank)
            if page is None and self.pool.free >= rank:
                for s, _, to in self.pool.compaction():
                    for layer in self.layers.values():
                        layer.move(s, to)
                    self.pool.runs[s] = (to, self.pool.runs[s][1])
                page = self.pool.find(rank)
            if page is None:
                raise NoRoom(f"the device pool of {self.base_model!r} has {self.pool.free} free pages; the adapter "
                             f"needs {rank} (device_budget_mb holds {self.pages} pages in all)")
            self.pool.runs[slot] = (page, rank)
            for name, layer in self.layers.items():
                if folded.own is not None and name in folded.own:
                    levels, wavelet = folded.own_form
                    layer.place_own(slot, page, folded.own[name].to(self.device), rank=folded.own_rank,
                                    levels=levels, wavelet=wavelet)
                    continue
                a, b = folded.factors.get(name, (None, None)) if folded.own is None else (None, None)
                layer.place(slot, page, None if a is None else a.to(self.device),
                            None if b is None else b.to(self.device))
            if folded.head is not None:
                w, b = folded.head
                self.heads[slot] = (w.to(self.device), b.to(self.device) if b is not None else torch.zeros(
                    w.shape[0], device=self.device, dtype=w.dtype))
            self._slot_written(slot)

    def free_slot(self, slot: int) -> None:
        """Give a slot's pages back."""
        with self.lock:
            self._release(slot)
            self._slot_written(slot)

    def _release(self, slot: int) -> None:
        self.pool.runs.pop(slot, None)
        self.heads.pop(slot, None)
        for layer in self.layers.values():
            layer.drop(slot)

    def capacity(self, rank: int | None = None) -> int:
        """How many adapters of folded ``rank`` (default: the ranks resident now, else
        `max_rank`) the pool holds."""
        runs = list(self.pool.runs.values())
        rank = rank or (max(1, round(sum(n for _, n in runs) / len(runs))) if runs else self.max_rank)
        return self.pages // max(1, rank)

    def _slot_written(self, slot: int) -> None:
        """Called under the lock after slot ``slot`` changed (a backend's own copies follow)."""

    # --- merged fast path -------------------------------------------------------------------
    def build_merged(self, folded: Folded) -> nn.Module:
        """A copy of the base whose adapted weights are ``W0 + lora_B lora_A`` (float32 math,
        one cast), for a hot adapter's batches. The served base is never modified."""
        import copy

        merged = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, layer in self.layers.items():
                plain = copy.deepcopy(layer.base)
                if name in folded.factors:
                    a, b = folded.factors[name]
                    plain.weight.copy_(merged_weight(plain, b.to(self.device) @ a.to(self.device)))
                set_submodule(merged, name, plain)
        return merged.eval()

    @torch.no_grad()
    def forward_merged(self, merged: nn.Module, head: tuple[torch.Tensor, torch.Tensor | None] | None,
                       inputs: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
        """All rows on one merged adapter: one plain forward, then its head (None: the base's)."""
        with self.lock:
            feats = merged(*[t.to(self.device) for t in inputs])
            if head is None:
                out = self._base_output(feats)
                return [{k: v[i] for k, v in out.items()} for i in range(feats.shape[0])]
            w, b = head
            logits = feats @ w.to(self.device).T + (b.to(self.device) if b is not None else 0)
            return [{"logits": row.float().cpu()} for row in logits]

    # --- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, inputs: Sequence[torch.Tensor], slots: Sequence[int]) -> list[dict[str, Any]]:
        """Run one batch; row b uses slot ``slots[b]`` (0 = base). Returns per-row outputs:
        ``logits`` for adapter rows with a head, the base's own output otherwise."""
        slot_t = torch.as_tensor(list(slots), dtype=torch.long)
        groups = [(int(s), (slot_t == s).nonzero().flatten().to(self.device)) for s in sorted(set(slots)) if s != 0]
        with self.lock:
            missing = [s for s, _ in groups if s not in self.pool.runs]
            if missing:
                raise ConfigError(f"internal: slots {missing} of {self.base_model!r} hold no adapter")
            feats = self._features(inputs, slot_t, groups)
            out: list[dict[str, Any]] = [dict() for _ in slots]
            base_rows = [i for i, s in enumerate(slots) if s not in self.heads]
            if base_rows:
                base_out = self._base_output(feats[base_rows])
                for j, i in enumerate(base_rows):
                    out[i] = {k: v[j] for k, v in base_out.items()}
            for s, rows in groups:
                head = self.heads.get(s)
                if head is None:
                    continue
                logits = (feats[rows] @ head[0].T + head[1]).float().cpu()
                for j, i in enumerate(rows.tolist()):
                    out[i] = {"logits": logits[j]}
        return out

    def _features(self, inputs: Sequence[torch.Tensor], slot_t: torch.Tensor,
                  groups: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """The model's features (its head input) for a batch routed by ``groups``."""
        self.routing.groups, self.routing.rows, self.routing.cache = groups, int(slot_t.shape[0]), {}
        try:
            return self.model(*[t.to(self.device) for t in inputs])
        finally:
            self.routing.groups = []

    def _base_output(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base's own answer: normalised embeddings, or its head's logits."""
        if self.spec.output == "embeddings":
            return {"embeddings": F.normalize(feats, dim=-1).float().cpu()}
        return {"logits": self.base_head(feats).float().cpu()}
