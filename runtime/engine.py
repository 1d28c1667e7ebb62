"""The PyTorch engine: one base model, a device tier of fixed adapter slots, per-row routing.

Every adaptable layer of the base becomes a `SlotLayer` holding ``lora_A`` (S, R, n) and
``lora_B`` (S, m, R): the folded factors (DESIGN.md 2.2) of up to S-1 adapters, zero-padded to
the max rank R, so writing or clearing a slot never reallocates (STYLE.md 7). Slot 0 is the base
(all zeros). The task head is tapped: the model returns its features and each row gets its own
adapter's head, so adapters with different label sets share one forward pass.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from wara_train.artifact import WaraAdapter, fingerprint
from wara_train.basespec import BaseSpec, resolve_base
from wara_train.errors import ConfigError, IncompatibleAdapterError
from wara_train.layer import is_pointwise_conv, layer_shape, merged_weight, weight_matrix
from wara_train.model import adaptable_layers, find_targets, set_submodule

from .kernels import LoraKernel, grouped_lora


@dataclass
class Routing:
    """Which slot each row of the current batch uses; set by the engine before a forward."""

    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    rows: int = 0  # the batch size: every adapted layer's input must lead with it


class SlotLayer(nn.Module):
    """``y = W0 x + lora_B[s] (lora_A[s] x)`` for each row's slot s (Linear, 1x1 Conv2d, Conv1D).

    Inputs lead with the batch axis; everything between it and the feature axis is tokens
    (sequence positions, or H x W for a Linear on channels-last maps such as ConvNeXt's)."""

    def __init__(self, base: nn.Module, *, slots: int, max_rank: int, routing: Routing, kernel: LoraKernel) -> None:
        super().__init__()
        self.base = base
        self.conv = is_pointwise_conv(base)
        m, n = layer_shape(base)
        dev, dt = base.weight.device, base.weight.dtype
        self.register_buffer("lora_A", torch.zeros(slots, max_rank, n, device=dev, dtype=dt), persistent=False)
        self.register_buffer("lora_B", torch.zeros(slots, m, max_rank, device=dev, dtype=dt), persistent=False)
        self.routing = routing
        self.kernel = kernel
        self.ranks = [0] * slots  # rank in use per slot (the rest of max_rank is zeros)

    def set_slot(self, index: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write folded factors (r <= max rank) into a slot, zeroing the padding."""
        r = a.shape[0]
        if r > self.lora_A.shape[1]:
            raise ConfigError(f"folded rank {r} exceeds the server's max_rank {self.lora_A.shape[1]}")
        self.lora_A[index, :r].copy_(a)
        self.lora_B[index, :, :r].copy_(b)
        old = self.ranks[index]
        if old > r:  # rows past r are zero except where a larger adapter left its factors
            self.lora_A[index, r:old].zero_()
            self.lora_B[index, :, r:old].zero_()
        self.ranks[index] = r

    def reset_slot(self, index: int) -> None:
        self.lora_A[index].zero_()
        self.lora_B[index].zero_()
        self.ranks[index] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.routing.groups:
            return y
        if x.shape[0] != self.routing.rows:
            raise ConfigError(f"an adapted layer sees inputs of shape {list(x.shape)} whose first axis is not the "
                              f"batch of {self.routing.rows}: this model cannot be served with per-row adapters")
        if self.conv:  # (B, C, H, W) -> (B, HW, C) rows of features
            xs = x.flatten(2).transpose(1, 2)
            d = self.kernel(xs, self.lora_A, self.lora_B, self.routing.groups, self.ranks)
            return y + d.transpose(1, 2).reshape(y.shape)
        xs = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, tokens, n)
        if y.is_contiguous():
            self.kernel(xs, self.lora_A, self.lora_B, self.routing.groups, self.ranks,
                        out=y.view(y.shape[0], -1, y.shape[-1]))  # in place
            return y
        d = self.kernel(xs, self.lora_A, self.lora_B, self.routing.groups, self.ranks)
        return y + d.reshape(y.shape)


class HeadTap(nn.Module):
    """Stands where the task head was: passes the features through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass
class Folded:
    """An adapter prepared for the device tier: folded factors and head, float32, CPU."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    head: tuple[torch.Tensor, torch.Tensor | None] | None
    labels: list[str] | None

    @property
    def nbytes(self) -> int:
        total = sum(a.numel() + b.numel() for a, b in self.factors.values())
        if self.head is not None:
            total += self.head[0].numel() + (self.head[1].numel() if self.head[1] is not None else 0)
        return 4 * total


class TorchEngine:
    """A base model with S adapter slots; runs heterogeneous batches in one forward."""

    platform = "wara_pytorch"

    def __init__(self, base: BaseSpec | str, *, slots: int = 16, max_rank: int = 32, device: str | None = None,
                 kernel: LoraKernel = grouped_lora) -> None:
        if slots < 2:
            raise ConfigError("slots must be >= 2 (slot 0 is the base)")
        self.spec = spec = base if isinstance(base, BaseSpec) else resolve_base(base)
        self.base_model = spec.name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = spec.build(None)
        # Every layer an adapter of this base may target: the family's defaults, else every
        # adaptable layer (the fallback's divisibility by 2^J is the adapter's own business).
        self.targets = (find_targets(model, spec.default_targets) if spec.default_targets
                        else adaptable_layers(model, exclude=(spec.head,)))
        self.routing = Routing()
        self._fingerprints: dict[tuple[str, ...], str] = {}  # target set -> hash of its base weights
        for name in self.targets:
            set_submodule(model, name, SlotLayer(model.get_submodule(name), slots=slots, max_rank=max_rank,
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
        self.num_slots = slots
        self.max_rank = max_rank
        feat = self._feature_dim()
        self.head_w = torch.zeros(slots, 1, feat, device=self.device)
        self.head_b = torch.zeros(slots, 1, device=self.device)
        self.slot_labels: list[int] = [0] * slots
        self.lock = threading.Lock()  # one forward or slot write at a time
        self._hash_lock = threading.Lock()
        self.fingerprint(tuple(self.targets))  # the usual target set, hashed once at start-up

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
        """Validate ``adapter`` against this base and fold it (load time, not per request)."""
        why = self.mismatch(adapter)
        if why is not None:
            raise IncompatibleAdapterError(f"the adapter (trained on base {adapter.base_model!r}) does not fit "
                                           f"base {self.base_model!r}: {why}")
        factors = adapter.folded_all()
        for la, _ in factors.values():
            if la.shape[0] > self.max_rank:
                raise IncompatibleAdapterError(
                    f"folded rank {la.shape[0]} exceeds the server's max_rank {self.max_rank}; raise max_rank")
        head_name = self.spec.head
        extra = sorted(set(adapter.saved_modules) - {head_name})
        if extra:
            raise IncompatibleAdapterError(f"this server applies only the task head {head_name!r} from "
                                           f"modules_to_save; the adapter also saves {extra}")
        head = None
        params = adapter.saved_modules.get(head_name)
        if params is not None:
            w, b = params.get("weight"), params.get("bias")
            if w is None or w.dim() != 2 or w.shape[1] != self.head_w.shape[2] or set(params) - {"weight", "bias"}:
                raise IncompatibleAdapterError(f"task head {head_name} must be a Linear on {self.head_w.shape[2]} features")
            if b is not None and tuple(b.shape) != (w.shape[0],):
                raise IncompatibleAdapterError(f"task head bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
            head = (w.float(), b.float() if b is not None else None)
        if adapter.labels is not None:
            if head is None:
                raise IncompatibleAdapterError("the adapter names labels but saves no task head")
            if len(adapter.labels) != head[0].shape[0]:
                raise IncompatibleAdapterError(f"{len(adapter.labels)} labels for a head of {head[0].shape[0]} outputs")
        return Folded(factors, head, adapter.labels)

    def write_slot(self, index: int, folded: Folded) -> None:
        """Device tier: copy an adapter into slot ``index`` (1..S-1) in place."""
        with self.lock:
            for name, layer in self.layers.items():
                if name in folded.factors:
                    a, b = folded.factors[name]
                    layer.set_slot(index, a.to(self.device), b.to(self.device))
                else:
                    layer.reset_slot(index)
            if folded.head is not None:
                w, b = folded.head
                if w.shape[0] > self.head_w.shape[1]:  # grow the head bank (rare: more labels)
                    grow = w.shape[0] - self.head_w.shape[1]
                    self.head_w = F.pad(self.head_w, (0, 0, 0, grow))
                    self.head_b = F.pad(self.head_b, (0, grow))
                self.head_w[index].zero_()
                self.head_b[index].zero_()
                self.head_w[index, : w.shape[0]] = w.to(self.device)
                if b is not None:
                    self.head_b[index, : b.shape[0]] = b.to(self.device)
                self.slot_labels[index] = w.shape[0]
            else:
                self.slot_labels[index] = 0
            self._slot_written(index)

    def _slot_written(self, index: int) -> None:
        """Called under the lock after slot ``index`` changed (a backend's own copies follow)."""

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
    def forward_merged(self, merged: nn.Module, folded: Folded, inputs: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
        """All rows on one merged adapter: one plain forward, then its head."""
        with self.lock:
            feats = merged(*[t.to(self.device) for t in inputs])
            if folded.head is None:
                out = self._base_output(feats)
                return [{k: v[i] for k, v in out.items()} for i in range(feats.shape[0])]
            w, b = folded.head
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
            feats = self._features(inputs, slot_t, groups)
            out: list[dict[str, Any]] = [dict() for _ in slots]
            base_rows = [i for i, s in enumerate(slots) if s == 0 or self.slot_labels[s] == 0]
            if base_rows:
                base_out = self._base_output(feats[base_rows])
                for j, i in enumerate(base_rows):
                    out[i] = {k: v[j] for k, v in base_out.items()}
            for s, rows in groups:
                if self.slot_labels[s] == 0:
                    continue
                logits = feats[rows] @ self.head_w[s].T + self.head_b[s]
                for j, i in enumerate(rows.tolist()):
                    out[i] = {"logits": logits[j, : self.slot_labels[s]].float().cpu()}
        return out

    def _features(self, inputs: Sequence[torch.Tensor], slot_t: torch.Tensor,
                  groups: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """The model's features (its head input) for a batch routed by ``groups``."""
        self.routing.groups, self.routing.rows = groups, int(slot_t.shape[0])
        try:
            return self.model(*[t.to(self.device) for t in inputs])
        finally:
            self.routing.groups = []

    def _base_output(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base's own answer: normalised embeddings, or its head's logits."""
        if self.spec.output == "embeddings":
            return {"embeddings": F.normalize(feats, dim=-1).float().cpu()}
        return {"logits": self.base_head(feats).float().cpu()}
