"""Merge one adapter (or a weighted blend of several) into a copy of the base weights.

``W = W0 + Σ_i w_i ΔW_i``, summed in float32 from the pristine base by
`wara_train.layer.merged_weight` (the one merge in the project) and cast once; the base model
passed in is never modified. The result uses the base model's own parameter names.

On disk (`save_merged`), a base that is a transformers model gives a complete transformers model
directory (``<AutoModel*>.from_pretrained(dir)`` loads it, tokenizer or image-processor files
included); any other base gives ``model.safetensors`` of our module plus ``config.json``. Both
carry ``wara_merged.json``: what was merged, from which adapters, with which weights, and the
labels. A classification model's config.json names its labels (``id2label``); a feature
extractor's does not (``AutoModelForSequenceClassification`` would then build a random head):
the head an adapter trained on its pooled features is ``wara_head.safetensors``, its labels in
that file's metadata and in ``wara_merged.json``. The directory appears only once complete.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from wara_train.artifact import WaraAdapter, check_compatible
from wara_train.basespec import BaseSpec
from wara_train.errors import ConfigError
from wara_train.layer import merged_weight

from .common import (HEAD_FILE, build_with_head, hf_module, load_hf, read_head, resolve_recorded, saved_head,
                     served_from_hf, write_head)
from .staging import staged_dir

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INFO_FILE = "wara_merged.json"
FORMAT = "wara-merged"
# The preprocessing files of a transformers model directory, copied beside the merged weights.
PREPROCESSING_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                       "vocab.txt", "vocab.json", "merges.txt", "preprocessor_config.json", "chat_template.jinja",
                       "chat_template.json")
# Files an earlier export into the same directory may have left that this one might not write.
STALE_FILES = (HEAD_FILE, "model*.safetensors", "model.safetensors.index.json")


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
    base: nn.Module, adapters: Sequence[tuple[WaraAdapter, float]], *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The base model's state dict with every targeted weight replaced by ``W0 + Σ w_i ΔW_i``
    and modules_to_save taken from the adapters. Float32 math, one cast to ``dtype`` (default:
    each tensor's own). ``base`` is left bit-identical; every adapter is checked against it."""
    if not adapters:
        raise ConfigError("merge needs at least one adapter")
    for adapter, _ in adapters:
        check_compatible(adapter, base)
    deltas: dict[str, torch.Tensor] = {}
    for adapter, weight in adapters:
        for mod in adapter.config.target_modules:
            d = weight * adapter.delta_weight(mod)
            deltas[mod] = deltas[mod] + d if mod in deltas else d
    replaced = {f"{mod}.weight": merged_weight(base.get_submodule(mod), d) for mod, d in deltas.items()}
    replaced.update(_blend_saved_modules(adapters))
    state = base.state_dict()
    missing = sorted(set(replaced) - set(state))
    if missing:
        raise ConfigError(f"tensors {missing[:4]} have no place in the base model")
    return {k: replaced.get(k, v.detach()).to(dtype or v.dtype).contiguous() for k, v in state.items()}


def merged_model(base: nn.Module, adapters: Sequence[tuple[WaraAdapter, float]], **kwargs: Any) -> nn.Module:
    """A deep copy of ``base`` carrying the merged weights (a plain model, no WaRA layers)."""
    model = copy.deepcopy(base)
    model.load_state_dict(merged_state_dict(base, adapters, **kwargs))
    return model.eval()


# ------------------------------------------------------------------------------------------
# on disk


