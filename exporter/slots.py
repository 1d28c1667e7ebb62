"""The slot tensors of a ``multi`` graph: the one packer (verify and the onnxruntime engine).

Per adapted layer the graph takes ``wara.<layer>.lora_A`` (S, R, n) and ``wara.<layer>.lora_B``
(S, m, R), and row b of a batch computes ``y_b = W0 x_b + B[s_b] (A[s_b] x_b)`` with
``s_b = adapter_index[b]``. Slot 0 is the base (zero factors); slot i+1 holds adapter i's folded
factors, zero-padded to the largest rank (zero rows and columns add nothing). A per-row task
head takes ``wara.<head>.weight`` (S, L, n) and ``wara.<head>.bias`` (S, L): ``z_b = W[s_b] x_b +
b[s_b]``, slot 0 the base's own head, zero-padded to the largest label count.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from wara_train.errors import ConfigError

PREFIX = "wara."
FACTOR_KINDS = ("lora_A", "lora_B")
HEAD_KINDS = ("weight", "bias")


def slot_input_names(layer: str) -> tuple[str, str]:
    """The graph inputs of one adapted layer's slot factors: (lora_A, lora_B)."""
    return f"{PREFIX}{layer}.lora_A", f"{PREFIX}{layer}.lora_B"


def head_input_names(head: str) -> tuple[str, str]:
    """The graph inputs of a per-slot task head: (weight, bias)."""
    return f"{PREFIX}{head}.weight", f"{PREFIX}{head}.bias"


def parse_input_name(name: str) -> tuple[str, str] | None:
    """``wara.<module>.<kind>`` -> (module, kind); None for any other input."""
    if not name.startswith(PREFIX) or "." not in name[len(PREFIX):]:
        return None
    module, kind = name[len(PREFIX):].rsplit(".", 1)
    return (module, kind) if kind in FACTOR_KINDS + HEAD_KINDS else None


def stack_folded(
    folded: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]], shapes: Mapping[str, tuple[int, int]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer of ``shapes`` ((m, n) each), the slot stacks ``(A (S, R, n), B (S, m, R))``
    float32, S = len(folded) + 1: slot 0 zeros, slot i+1 = ``folded[i][layer]`` (lora_A (r, n),
    lora_B (m, r)) zero-padded to the largest rank R; a layer an adapter lacks is zeros."""
    slots = len(folded) + 1
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer, (m, n) in shapes.items():
        pairs = [(i, f[layer]) for i, f in enumerate(folded, start=1) if layer in f]
        for i, (la, lb) in pairs:
            if la.dim() != 2 or lb.dim() != 2 or la.shape[1] != n or lb.shape[0] != m or la.shape[0] != lb.shape[1]:
                raise ConfigError(f"{layer}: adapter {i - 1} has lora_A {tuple(la.shape)} and lora_B "
                                  f"{tuple(lb.shape)}; the layer is ({m}, {n})")
        rank = max([la.shape[0] for _, (la, _) in pairs], default=1)
        a = torch.zeros(slots, rank, n)
        b = torch.zeros(slots, m, rank)
        for i, (la, lb) in pairs:
            a[i, : la.shape[0]] = la.detach().float().cpu()
            b[i, :, : lb.shape[1]] = lb.detach().float().cpu()
        out[layer] = (a, b)
    return out


def slot_feeds(stacked: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rank: int | None = None) -> dict[str, np.ndarray]:
    """The graph feeds of slot stacks: contiguous float32 arrays, the rank axis cut to ``rank``
    (default, or a stack narrower than ``rank``: all of it), so the graph never multiplies by
    padding it does not need."""
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    feeds: dict[str, np.ndarray] = {}
    for layer, (a, b) in stacked.items():
        r = a.shape[1] if rank is None else min(rank, a.shape[1])
        name_a, name_b = slot_input_names(layer)
        feeds[name_a] = np.ascontiguousarray(a[:, :r].detach().cpu().numpy(), dtype=np.float32)
        feeds[name_b] = np.ascontiguousarray(b[:, :, :r].detach().cpu().numpy(), dtype=np.float32)
    return feeds


def head_feeds(
    head: str, own: Mapping[str, torch.Tensor], heads: Sequence[Mapping[str, torch.Tensor] | None]
) -> dict[str, np.ndarray]:
    """Per-slot task-head feeds: slot 0 the base's ``own`` head (weight (L, n), bias (L)), slot
    i+1 ``heads[i]`` (None: the base's own), zero-padded to the largest label count L."""
    tensors = [own] + [h if h is not None else own for h in heads]
    if any("weight" not in t for t in tensors):
        raise ConfigError(f"task head {head!r}: every slot needs a weight")
    n = own["weight"].shape[1]
    for i, t in enumerate(tensors):
        if t["weight"].dim() != 2 or t["weight"].shape[1] != n:
            raise ConfigError(f"task head {head!r}: slot {i} weight is {tuple(t['weight'].shape)}, expected (labels, {n})")
    labels = max(t["weight"].shape[0] for t in tensors)
    w = np.zeros((len(tensors), labels, n), dtype=np.float32)
    b = np.zeros((len(tensors), labels), dtype=np.float32)
    for i, t in enumerate(tensors):
        k = t["weight"].shape[0]
        w[i, :k] = t["weight"].detach().float().cpu().numpy()
        if t.get("bias") is not None:
            b[i, :k] = t["bias"].detach().float().cpu().numpy()
    name_w, name_b = head_input_names(head)
    return {name_w: w, name_b: b}
