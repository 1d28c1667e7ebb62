"""The PyTorch engine: one base model whose adapted layers are slot layers; runs a batch whose
rows use different adapters (or the base) in one forward.

Every adaptable layer of the base becomes a `runtime.slots.SlotLayer` with a page pool sized by
a byte budget (``device_budget_mb``): a page is one rank of every adapted layer, so a budget
holds many rank-4 adapters or fewer rank-16 ones, in the spirit of S-LoRA's unified paging.
Which adapter holds which pages is the device tier's business (`runtime.adapters.device`); the
engine copies factors where it is told. The task head is tapped: the model returns its
features and each row gets its own adapter's head, so adapters with different label sets share
one forward pass. The base computes in its dtype (float32 or bfloat16,
`runtime.selection.engine_dtype`), its slots hold factors in that dtype; heads run in float32
on the features cast up, so every output is float32.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from wara_train.artifact import fingerprint
from wara_train.basespec import BaseSpec, resolve_base
from wara_train.errors import ConfigError
from wara_train.layer import layer_shape, merged_weight, weight_matrix
from wara_train.model import adaptable_layers, find_targets, set_submodule

from . import native
from .config import SLOT_FORMS, SlotForm
from .errors import InternalError
from .kernels import KERNELS, LoraKernel, Routing
from .selection import adapter_kernel, resolve_dtype
from .slots import HeadTap, SlotLayer

DEFAULT_DEVICE_BUDGET_MB = 256.0


class TorchEngine:
    """A base model with a device pool of adapter slots; runs heterogeneous batches in one forward."""

    platform = "wara_pytorch"

    def __init__(self, base: BaseSpec | str, *, device_budget_mb: float = DEFAULT_DEVICE_BUDGET_MB,
                 max_rank: int = 128, device: str | None = None, kernel: LoraKernel | None = None,
                 slot_form: SlotForm = "auto", dtype: str | torch.dtype = "float32") -> None:
        """``dtype``: what the base computes in, a torch dtype or a name
        (`runtime.selection.engine_dtype`: float32, bfloat16, auto)."""
        if slot_form not in SLOT_FORMS:
            raise ConfigError(f"unknown slot_form {slot_form!r}: valid forms are {', '.join(SLOT_FORMS)}")
        self.spec = spec = base if isinstance(base, BaseSpec) else resolve_base(base)
        self.base_model = spec.name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, backend="torch",
                                                                                  device=self.device)
        model = spec.build(None)
        # Every layer an adapter of this base may target: the family's defaults, else every
        # adaptable layer (the fallback's divisibility by 2^J is the adapter's own business).
        self.targets = (find_targets(model, spec.default_targets) if spec.default_targets
                        else adaptable_layers(model, exclude=(spec.head,)))
        try:
            self.base_head: nn.Module | None = model.get_submodule(spec.head)
        except AttributeError:  # a feature-extraction base: no head of its own
            self.base_head = None
        if self.base_head is None and spec.output == "logits":
            raise ConfigError(f"base {spec.name!r} answers with logits but has no head {spec.head!r}")
        set_submodule(model, spec.head, HeadTap())  # heads run apart, in float32, on the features cast up
        self._fingerprints: dict[tuple[str, ...], str] = {}  # target set -> hash of its base weights
        self._hash_lock = threading.Lock()
        self._cast = next(model.parameters()).dtype != self._dtype
        if self._cast:
            # Adapters record the hash of the weights as built: the usual target set is hashed
            # before the cast (any other set from a fresh build, `fingerprint`).
            self.fingerprint(tuple(self.targets), model)
            model = model.to(self._dtype)
        # One page: one rank of every adapted layer, at the base's weight precision.
        shapes = [layer_shape(model.get_submodule(t)) for t in self.targets]
        itemsize = next(model.parameters()).element_size()
        self.page_bytes = itemsize * sum(m + n for m, n in shapes)
        self.pages = int(device_budget_mb * (1 << 20)) // self.page_bytes
        if self.pages < 1:
            raise ConfigError(f"device_budget_mb {device_budget_mb:g} is smaller than one rank of base {spec.name!r} "
                              f"({self.page_bytes} bytes over its {len(shapes)} adapted layers)")
        self.slot_pages: dict[int, int] = {}  # slot -> pages it holds (written by the device tier)
        self.routing = Routing()
        if kernel is None:
            name, self.kernel_name = adapter_kernel(self.device, native.load(build=False), native.triton_available())
            kernel = KERNELS[name]
        else:
            self.kernel_name = getattr(kernel, "__name__", type(kernel).__name__)
        # Own factors need a kernel that computes the wavelet update; with any other the
        # slots hold folded factors whatever slot_form says (kernel_name says which serves).
        self.slot_form: SlotForm = slot_form if getattr(kernel, "reads_own_factors", False) else "folded"
        for name in self.targets:
            set_submodule(model, name, SlotLayer(model.get_submodule(name), pages=self.pages,
                                                 routing=self.routing, kernel=kernel))
        self.model = model.to(self.device).eval()
        if self.base_head is not None:
            self.base_head = self.base_head.to(self.device, torch.float32).eval()
        self.layers: dict[str, SlotLayer] = {n: model.get_submodule(n) for n in self.targets}
        self._share_inputs()
        self.max_rank = max_rank
        self.feature_dim = self._feature_dim()
        self.heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> its task head (weight, bias)
        self.lock = threading.Lock()  # one forward or slot write at a time
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
                self.model(*self._inputs(self.spec.sample(1, 4)))
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
            return int(self.model(*self._inputs(self.spec.sample(1, 4))).shape[-1])

    def fingerprint(self, targets: tuple[str, ...], model: nn.Module | None = None) -> str:
        """The hash of this base's weights at ``targets`` as built (as adapters record it),
        cached: the base never changes. A base served in another dtype than it was built in is
        built afresh for a target set not hashed at start (``model``: the model as built)."""
        targets = tuple(sorted(targets))
        with self._hash_lock:
            if targets not in self._fingerprints:
                if len(self._fingerprints) >= 64:  # adapters with unusual target subsets: bounded
                    self._fingerprints.pop(next(iter(self._fingerprints)))
                if model is None and self._cast:
                    model = self.spec.build(None)
                weights = ({t: weight_matrix(model.get_submodule(t)).detach() for t in targets} if model is not None
                           else {t: weight_matrix(self.layers[t].base).detach() for t in targets})
                self._fingerprints[targets] = fingerprint(weights)
            return self._fingerprints[targets]

    @property
    def dtype(self) -> torch.dtype:
        """What the base computes in (its weights, and what a slot holds)."""
        return self._dtype

    def _inputs(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """A batch's tensors on the engine's device, floating ones (pixels) in its dtype."""
        return [t.to(self.device, self._dtype) if t.is_floating_point() else t.to(self.device) for t in inputs]

    # --- slots (written where the device tier says: `runtime.adapters.device`) ------------
    def write_slot(self, slot: int, page: int, folded) -> None:
        """Copy a prepared adapter (`runtime.adapters.prepare.Folded`) into slot ``slot`` of every
        layer, from page ``page``, and its head. Called under ``lock``."""
        for name, layer in self.layers.items():
            if folded.own is not None and name in folded.own:
                levels, wavelet = folded.own_form
                layer.place_own(slot, page, folded.own[name].to(self.device), rank=folded.own_rank,
                                levels=levels, wavelet=wavelet)
                continue
            a, b = folded.factors.get(name, (None, None)) if folded.own is None else (None, None)
            layer.place(slot, page, None if a is None else a.to(self.device), None if b is None else b.to(self.device))
        if folded.head is not None:
            w, b = folded.head
            self.heads[slot] = (w.to(self.device), b.to(self.device) if b is not None else torch.zeros(
                w.shape[0], device=self.device, dtype=w.dtype))
        self.slot_pages[slot] = folded.pages
        self._slot_written(slot)

    def move_slots(self, moves: list[tuple[int, int]]) -> None:
        """Move slots to start at new pages ((slot, page), in order; compaction: never past
        their old places). Called under ``lock``."""
        for slot, page in moves:
            for layer in self.layers.values():
                layer.move(slot, page)

    def free_slot(self, slot: int) -> None:
        """Forget a slot's factors and head. Called under ``lock``."""
        self.heads.pop(slot, None)
        self.slot_pages.pop(slot, None)
        for layer in self.layers.values():
            layer.drop(slot)
        self._slot_written(slot)

    def _slot_written(self, slot: int) -> None:
        """Called under the lock after slot ``slot`` changed (a backend's own copies follow)."""

    # --- merged fast path -------------------------------------------------------------------
    def build_merged(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
        """A copy of the base whose adapted weights are ``cast(float32(W0) + float32(lora_B) float32(lora_A))``
        (``factors``: layer -> (A, B) folded, in any dtype; the product and the sum in float32, one
        cast to the base's dtype: never a sum in bfloat16), for a hot adapter's batches. The
        served base is never modified."""
        import copy

        merged = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, layer in self.layers.items():
                plain = copy.deepcopy(layer.base)
                if name in factors:
                    a, b = factors[name]
                    delta = b.to(self.device, torch.float32) @ a.to(self.device, torch.float32)
                    plain.weight.copy_(merged_weight(plain, delta))
                set_submodule(merged, name, plain)
        return merged.eval()

    @torch.no_grad()
    def forward_merged(self, merged: nn.Module, head: tuple[torch.Tensor, torch.Tensor | None] | None,
                       inputs: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
        """All rows on one merged adapter: one plain forward, then its head (None: the base's)."""
        with self.lock:
            feats = merged(*self._inputs(inputs))
            if head is None:
                out = self._base_output(feats)
                return [{k: v[i] for k, v in out.items()} for i in range(feats.shape[0])]
            w, b = head
            logits = feats.float() @ w.to(self.device).T + (b.to(self.device) if b is not None else 0)
            return [{"logits": row.float().cpu()} for row in logits]

    # --- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, inputs: Sequence[torch.Tensor], slots: Sequence[int]) -> list[dict[str, Any]]:
        """Run one batch; row b uses slot ``slots[b]`` (0 = base). Returns per-row outputs:
        ``logits`` for adapter rows with a head, the base's own output otherwise."""
        slot_t = torch.as_tensor(list(slots), dtype=torch.long)
        groups = [(int(s), (slot_t == s).nonzero().flatten().to(self.device)) for s in sorted(set(slots)) if s != 0]
        with self.lock:
            missing = [s for s, _ in groups if s not in self.slot_pages]
            if missing:
                raise InternalError(f"slots {missing} of {self.base_model!r} hold no adapter")
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
                logits = (feats[rows].float() @ head[0].T + head[1]).cpu()
                for j, i in enumerate(rows.tolist()):
                    out[i] = {"logits": logits[j]}
        return out

    def _features(self, inputs: Sequence[torch.Tensor], slot_t: torch.Tensor,
                  groups: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """The model's features (its head input) for a batch routed by ``groups``."""
        self.routing.groups, self.routing.rows, self.routing.cache = groups, int(slot_t.shape[0]), {}
        try:
            return self.model(*self._inputs(inputs))
        finally:
            self.routing.groups = []

    def _base_output(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base's own answer, float32: normalised embeddings, or its head's logits."""
        if self.spec.output == "embeddings":
            return {"embeddings": F.normalize(feats.float(), dim=-1).cpu()}
        return {"logits": self.base_head(feats.float()).cpu()}
