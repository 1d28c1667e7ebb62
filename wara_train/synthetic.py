"""Adapters with random (non-zero) factors, for tests and benchmarks.

A trained adapter's B factors start at zero and stay small; random ones exercise every block
and every path at full strength, which is the stricter check.
"""

from __future__ import annotations

import os

import torch

from .artifact import WaraAdapter, load_adapter, save_adapter
from .bases import build_base, get_base
from .config import WaraConfig
from .layer import WaraLayer
from .model import inject, wara_layers


def randomize_factors(layer: WaraLayer, seed: int = 0, *, std: float = 0.1) -> None:
    """Fill A and B of one layer with seeded N(0, std²) values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(layer.wara_A.values()) + list(layer.wara_B.values()):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def random_adapter(
    base_model: str,
    out: str | os.PathLike,
    *,
    wavelet: str = "haar",
    levels: int = 1,
    rank: int = 2,
    num_labels: int = 5,
    seed: int = 0,
) -> WaraAdapter:
    """Write (and load back) an adapter with random factors and head for a built-in base."""
    torch.manual_seed(seed)
    recipe = get_base(base_model)
    model = build_base(base_model, num_labels=num_labels)
    config = WaraConfig(rank=rank, alpha=2.0 * rank, wavelet=wavelet, levels=levels,
                        target_modules=recipe.default_targets, modules_to_save=(recipe.head,))
    inject(model, config, seed=seed)
    for i, layer in enumerate(wara_layers(model).values()):
        randomize_factors(layer, seed * 1000 + i, std=0.1)
        with torch.no_grad():
            for b in layer.wara_B.values():
                b.mul_(0.5)
    with torch.no_grad():
        for p in model.get_submodule(recipe.head).parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    save_adapter(model, out, base_model=base_model, labels=[f"label{i}" for i in range(num_labels)])
    return load_adapter(out)
