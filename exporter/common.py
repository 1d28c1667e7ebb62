"""Loading an adapter together with the built-in base model it was made for."""

from __future__ import annotations

import os

import torch.nn as nn

from wara_train.artifact import WaraAdapter, check_compatible, load_adapter
from wara_train.bases import build_base
from wara_train.layer import is_pointwise_conv


def base_for(adapter: WaraAdapter) -> nn.Module:
    """A fresh built-in base model shaped for ``adapter`` (its head sized by its labels),
    checked against the adapter's fingerprint."""
    num_labels = len(adapter.labels) if adapter.labels else None
    base = build_base(adapter.base_model, num_labels=num_labels)
    check_compatible(adapter, base, base_model=adapter.base_model)
    return base


def load_with_base(path: str | os.PathLike) -> tuple[WaraAdapter, nn.Module]:
    adapter = load_adapter(path)
    return adapter, base_for(adapter)


def conv_targets(adapter: WaraAdapter, base: nn.Module) -> set[str]:
    return {m for m in adapter.config.target_modules if is_pointwise_conv(base.get_submodule(m))}