def save_merged(
    base: nn.Module,
    adapters: Sequence[tuple[WaraAdapter, float]],
    out_dir: str | os.PathLike,
    *,
    spec: BaseSpec,
    dtype: str = "float32",
    sources: Sequence[str] | None = None,
) -> Path:
    """Merge ``adapters`` into a copy of ``base`` and write it to ``out_dir`` (see the module
    docstring); ``sources`` names each adapter in the provenance (its content hash is always there).
    Atomic (`exporter.staging`): an export that fails leaves ``out_dir`` as it was."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: valid values are {', '.join(DTYPES)}")
    names = [str(s) for s in sources] if sources is not None else [None] * len(adapters)
    if len(names) != len(adapters):
        raise ConfigError(f"{len(names)} source names for {len(adapters)} adapters")
    model = merged_model(base, adapters)  # float32: cast once, when written
    first = adapters[0][0]
    head = saved_head(first, spec)
    info: dict[str, Any] = {
        "format": FORMAT,
        "base_model": spec.name,
        "base_source": spec.source,
        "task": spec.task,
        "labels": first.labels,
        "dtype": dtype,
        "sources": [{"adapter": n, "content_hash": a.content_hash, "weight": w} for n, (a, w) in zip(names, adapters)],
    }
    with staged_dir(out_dir, stale=STALE_FILES, last=(INFO_FILE,)) as stage:
        if spec.hf is not None:
            info.update(_save_transformers(model, spec, stage, labels=first.labels, has_head=head is not None,
                                           dtype=DTYPES[dtype]))
        else:
            from safetensors.torch import save_file

            state = {k: v.detach().to(DTYPES[dtype]).clone().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(stage / "model.safetensors"), metadata={"format": "pt"})
            info["layout"] = "module"
            (stage / "config.json").write_text(json.dumps(info, indent=2) + "\n")
        (stage / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return Path(out_dir)


def _save_transformers(model: nn.Module, spec: BaseSpec, out: Path, *, labels: list[str] | None, has_head: bool,
                       dtype: torch.dtype) -> dict[str, Any]:
    """Write the transformers model inside ``model`` with ``save_pretrained``, plus the base
    directory's preprocessing files; returns what the provenance should add."""
    hf = hf_module(spec, model)
    if not spec.hf.head_in_model:
        # Our encoder may lack parts the user's model has (BERT's unused pooler): complete it
        # from the original directory, so the merged directory is the whole model.
        full = load_hf(spec, spec.hf.path)
        result = full.load_state_dict(hf.state_dict(), strict=False)
        if result.unexpected_keys:
            raise ConfigError(f"internal: merged tensors {result.unexpected_keys[:3]} have no place in "
                              f"{type(full).__name__} from {spec.hf.path}")
        hf = full
    hf = hf.to(dtype)
    extra: dict[str, Any] = {"layout": "transformers", "auto_class": spec.hf.auto_class}
    # A classifier's head names its labels; a language model's vocabulary head has none.
    labelled = spec.hf.head_in_model and spec.task_head
    head = model.get_submodule(spec.head) if (labelled or has_head) else None
    if head is not None and labelled:
        # Only a head inside the transformers model names its labels in config.json: on a
        # feature extractor (AutoModel) they would invite AutoModelForSequenceClassification,
        # which would build a random head of its own. Its labels go beside HEAD_FILE instead.
        k = int(head.weight.shape[0])
        names = list(labels) if labels and len(labels) == k else [f"LABEL_{i}" for i in range(k)]
        hf.config.id2label = dict(enumerate(names))
        hf.config.label2id = {n: i for i, n in enumerate(names)}
    hf.save_pretrained(str(out))
    for f in Path(spec.hf.path).iterdir():
        if f.is_file() and (f.name in PREPROCESSING_FILES or f.suffix == ".model"):
            shutil.copyfile(f, out / f.name)
    if head is not None and not spec.hf.head_in_model:
        write_head(out, head.state_dict(), labels=labels)
        extra["head"] = {
            "file": HEAD_FILE,
            "applies_to": "the masked mean of last_hidden_state over attention_mask",
            "labels": labels,
            "note": (f"{spec.hf.auto_class} has no head of its own and transformers' sequence-classification "
                     "models pool differently (BERT: tanh pooler on the first token), so the adapter's head "
                     f"is {HEAD_FILE} (weight, bias): logits = mean_pool(model(...).last_hidden_state) @ weight.T + bias"),
        }
    return extra


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance of a merged directory (``wara_merged.json``, or an older ``config.json``)."""
    path = Path(path)
    for name in (INFO_FILE, "config.json"):
        try:
            info = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and info.get("format") == FORMAT:
            return info
    raise ConfigError(f"{path}: not a merged model directory (no {INFO_FILE})")


def load_merged(path: str | os.PathLike, spec: BaseSpec | None = None) -> nn.Module:
    """A merged directory back as a module called like the spec's model (float32). A
    transformers directory is loaded with its ``AutoModel*`` class, wrapped as the spec's served
    module; any other is loaded into a fresh base. ``spec``: default the recorded base source."""
    from safetensors.torch import load_file

    path = Path(path)
    info = read_info(path)
    spec = spec or resolve_recorded(info["base_source"], what=f"merged directory {path}")
    if info.get("layout") == "transformers":
        if spec.hf is None:
            raise ConfigError(f"{path} is a transformers model, but base {spec.name!r} is not a transformers base")
        return served_from_hf(spec, load_hf(spec, path).float(), read_head(path))
    try:
        state = load_file(str(path / "model.safetensors"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable model.safetensors ({e})") from None
    head = state.get(f"{spec.head}.weight")
    model = build_with_head(spec, int(head.shape[0]) if head is not None else None)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()
