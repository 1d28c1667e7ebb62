"""Default WaRA targets per architecture family, keyed by transformers' ``model_type``.

Like peft's per-architecture LoRA defaults: the attention projections and the MLP of each
block, by module-name suffix. Module names move between transformers releases (ViT's
``attention.attention.query`` became ``attention.q_proj`` in transformers 5), so a family may
list several name sets; the first whose every suffix names a layer of the model wins. A family
that is not listed, or whose sets all miss, falls back to every adaptable layer (Linear, 1x1
Conv2d, Conv1D) whose dims are divisible by 2^J, the task head excepted.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

_BERT_LIKE = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_VIT_V5 = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")  # transformers >= 5 names

TARGETS_BY_MODEL_TYPE: dict[str, tuple[str, ...] | tuple[tuple[str, ...], ...]] = {
    # encoders
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    "mpnet": ("q", "k", "v", "o", "intermediate.dense", "output.dense"),
    # vision
    "vit": (_BERT_LIKE, _VIT_V5),
    "deit": (_BERT_LIKE, _VIT_V5),
    "dinov2": ("query", "key", "value", "attention.output.dense", "fc1", "fc2"),
    "convnext": ("pwconv1", "pwconv2"),
    "swin": _BERT_LIKE,
    # decoders
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}


def candidates(model_type: str | None) -> list[tuple[str, ...]]:
    entry = TARGETS_BY_MODEL_TYPE.get(model_type or "")
    if entry is None:
        return []
    return [entry] if isinstance(entry[0], str) else list(entry)  # type: ignore[list-item]


def default_targets(model: nn.Module, model_type: str | None) -> tuple[str, ...] | None:
    """The family's target suffixes that fit ``model`` (every suffix names one of its layers),
    or None: use the fallback (every adaptable layer). ``model`` may live on the meta device."""
    names = [n for n, _ in model.named_modules()]
    for suffixes in candidates(model_type):
        if all(_names_a_layer(names, s) for s in suffixes):
            return suffixes
    return None


def _names_a_layer(names: Sequence[str], suffix: str) -> bool:
    return any(n == suffix or n.endswith("." + suffix) for n in names)
