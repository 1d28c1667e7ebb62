"""Fold a WaRA adapter into an ordinary LoRA adapter in peft's on-disk format (DESIGN.md 2.2).

Every adapted layer becomes ``lora_B @ lora_A = ΔW`` exactly (up to rounding), rank
``R = (3J + 1) · r``; the WaRA scale is folded into ``lora_B`` and ``lora_alpha = R`` so that
peft's own scale ``lora_alpha / r`` is 1. Engines that only know LoRA (peft, vLLM, LoRAX,
TensorRT-LLM) can then serve a WaRA adapter unchanged.

Module names: for a base that is a transformers model they are the transformers model's own
(``PeftModel.from_pretrained(AutoModel*.from_pretrained(dir), lora_dir)`` loads the file); for
any other base, those of our module. A task head that is part of the transformers model is a
peft ``modules_to_save``; the head a feature-extraction adapter trains on the pooled features
is no part of it and is written beside, as ``wara_head.safetensors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from wara_train.artifact import WaraAdapter
from wara_train.basespec import BaseSpec

from .common import HEAD_FILE, conv1d_targets, conv_targets, hf_name, saved_head, write_head
from .staging import staged_dir

PEFT_PREFIX = "base_model.model."
STALE_FILES = (HEAD_FILE, "adapter_model.*")  # an earlier export's head or weights, if not rewritten


def _peft_names(adapter: WaraAdapter, spec: BaseSpec | None) -> tuple[dict[str, str], dict[str, str]]:
    """(targets, modules_to_save): our module name -> the name in the peft file."""
    name = (lambda n: hf_name(spec, n)) if spec is not None and spec.hf is not None else (lambda n: n)
    targets = {m: name(m) for m in adapter.config.target_modules}
    if spec is not None and spec.hf is not None and not spec.hf.head_in_model:
        saved = {m: name(m) for m in adapter.saved_modules if m != spec.head}
    else:
        saved = {m: name(m) for m in adapter.saved_modules}
    return targets, saved


def peft_lora_tensors(
    adapter: WaraAdapter, *, spec: BaseSpec | None = None, conv_modules: set[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """peft key names: ``base_model.model.<module>.lora_A.weight`` (R, n) and ``lora_B.weight``
    (m, R), also for Conv1D (peft's ``fan_in_fan_out`` transposes the product, not the
    factors); 1x1 convs get (R, n, 1, 1) / (m, R, 1, 1); modules_to_save keep their names."""
    targets, saved = _peft_names(adapter, spec)
    out: dict[str, torch.Tensor] = {}
    folded = adapter.folded_all()
    for mod, name in targets.items():
        la, lb = folded[mod]
        if mod in conv_modules:
            la, lb = la[:, :, None, None], lb[:, :, None, None]
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = la.clone(memory_format=torch.contiguous_format)  # own storage
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lb.clone(memory_format=torch.contiguous_format)
    for mod, name in saved.items():
        for pname, t in adapter.saved_modules[mod].items():
            out[f"{PEFT_PREFIX}{name}.{pname}"] = t.contiguous()
    return out


def save_peft_lora(
    adapter: WaraAdapter, out_dir: str | os.PathLike, *, spec: BaseSpec | None = None, base: nn.Module | None = None
) -> Path:
    """Write ``adapter_config.json`` (peft_type LORA) and ``adapter_model.safetensors``.

    ``spec``: the adapter's base (names as in its transformers model; without one, as in our
    module). ``base``: the base model, to tell 1x1 convs and Conv1D layers from Linears
    (default: every target is a Linear). Atomic (`exporter.staging`): an export that fails
    leaves ``out_dir`` as it was."""
    from safetensors.torch import save_file

    convs = conv_targets(adapter, base) if base is not None else set()
    conv1d = conv1d_targets(adapter, base) if base is not None else set()
    targets, saved = _peft_names(adapter, spec)
    rank = len(next(iter(adapter.factors.values()))) * adapter.config.rank
    hf = spec is not None and spec.hf is not None
    config = {
        "peft_type": "LORA",
        "task_type": spec.hf.peft_task_type if hf else None,
        "base_model_name_or_path": spec.hf.path if hf else adapter.base_model,
        "r": rank,
        "lora_alpha": rank,  # peft scales by lora_alpha / r = 1: the WaRA scale is inside lora_B
        "lora_dropout": 0.0,
        "target_modules": list(targets.values()),
        "modules_to_save": list(saved.values()) or None,
        "bias": "none",
        # Conv1D (GPT-2) stores W as (in, out). peft corrects this flag per layer kind (with a
        # warning), so it only has to be right for the Conv1D models where it matters.
        "fan_in_fan_out": bool(conv1d),
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
              "wara_rank": str(adapter.config.rank), "wara_base_model": adapter.base_model}
    head = saved_head(adapter, spec) if hf and not spec.hf.head_in_model else None
    with staged_dir(out_dir, stale=STALE_FILES, last=("adapter_config.json",)) as stage:
        save_file(peft_lora_tensors(adapter, spec=spec, conv_modules=convs), str(stage / "adapter_model.safetensors"),
                  metadata={"format": "pt", **source})
        (stage / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if head is not None:
            write_head(stage, head, labels=adapter.labels)
    return Path(out_dir)
