"""Prepare: the one pure step between an artifact and a device slot.

``prepare(engine, name, adapter) -> Folded`` checks the adapter against the served base (the
one compatibility rule, `wara_train.artifact.incompatibility`), checks its task head, folds it
(or packs its own factors where the engine serves them unfolded), checks its rank against
``max_rank``, and bounds every layer's delta (`check_folded`). It reads the engine and changes
nothing: the host tier calls it at load and again when an evicted adapter comes back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from wara_train.artifact import WaraAdapter, incompatibility
from wara_train.errors import AdapterError, IncompatibleAdapterError
from wara_train.layer import layer_shape
from wara_train.wavelets import blocks

from ..selection import own_form_wins

# The largest |value| a folded delta (lora_B @ lora_A) or task head may hold: trained deltas are
# far below 1, and values near this already push float32 activations toward overflow (LayerNorm
# squares them), which would serve NaN silently.
MAX_FOLDED_ABS = 1e4


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
    """An adapter prepared for the device tier, on the CPU, its factors in the engine's dtype (cast
    once, here; the head stays float32): its folded factors (what a merged copy is built from,
    and the bound check's exact fallback), its head, and, where the engine serves it unfolded,
    its own factors packed as a slot holds them (then ``factors`` is a `LazyFold`, folded only
    if something asks)."""

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
        """Its largest folded rank (r x the blocks of J levels for own factors, without folding)."""
        if self.own is not None:
            return len(blocks(self.own_form[0])) * self.own_rank if self.own else 0
        return max((a.shape[0] for a, _ in self.factors.values()), default=0)

    @property
    def form(self) -> str:
        """What its slot holds: "own" factors or the "folded" LoRA."""
        return "folded" if self.own is None else "own"

    @property
    def nbytes(self) -> int:
        """Bytes its slot holds, plus its head."""
        total = (sum(t.nbytes for t in self.own.values()) if self.own is not None
                 else sum(a.nbytes + b.nbytes for a, b in self.factors.values()))
        if self.head is not None:
            total += sum(t.nbytes for t in self.head if t is not None)
        return total


def own_bytes(adapter: WaraAdapter) -> int:
    """Bytes of an adapter's own tensors (factors and saved modules): what the host tier holds."""
    total = sum(t.numel() * t.element_size() for blocks in adapter.factors.values() for pair in blocks.values() for t in pair)
    return total + sum(t.numel() * t.element_size() for params in adapter.saved_modules.values() for t in params.values())


def mismatch(engine, adapter: WaraAdapter) -> str | None:
    """Why ``adapter`` does not fit ``engine``'s base (None: it does)."""
    shapes = {t: layer_shape(layer.base) for t, layer in engine.layers.items()}
    return incompatibility(adapter, shapes, engine.fingerprint)


def bind(engines: Mapping[str, object], name: str, adapter: WaraAdapter):
    """The served base this adapter was trained on, found by fingerprint (the base may be
    served under another name than the one the adapter records). FAILED_PRECONDITION,
    naming the adapter's base and every served one, when none fits."""
    order = sorted(engines.values(), key=lambda e: e.base_model != adapter.base_model)
    reasons = []
    for engine in order:
        why = mismatch(engine, adapter)
        if why is None:
            return engine
        reasons.append(f"{engine.base_model}: {why}")
    raise IncompatibleAdapterError(
        f"adapter {name!r} was trained on base {adapter.base_model!r} (fingerprint "
        f"{adapter.base_fingerprint[:19]}...), and no served base matches it: " + "; ".join(reasons))


def prepare(engine, name: str, adapter: WaraAdapter) -> Folded:
    """``adapter`` checked against ``engine``'s base and made ready for a slot: folded, or its
    own factors packed (folded later only if something asks), its delta bounded. Errors name
    the adapter."""
    try:
        why = mismatch(engine, adapter)
        if why is not None:
            raise IncompatibleAdapterError(f"the adapter (trained on base {adapter.base_model!r}) does not fit "
                                           f"base {engine.base_model!r}: {why}")
        head = _head(engine, adapter)
        folded = _pack_own(engine, adapter, head) if _serves_own(engine, adapter) else Folded(
            _cast(adapter.folded_all(), engine.dtype), head, adapter.labels)
        if folded.rank > engine.max_rank:
            raise IncompatibleAdapterError(
                f"folded rank {folded.rank} exceeds the server's max_rank {engine.max_rank}; raise max_rank")
    except (AdapterError, IncompatibleAdapterError) as e:
        if str(e).startswith(f"adapter {name!r}"):
            raise
        raise type(e)(f"adapter {name!r}: {e}") from None
    check_folded(name, folded)
    return folded


def _cast(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> dict:
    """Folded factors (float32, folded from the adapter's own dtype) as the slots hold them."""
    return {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in factors.items()}


def _head(engine, adapter: WaraAdapter) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The adapter's task head (float32), checked against the base and its labels."""
    head_name = engine.spec.head
    extra = sorted(set(adapter.saved_modules) - {head_name})
    if extra:
        raise IncompatibleAdapterError(f"this server applies only the task head {head_name!r} from "
                                       f"modules_to_save; the adapter also saves {extra}")
    head = None
    params = adapter.saved_modules.get(head_name)
    if params is not None:
        w, b = params.get("weight"), params.get("bias")
        if w is None or w.dim() != 2 or w.shape[1] != engine.feature_dim or set(params) - {"weight", "bias"}:
            raise IncompatibleAdapterError(f"task head {head_name} must be a Linear on {engine.feature_dim} features")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise IncompatibleAdapterError(f"task head bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
        head = (w.float(), b.float() if b is not None else None)
    if adapter.labels is not None:
        if head is None:
            raise IncompatibleAdapterError("the adapter names labels but saves no task head")
        if len(adapter.labels) != head[0].shape[0]:
            raise IncompatibleAdapterError(f"{len(adapter.labels)} labels for a head of {head[0].shape[0]} outputs")
    return head


def _serves_own(engine, adapter: WaraAdapter) -> bool:
    """Whether ``adapter``'s slot holds its own factors: under slot_form "own" whenever the
    fused op computes its transform (periodization), under "auto" where it also measured
    faster (`runtime.selection.own_form_wins`)."""
    spec = adapter.config.spec
    if engine.slot_form == "folded" or spec.effective_mode != "periodization":
        return False
    shapes = [adapter.shape(t) for t in adapter.config.target_modules]
    return engine.slot_form == "own" or own_form_wins(wavelet=spec.wavelet, levels=spec.levels,
                                                      rank=adapter.config.rank, shapes=shapes)


def _pack_own(engine, adapter: WaraAdapter, head) -> Folded:
    """The adapter with its own factors packed as its slots hold them (one flat tensor, a few
    ops for all layers), their bounds on max |ΔW|, and a fold made only on demand."""
    from runtime.native import own_delta_bounds, own_numel, pack_own_many

    spec, dtype, rank = adapter.config.spec, engine.dtype, adapter.config.rank
    targets = adapter.config.target_modules
    pack = pack_own_many({t: adapter.factors[t] for t in targets}, spec=spec, scale=adapter.config.scale, dtype=dtype)
    shapes = {t: adapter.shape(t) for t in targets}
    pages = max((math.ceil(own_numel(*shapes[t], rank, spec.levels) / sum(shapes[t])) for t in targets), default=0)
    return Folded(LazyFold(pack.views, rank=rank, spec=spec, shapes=shapes), head, adapter.labels,
                  own=pack.views, own_rank=rank, own_form=(spec.levels, spec.wavelet),
                  own_bounds=own_delta_bounds(pack), pages=pages)


def folded_bounds(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Per layer, sum_k max_i|B_ik| max_j|A_kj| >= max|B A| (nan or inf where a value is not
    finite), in a few ops per distinct layer shape (MiniLM: 3), not per layer."""
    groups: dict[tuple, list[str]] = {}
    for mod, (a, b) in factors.items():
        groups.setdefault((tuple(a.shape), tuple(b.shape)), []).append(mod)
    out: dict[str, float] = {}
    for (shape_a, shape_b), mods in groups.items():
        if 0 in shape_a or 0 in shape_b:
            out.update(dict.fromkeys(mods, 0.0))
            continue
        a = torch.stack([factors[m][0] for m in mods]).abs().amax(dim=2)  # (layers, R)
        b = torch.stack([factors[m][1] for m in mods]).abs().amax(dim=1)  # (layers, R)
        out.update(zip(mods, (b.float() * a.float()).sum(dim=1).tolist()))
    return out


def check_folded(name: str, folded: Folded) -> None:
    """Refuse a prepared adapter whose factors, delta or head are non-finite or beyond
    `MAX_FOLDED_ABS` (values or alpha that overflow in the fold). Each layer's delta is bounded
    from its factors first (own factors: `runtime.native.own_delta_bounds`; folded:
    `folded_bounds`); the exact delta, from the fold, is computed only where that bound is not
    finite or not small enough (for a trained adapter it is both)."""
    with torch.no_grad():
        own = folded.own_bounds is not None
        bounds = folded.own_bounds if own else folded_bounds(folded.factors)
        for mod in folded.factors:
            bound = bounds[mod]
            if own and not math.isfinite(bound):
                raise AdapterError(f"adapter {name!r}: the factors of {mod} are not finite "
                                   "(alpha or factor values too large)")
            if bound <= MAX_FOLDED_ABS:  # False for nan
                continue
            a, b = folded.factors[mod]
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterError(f"adapter {name!r}: the folded factors of {mod} are not finite "
                                   "(alpha or factor values too large)")
            delta = b.float() @ a.float()
            if not torch.isfinite(delta).all():
                raise AdapterError(f"adapter {name!r}: the delta of {mod} is not finite (alpha or factor values too large)")
            peak = float(delta.abs().max()) if delta.numel() else 0.0
            if peak > MAX_FOLDED_ABS:
                raise AdapterError(f"adapter {name!r}: the delta of {mod} reaches {peak:.3g}, over the "
                                   f"{MAX_FOLDED_ABS:g} a served layer can hold (alpha or factor values too large)")
        if folded.head is not None:
            for t in folded.head:
                if t is None:
                    continue
                if not torch.isfinite(t).all():
                    raise AdapterError(f"adapter {name!r}: the task head is not finite")
                if t.numel() and float(t.abs().max()) > MAX_FOLDED_ABS:
                    raise AdapterError(f"adapter {name!r}: the task head has values over {MAX_FOLDED_ABS:g}")
