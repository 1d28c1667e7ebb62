"""An adapter together with its base: which base (a spec), the base model, its task head.

Every export starts here. The base is resolved from the adapter (a built-in name, or the source
it was trained from) or given as ``--base SOURCE``; the model built from it is checked against
the adapter's fingerprint, never by name (a base may be served or exported under another name).
"""

from __future__ import annotations

import copy
import os
from typing import Mapping

import torch
import torch.nn as nn

from wara_train.artifact import WaraAdapter, check_compatible, load_adapter, load_saved_modules
from wara_train.basespec import BaseSpec, parse_source, resolve_base
from wara_train.errors import ConfigError
from wara_train.layer import is_conv1d, is_pointwise_conv

HEAD_FILE = "wara_head.safetensors"  # a task head that is not part of the transformers model


# The kinds of recorded source an export resolves on its own: a built-in name, or a model
# directory that transformers reads as data. A ``py:`` source is code: importing it because an
# artifact names it would run whatever the artifact points at, so it must be asked for.
AUTO_RESOLVED = ("builtin", "hf")


class RecordedFactoryError(ConfigError):
    """An artifact names a ``py:`` factory base, which is not imported without ``--base``."""


def resolve_recorded(source: str, *, what: str) -> BaseSpec:
    """The spec of a base ``source`` recorded in an artifact (``what`` names the artifact in
    errors): resolved only when it is a built-in name or ``hf:PATH``. A ``py:`` factory is never
    imported on an artifact's word: `RecordedFactoryError`, asking for ``--base py:...``."""
    if parse_source(source)[0] not in AUTO_RESOLVED:
        raise RecordedFactoryError(
            f"{what} was made on the factory base {source!r}; an artifact is data, so the code it names is "
            f"not imported on its word: pass --base {source} to run that factory")
    return resolve_base(source)


def resolve_adapter_base(adapter: WaraAdapter, source: str | None = None) -> BaseSpec:
    """The spec of the base ``adapter`` was trained on: ``source`` when given (any kind), else
    the built-in of its ``base_model`` name, else the ``base_source`` it recorded at training
    when that is a built-in name or ``hf:`` (`resolve_recorded`)."""
    from wara_train.bases import BUILTINS, get_base

    if source:
        return resolve_base(source)
    if adapter.base_model in BUILTINS:
        return get_base(adapter.base_model)
    what = f"adapter {adapter.content_hash[:19]}..."
    why = ""
    if adapter.base_source:
        try:
            return resolve_recorded(adapter.base_source, what=what)
        except RecordedFactoryError:
            raise
        except ConfigError as e:
            why = f" (it was trained from {adapter.base_source!r}, which does not resolve here: {e})"
    raise ConfigError(f"{what} was trained on base {adapter.base_model!r}, which is "
                      f"not built in{why}: pass --base SOURCE (hf:PATH[@TASK] or py:module:function)")


def saved_head(adapter: WaraAdapter, spec: BaseSpec) -> dict[str, torch.Tensor] | None:
    """The adapter's own copy of the spec's task head (weight, bias), if it saves one."""
    params = adapter.saved_modules.get(spec.head)
    return params if params and "weight" in params else None


def _head_outputs(model: nn.Module, head: str) -> int | None:
    try:
        module = model.get_submodule(head)
    except AttributeError:  # e.g. a feature extractor's classifier is None
        return None
    return int(module.weight.shape[0]) if isinstance(module, nn.Linear) else None


def build_with_head(spec: BaseSpec, num_labels: int | None) -> nn.Module:
    """A fresh base whose task head has ``num_labels`` outputs (the base's own head when it
    already has that many; None: the base as it is)."""
    if num_labels is None:
        return spec.build(None)
    if spec.labels is not None:  # the base's own head size is known without building it
        return spec.build(None if len(spec.labels) == num_labels else num_labels)
    if spec.output == "embeddings":  # a feature extractor: no head of its own
        return spec.build(num_labels)
    base = spec.build(None)
    return base if _head_outputs(base, spec.head) == num_labels else spec.build(num_labels)


