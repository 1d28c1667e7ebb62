"""Merge one adapter (or a weighted blend of several) into a copy of the base weights.

``W = W0 + Σ_i w_i ΔW_i``, summed in float32 from the pristine base and cast once; the base
model passed in is never modified. The result uses the base model's own parameter names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from wara_train.artifact import WaraAdapter, check_compatible
from wara_train.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _blend_saved_modules(adapters: Sequence[tuple[WaraAdapter, float]]) -> dict[str, torch.Tensor]:
    """modules_to_save tensors (task heads) blended with the same weights; they must agree in
    names, shapes and labels, or a blend has no meaning."""
    first = adapters[0][0]
    for a, _ in adapters[1:]:
        if a.labels != first.labels or set(a.saved_modules) != set(first.saved_modules):
            raise ConfigError("cannot blend adapters with different labels or modules_to_save (task heads)")
    out: dict[str, torch.Tensor] = {}
    for mod, params in first.saved_modules.items():
        for pname in params:
            key = f"{mod}.{pname}"
            total = sum(w * a.saved_modules[mod][pname].float() for a, w in adapters)
            out[key] = total if len(adapters) > 1 else first.saved_modules[mod][pname].float()
    return out


def merged_state_dict(
    base: nn.Module,
    adapters: Sequence[tuple[WaraAdapter, float]],
    *,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The base model's state dict with every targeted weight replaced by ``W0 + Σ w_i ΔW_i``
    and modules_to_save taken from the adapters. Float32 math, one cast to ``dtype`` (default:
    each tensor's own). ``base`` is left bit-identical."""
    if not adapters:
        raise ConfigError("merge needs at least one adapter")
    for adapter, _ in adapters:
        check_compatible(adapter, base, base_model=base_model)
    state = {k: v.detach() for k, v in base.state_dict().items()}
    deltas: dict[str, torch.Tensor] = {}
    for adapter, weight in adapters:
        for mod in adapter.config.target_modules:
            d = weight * adapter.delta_weight(mod)
            deltas[mod] = deltas[mod] + d if mod in deltas else d
    out: dict[str, torch.Tensor] = {}
    saved = _blend_saved_modules(adapters)
    for key, value in state.items():
        mod, _, pname = key.rpartition(".")
        if pname == "weight" and mod in deltas:
            value = value.float() + deltas[mod].reshape(value.shape)
        elif key in saved:
            value = saved[key]
        out[key] = value.to(dtype or state[key].dtype).contiguous()
    missing = set(saved) - set(out)
    if missing:
        raise ConfigError(f"modules_to_save tensors {sorted(missing)} have no place in the base model")
    return out


def merged_model(base: nn.Module, adapters: Sequence[tuple[WaraAdapter, float]], **kwargs: Any) -> nn.Module:
    """A deep copy of ``base`` carrying the merged weights (a plain model, no WaRA layers)."""
    import copy

    model = copy.deepcopy(base)
    model.load_state_dict(merged_state_dict(base, adapters, **kwargs))
    return model


def load_merged(path: str | os.PathLike) -> nn.Module:
    """Rebuild a built-in base model and load a merged ``model.safetensors`` into it."""
    from safetensors.torch import load_file

    from wara_train.bases import build_base

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        state = load_file(str(path / "model.safetensors"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a merged model directory ({e})") from None
    labels = config.get("labels")
    model = build_base(config["base_model"], num_labels=len(labels) if labels else None)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def model_config(base: nn.Module) -> dict[str, Any] | None:
    """The Hugging Face config of the base (if it has one), so the merged weights are usable."""
    for module in base.modules():
        cfg = getattr(module, "config", None)
        if hasattr(cfg, "to_dict"):
            return cfg.to_dict()
    return None


def save_merged(
    state: dict[str, torch.Tensor], out_dir: str | os.PathLike, *, config: dict[str, Any]
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (what the model is and how it was made)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
