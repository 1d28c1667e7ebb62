"""Adapters with random (non-zero) factors, for tests and benchmarks.

A trained adapter's B factors start at zero and stay small; random ones exercise every block
and every path at full strength, which is the stricter check.
"""

from __future__ import annotations

import os

import torch

from .artifact import WaraAdapter, fingerprint, load_adapter, save_adapter
from .basespec import BaseSpec, resolve_base
from .bases import BUILTINS, get_base
from .config import WaraConfig
from .layer import WaraLayer
from .model import adaptable_layers, base_weights, inject, wara_layers


def randomize_factors(layer: WaraLayer, seed: int = 0, *, std: float = 0.1) -> None:
    """Fill A and B of one layer with seeded N(0, std²) values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(layer.wara_A.values()) + list(layer.wara_B.values()):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def _randomize(model, head: str | None, seed: int) -> None:
    """Seeded random factors (B at half strength) and a perturbed head (if any)."""
    gen = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(wara_layers(model).values()):
        randomize_factors(layer, seed * 1000 + i, std=0.1)
        with torch.no_grad():
            for b in layer.wara_B.values():
                b.mul_(0.5)
    if head is None:
        return
    with torch.no_grad():
        for p in model.get_submodule(head).parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def random_adapters(
    base_model: str | BaseSpec,
    outs: list[str | os.PathLike],
    *,
    wavelet: str = "haar",
    levels: int = 1,
    rank: int = 2,
    num_labels: int = 5,
    seed: int = 0,
) -> None:
    """Write one random adapter per path in ``outs`` (seeds ``seed``, ``seed + 1``, ...), building
    the base model and hashing its weights once: fast enough for a thousand adapters. The base
    is a spec or a source (a built-in name, hf:PATH[@TASK], py:module:function). A base without
    a task head (``spec.task_head`` False: a causal LM) gets no head and no labels."""
    torch.manual_seed(seed)
    spec = base_model if isinstance(base_model, BaseSpec) else (
        get_base(base_model) if base_model in BUILTINS else resolve_base(base_model))
    head_name = spec.head if spec.task_head else None
    model = spec.build(num_labels if head_name else None)
    targets = spec.default_targets or tuple(adaptable_layers(model, levels=levels, exclude=(spec.head,)))
    config = WaraConfig(rank=rank, alpha=2.0 * rank, wavelet=wavelet, levels=levels,
                        target_modules=targets, modules_to_save=(head_name,) if head_name else ())
    inject(model, config, seed=seed)
    head = {k: v.clone() for k, v in model.get_submodule(head_name).state_dict().items()} if head_name else {}
    base_hash = fingerprint(base_weights(model, list(wara_layers(model))))
    labels = [f"label{i}" for i in range(num_labels)] if head_name else None
    for k, out in enumerate(outs):
        if head_name:
            model.get_submodule(head_name).load_state_dict(head)
        _randomize(model, head_name, seed + k)
        save_adapter(model, out, base_model=spec.name, labels=labels, base_fingerprint=base_hash,
                     base_source=spec.source)


def random_adapter(base_model: str | BaseSpec, out: str | os.PathLike, **kwargs) -> WaraAdapter:
    """Write (and load back) one adapter with random factors and head for any base.
    Keywords as `random_adapters`."""
    random_adapters(base_model, [out], **kwargs)
    return load_adapter(out)
