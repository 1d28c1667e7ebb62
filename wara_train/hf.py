"""``hf:PATH[@TASK]`` bases: any transformers model directory on local disk, offline.

Tasks (`wara_train.spec.TASKS`):

* ``feature-extraction``: ``AutoModel``, mean-pooled over the attention mask and L2-normalised
  (what sentence-transformers' mean-pooling models return); a task head trained with an adapter
  sits on the pooled features.
* ``text-classification``: ``AutoModelForSequenceClassification`` with its own head, or a new
  head trained with the adapter.
* ``image-classification``: ``AutoModelForImageClassification`` (ViT, ConvNeXt, ResNet, ...),
  preprocessed by the directory's own image processor.
* ``text-generation``: ``AutoModelForCausalLM`` (Llama-likes, GPT-2, GPT-NeoX, Phi-3, ...),
  returning next-token logits for every position; its vocabulary head is the base's own.

The directory's tokenizer or image processor is used; nothing is ever downloaded. Without a
task, one is read off ``config.architectures``. transformers is imported only when a spec is
built, so importing this module is cheap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .spec import TASKS, BaseSpec, HFModel, TensorSpec, replace_head
from .targets import default_targets

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
AUTO_CLASSES = {"feature-extraction": "AutoModel", "text-classification": "AutoModelForSequenceClassification",
                "image-classification": "AutoModelForImageClassification", "text-generation": "AutoModelForCausalLM"}
CAUSAL_LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")  # name endings of transformers' causal LMs
_POOLER_FAMILIES = {"bert", "roberta", "xlm-roberta", "camembert", "mpnet"}  # AutoModel adds an unused pooler
DEFAULT_MAX_LENGTH = 128


def transformers_module():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise ConfigError(f"hf: bases need the 'models' extra: pip install 'wara-serve[models]' ({e})") from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return transformers


def check_model_dir(path: str | os.PathLike) -> Path:
    """Refuse, naming the problem, a path that is not a loadable transformers model directory."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"hf:{path}: no such directory")
    if not p.is_dir():
        raise ConfigError(f"hf:{path}: not a directory (give the model directory that holds config.json)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"hf:{path}: no config.json: not a transformers model directory")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"hf:{path}: no weights ({' / '.join(WEIGHT_FILES[::2])}): save the model with save_pretrained")
    return p


def infer_task(path: Path) -> str:
    """The task a directory's ``architectures`` names; feature-extraction for a bare model."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"hf:{path}: unreadable config.json ({e})") from None
    names = [str(a) for a in config.get("architectures") or []]
    archs = " ".join(names)
    if "ForImageClassification" in archs:
        return "image-classification"
    if "ForSequenceClassification" in archs:
        return "text-classification"
    if any(a.endswith(CAUSAL_LM_ARCHITECTURES) for a in names):
        return "text-generation"
    return "feature-extraction"


# ------------------------------------------------------------------------------------------
# the served modules


class PooledEncoder(nn.Module):
    """A transformers encoder (or decoder) with masked mean pooling. Without a head it returns
    the L2-normalised pooled embedding; with one, ``classifier(pooled)``. The encoder sits under
    its family's own ``base_model_prefix`` (``bert``, ``transformer``, ...), so module names
    are those of transformers' task models."""

    def __init__(self, encoder: nn.Module, num_labels: int | None = None, *, attr: str = "encoder") -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, encoder)
        hidden = encoder.config.hidden_size
        self.classifier = nn.Linear(hidden, num_labels) if num_labels else None

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = getattr(self, self.attr)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.embed(input_ids, attention_mask)
        if self.classifier is None:
            return F.normalize(pooled, dim=-1)
        return self.classifier(pooled)


class HFClassifier(nn.Module):
    """A transformers task model (``*For*Classification``, ``*ForCausalLM``) called with
    positional tensors, returning its logits; ``.model`` is the transformers model itself."""

    def __init__(self, model: nn.Module, arg_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.arg_names = tuple(arg_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.arg_names, inputs))).logits


def find_head(model: nn.Module, num_labels: int) -> str:
    """The classification head: the last Linear with ``num_labels`` outputs."""
    heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not heads:
        raise ConfigError(f"the model has no Linear head with {num_labels} outputs (config.num_labels)")
    return heads[-1]