def base_for(adapter: WaraAdapter, spec: BaseSpec | None = None) -> nn.Module:
    """A fresh base model for ``adapter`` (its head sized by the head the adapter saves),
    checked against the adapter's fingerprint. ``spec``: default `resolve_adapter_base`."""
    spec = spec or resolve_adapter_base(adapter)
    head = saved_head(adapter, spec)
    base = build_with_head(spec, int(head["weight"].shape[0]) if head is not None else None)
    check_compatible(adapter, base)
    return base


def load_with_base(path: str | os.PathLike, source: str | None = None) -> tuple[WaraAdapter, BaseSpec, nn.Module]:
    """Read an adapter directory and build the base it fits: ``(adapter, spec, base)``."""
    adapter = load_adapter(path)
    spec = resolve_adapter_base(adapter, source)
    return adapter, spec, base_for(adapter, spec)


def with_saved_modules(base: nn.Module, adapter: WaraAdapter) -> nn.Module:
    """A deep copy of ``base`` with the adapter's modules_to_save (its task head) loaded: the
    base model as this adapter's task sees it. ``base`` is left unchanged."""
    return load_saved_modules(copy.deepcopy(base), adapter.saved_modules).eval()


def conv_targets(adapter: WaraAdapter, base: nn.Module) -> set[str]:
    """The adapter's targets that are pointwise ``nn.Conv2d`` layers of ``base``."""
    return {m for m in adapter.config.target_modules if is_pointwise_conv(base.get_submodule(m))}


def conv1d_targets(adapter: WaraAdapter, base: nn.Module) -> set[str]:
    """The adapter's targets that are transposed ``Conv1D`` layers (GPT-2 family) of ``base``."""
    return {m for m in adapter.config.target_modules if is_conv1d(base.get_submodule(m))}


# ------------------------------------------------------------------------------------------
# transformers models as the spec's served module (for exports the ecosystem loads)


def hf_name(spec: BaseSpec, name: str) -> str:
    """Our module name -> the transformers model's own (``<prefix>.<name>`` -> ``<name>``)."""
    prefix = spec.hf.prefix if spec.hf else ""
    if not prefix:
        return name
    if not name.startswith(prefix + "."):
        raise ConfigError(f"module {name!r} is outside the transformers model {prefix!r} of base {spec.name!r}")
    return name[len(prefix) + 1 :]


def hf_module(spec: BaseSpec, model: nn.Module) -> nn.Module:
    """The transformers model inside a module built like the spec's (at ``spec.hf.prefix``)."""
    if spec.hf is None:
        raise ConfigError(f"base {spec.name!r} is not a transformers model")
    return model.get_submodule(spec.hf.prefix) if spec.hf.prefix else model


def load_hf(spec: BaseSpec, path: str | os.PathLike, *, num_labels: int | None = None) -> nn.Module:
    """``<auto_class>.from_pretrained(path)`` (offline), with a ``num_labels``-way head if given."""
    from wara_train.hf import load_pretrained

    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
    return load_pretrained(spec.hf.auto_class, str(path), **kwargs)[0]


def served_from_hf(spec: BaseSpec, model: nn.Module, head: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Wrap a transformers model as the spec's served module: called with the spec's inputs in
    order, answering as the spec's model does. ``head``: the weight and bias of a task head on
    the pooled features of a feature-extraction base."""
    from wara_train.hf import HFClassifier, PooledEncoder

    if spec.hf.head_in_model:
        return HFClassifier(model, spec.hf.arg_names).eval()
    if spec.hf.prefix == "":
        raise ConfigError(f"base {spec.name!r}: a feature-extraction model needs a prefix to sit under")
    num_labels = int(head["weight"].shape[0]) if head is not None else None
    served = PooledEncoder(model, num_labels, attr=spec.hf.prefix)
    if head is not None:
        served.classifier.load_state_dict(dict(head))
    return served.eval()


def read_head(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The task head written beside an export (`HEAD_FILE`), if there is one."""
    from safetensors.torch import load_file

    f = os.path.join(path, HEAD_FILE)
    return load_file(f) if os.path.isfile(f) else None


def write_head(path: str | os.PathLike, head: Mapping[str, torch.Tensor], *, labels: list[str] | None) -> None:
    """Write a task head applied to mean-pooled features as `HEAD_FILE` (weight, bias)."""
    import json

    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.items()}
    save_file(tensors, os.path.join(path, HEAD_FILE),
              metadata={"format": "wara-head", "applies_to": "masked mean of last_hidden_state",
                        "labels": json.dumps(labels)})
