"""Fold a WaRA adapter into an ordinary LoRA adapter in peft's on-disk format (DESIGN.md 2.2).

Every adapted layer becomes ``lora_B @ lora_A = ΔW`` exactly (up to rounding), rank
``R = (3J + 1) · r``; the WaRA scale is folded into ``lora_B`` and ``lora_alpha = R`` so that
peft's own scale ``lora_alpha / r`` is 1. Engines that only know LoRA (peft, vLLM, LoRAX,
TensorRT-LLM) can then serve a WaRA adapter unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from wara_train.artifact import WaraAdapter

PEFT_PREFIX = "base_model.model."


def peft_lora_tensors(adapter: WaraAdapter, *, conv_modules: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """peft key names: ``base_model.model.<module>.lora_A.weight`` (R, n) and ``lora_B.weight``
    (m, R); 1x1 convs get (R, n, 1, 1) / (m, R, 1, 1); modules_to_save keep their own names."""
    out: dict[str, torch.Tensor] = {}
    for mod in adapter.config.target_modules:
        la, lb = adapter.folded(mod)
        if mod in conv_modules:
            la, lb = la[:, :, None, None], lb[:, :, None, None]
        out[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = la.contiguous()
        out[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = lb.contiguous()
    for mod, params in adapter.saved_modules.items():
        for pname, t in params.items():
            out[f"{PEFT_PREFIX}{mod}.{pname}"] = t.contiguous()
    return out


def save_peft_lora(
    adapter: WaraAdapter, out_dir: str | os.PathLike, *, conv_modules: set[str] = frozenset()
) -> Path:
    """Write ``adapter_config.json`` (peft_type LORA) and ``adapter_model.safetensors``."""
    from safetensors.torch import save_file

    rank = len(next(iter(adapter.factors.values()))) * adapter.config.rank
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.base_model,
        "r": rank,
        "lora_alpha": rank,  # peft scales by lora_alpha / r = 1: the WaRA scale is inside lora_B
        "lora_dropout": 0.0,
        "target_modules": list(adapter.config.target_modules),
        "modules_to_save": list(adapter.saved_modules) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    # Provenance (which WaRA adapter this LoRA equals) goes in the file's metadata: peft warns
    # about unknown keys in adapter_config.json.
    source = {"wara_content_hash": adapter.content_hash, "wara_wavelet": adapter.config.wavelet,
              "wara_mode": adapter.config.mode, "wara_levels": str(adapter.config.levels),
              "wara_rank": str(adapter.config.rank)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(peft_lora_tensors(adapter, conv_modules=conv_modules), str(out / "adapter_model.safetensors"),
              metadata={"format": "pt", **source})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