# ------------------------------------------------------------------------------------------
# preprocessing


class TextPreprocessor:
    """Texts -> (input_ids, attention_mask) with the directory's own tokenizer, right-padded."""

    def __init__(self, path: str, *, max_length: int | None = None, max_positions: int | None = None) -> None:
        tr = transformers_module()
        try:
            self.tokenizer = tr.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"hf:{path}: no usable tokenizer in the directory ({e})") from None
        tok = self.tokenizer
        if tok.pad_token is None:  # GPT-2-style vocabularies: pad with eos (masked out anyway)
            tok.pad_token = tok.eos_token or tok.unk_token
        if tok.pad_token is None:
            raise ConfigError(f"hf:{path}: the tokenizer has no pad, eos or unk token to pad batches with")
        tok.padding_side = "right"
        limit = max_length or DEFAULT_MAX_LENGTH
        self.max_length = min(limit, max_positions) if max_positions else limit

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        # Rows cut to max_length (a fast tokenizer keeps what it cut as `overflowing`); the
        # server reports them in its response.
        self.truncated = [i for i, e in enumerate(getattr(enc, "encodings", None) or ()) if e.overflowing]
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
        if ids.shape[1] == 0:  # every text empty: one pad token, masked out
            ids = torch.full((len(texts), 1), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
        return ids, mask


class ImagePreprocessor:
    """PIL images -> (pixel_values,) with the directory's own image processor."""

    def __init__(self, path: str) -> None:
        tr = transformers_module()
        try:
            self.processor = tr.AutoImageProcessor.from_pretrained(path, local_files_only=True, use_fast=False)
        except (OSError, ValueError, TypeError, ImportError) as e:
            raise ConfigError(f"hf:{path}: no usable image processor (preprocessor_config.json) ({e})") from None

    def __call__(self, images: Sequence[Any]) -> tuple[torch.Tensor]:
        rgb = [im.convert("RGB") if hasattr(im, "convert") else im for im in images]
        return (self.processor(images=rgb, return_tensors="pt")["pixel_values"].float(),)


def _image_size(path: Path, config: Any) -> int:
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if isinstance(size, int):
        return size
    try:
        pre = json.loads((path / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"hf:{path}: no preprocessor_config.json to read the image size from") from None
    for key in ("crop_size", "size"):
        s = pre.get(key)
        if isinstance(s, int):
            return s
        if isinstance(s, dict):
            for k in ("height", "shortest_edge"):
                if isinstance(s.get(k), int):
                    return s[k]
    raise ConfigError(f"hf:{path}: cannot tell the image size from config.json or preprocessor_config.json")


# ------------------------------------------------------------------------------------------
# the spec


def _text_inputs(vocab: int, positions: int | None) -> tuple[TensorSpec, TensorSpec]:
    maxd = (None, positions)
    return (TensorSpec("input_ids", "INT64", (-1, -1), (1, 1), maxd, (0, vocab)),
            TensorSpec("attention_mask", "INT64", (-1, -1), (1, 1), maxd, (0, 2)))


def _text_sample(vocab: int):
    def sample(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(batch * 1000 + seq)  # the same sample every time
        ids = torch.randint(min(5, vocab - 1), vocab, (batch, seq), generator=gen)
        return ids, torch.ones(batch, seq, dtype=torch.long)

    return sample


def _max_positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def load_pretrained(auto_class: str, path: str, **kwargs: Any) -> tuple[nn.Module, dict]:
    """``transformers.<auto_class>.from_pretrained(path)`` offline, in eval mode, with its
    loading info (``missing_keys``, ...); a directory it cannot load is a `ConfigError`."""
    tr = transformers_module()
    try:
        model, info = getattr(tr, auto_class).from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"hf:{path}: {auto_class} cannot load it ({e})") from None
    return model.eval(), info


def _refuse_missing(path: str, info: dict, allowed: str | None) -> None:
    """Weights the directory lacks would be random and not saved with any adapter: refuse,
    except for the task head (trained with the adapter)."""
    missing = [k for k in info.get("missing_keys", []) if not (allowed and (k == allowed or k.startswith(allowed + ".")))]
    if missing:
        raise ConfigError(f"hf:{path}: the directory lacks weights for {', '.join(sorted(missing)[:6])}"
                          f"{' ...' if len(missing) > 6 else ''}; they would be random (is the task right?)")


def _feature_spec(path: str, config: Any, meta: nn.Module, common: dict) -> BaseSpec:
    vocab = int(config.vocab_size)
    positions = _max_positions(config)
    prefix = getattr(meta, "base_model_prefix", "") or "encoder"  # the family's own name: bert, transformer, ...
    kwargs = {"add_pooling_layer": False} if config.model_type in _POOLER_FAMILIES else {}

    def build(num_labels: int | None = None) -> nn.Module:
        encoder, info = load_pretrained("AutoModel", path, **kwargs)
        _refuse_missing(path, info, None)
        return PooledEncoder(encoder, num_labels, attr=prefix).eval()

    return BaseSpec(
        **common, build=build, inputs=_text_inputs(vocab, positions), head="classifier", output="embeddings",
        sample=_text_sample(vocab), raw_input="text",
        preprocessor=lambda max_length=None: TextPreprocessor(path, max_length=max_length, max_positions=positions),
        onnx_dynamic=({0: "batch", 1: "seq"},) * 2, backends=("onnxruntime", "torch"),
        hf=HFModel(prefix=prefix, auto_class="AutoModel", path=path, head_in_model=False),
        extra={"hidden_size": int(config.hidden_size)},
    )


def _classifier_builder(auto_class: str, path: str, arg_names: tuple[str, ...], num_labels: int):
    def build(n: int | None = None) -> nn.Module:
        model, info = load_pretrained(auto_class, path)
        head = find_head(model, num_labels)
        _refuse_missing(path, info, head)
        if "input_ids" in arg_names:
            _set_pad_token_id(model.config, path)
        wrapped = HFClassifier(model, arg_names)
        if n:
            replace_head(wrapped, f"model.{head}", n)
        return wrapped.eval()

    return build


def _set_pad_token_id(config: Any, path: str) -> None:
    """Decoder classifiers (GPT-2, Llama ``ForSequenceClassification``) pool the last token that
    is not padding and refuse batches > 1 without ``config.pad_token_id``. When it is None, use
    the config's eos (the first, if several), else the tokenizer's pad or eos: the id
    `TextPreprocessor` right-pads with."""
    if getattr(config, "pad_token_id", None) is not None:
        return
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        tok = TextPreprocessor(path).tokenizer
        eos = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if eos is None:
        raise ConfigError(f"hf:{path}: config.json sets no pad_token_id or eos_token_id, and the tokenizer has "
                          "neither: a decoder classifier cannot tell padding in a batch")
    config.pad_token_id = int(eos)


def _labels(config: Any) -> tuple[str, ...]:
    id2label = getattr(config, "id2label", None) or {}
    return tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(int(config.num_labels)))


def _text_classification_spec(path: str, config: Any, meta: nn.Module, common: dict) -> BaseSpec:
    vocab = int(config.vocab_size)
    positions = _max_positions(config)
    auto = AUTO_CLASSES["text-classification"]
    return BaseSpec(
        **common, build=_classifier_builder(auto, path, ("input_ids", "attention_mask"), int(config.num_labels)),
        inputs=_text_inputs(vocab, positions), head="model." + find_head(meta, int(config.num_labels)), output="logits",
        labels=_labels(config), sample=_text_sample(vocab), raw_input="text",
        preprocessor=lambda max_length=None: TextPreprocessor(path, max_length=max_length, max_positions=positions),
        onnx_dynamic=({0: "batch", 1: "seq"},) * 2, backends=("onnxruntime", "torch"),
        hf=HFModel(prefix="model", auto_class=auto, path=path, head_in_model=True),
    )


def _image_spec(path: str, config: Any, meta: nn.Module, common: dict) -> BaseSpec:
    size = _image_size(Path(path), config)
    channels = int(getattr(config, "num_channels", 3))
    auto = AUTO_CLASSES["image-classification"]

    def sample(batch: int, seq: int) -> tuple[torch.Tensor]:
        gen = torch.Generator().manual_seed(batch * 1000 + 7)
        return (torch.randn(batch, channels, size, size, generator=gen),)

    return BaseSpec(
        **common, build=_classifier_builder(auto, path, ("pixel_values",), int(config.num_labels)),
        inputs=(TensorSpec("images", "FP32", (-1, channels, size, size)),), head="model." + find_head(meta, int(config.num_labels)),
        output="logits", labels=_labels(config), sample=sample, raw_input="image",
        preprocessor=lambda max_length=None: ImagePreprocessor(path),
        onnx_dynamic=({0: "batch"},), backends=("onnxruntime", "torch"),
        hf=HFModel(prefix="model", auto_class=auto, path=path, head_in_model=True, arg_names=("pixel_values",)),
    )


def _output_layer(path: str, meta: nn.Module) -> str:
    """The module name of a causal LM's vocabulary projection (``lm_head``, ``embed_out``)."""
    out = meta.get_output_embeddings()
    name = next((n for n, m in meta.named_modules() if m is out and n), None)
    if name is None or not isinstance(out, nn.Linear):
        raise ConfigError(f"hf:{path}: {type(meta).__name__} has no Linear output layer (get_output_embeddings)")
    return name


def _causal_lm_spec(path: str, config: Any, meta: nn.Module, common: dict) -> BaseSpec:
    vocab = int(config.vocab_size)
    positions = _max_positions(config)
    auto = AUTO_CLASSES["text-generation"]

    def build(num_labels: int | None = None) -> nn.Module:
        if num_labels:
            raise ConfigError(f"hf:{path}: a text-generation base answers over its vocabulary; "
                              f"it takes no {num_labels}-way task head")
        model, info = load_pretrained(auto, path)
        _refuse_missing(path, info, None)
        return HFClassifier(model, ("input_ids", "attention_mask")).eval()

    return BaseSpec(
        **common, build=build, inputs=_text_inputs(vocab, positions), head="model." + _output_layer(path, meta),
        output="logits", sample=_text_sample(vocab), raw_input="text",
        preprocessor=lambda max_length=None: TextPreprocessor(path, max_length=max_length, max_positions=positions),
        onnx_dynamic=({0: "batch", 1: "seq"},) * 2, backends=("torch",), task_head=False,
        hf=HFModel(prefix="model", auto_class=auto, path=path, head_in_model=True, peft_task_type="CAUSAL_LM"),
        extra={"hidden_size": int(config.hidden_size), "vocab_size": vocab, "max_positions": positions},
    )


# ------------------------------------------------------------------------------------------
# the registry: one spec builder per task

SPEC_BUILDERS: dict[str, Callable[[str, Any, nn.Module, dict], BaseSpec]] = {
    "feature-extraction": _feature_spec,
    "text-classification": _text_classification_spec,
    "image-classification": _image_spec,
    "text-generation": _causal_lm_spec,
}


def hf_spec(path: str | os.PathLike, *, task: str | None = None) -> BaseSpec:
    """The spec of a transformers model directory (checked; the model is loaded lazily). Its
    source is ``hf:<absolute path>@<task>`` however the path was given, so an adapter's
    recorded ``base_source`` resolves from any working directory."""
    p = check_model_dir(path)
    if task is not None and task not in SPEC_BUILDERS:
        raise ConfigError(f"unknown task {task!r}: valid tasks are {', '.join(TASKS)}")
    task = task or infer_task(p)
    tr = transformers_module()
    try:
        config = tr.AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"hf:{path}: unreadable config.json ({e})") from None
    path_s = str(p.resolve())
    with torch.device("meta"):  # module names (head, targets, prefix) without reading any weights
        try:
            meta = getattr(tr, AUTO_CLASSES[task]).from_config(config)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"hf:{path}: {type(config).__name__} has no {AUTO_CLASSES[task]} for task {task} ({e})") from None
    common = dict(name=p.resolve().name, source=f"hf:{path_s}@{task}", task=task,
                  default_targets=default_targets(meta, getattr(config, "model_type", None)),
                  description=f"{type(config).__name__.removesuffix('Config')} from {path_s} ({task})")
    return SPEC_BUILDERS[task](path_s, config, meta, common)
