"""Base models as data (DESIGN.md section 5): one `BaseSpec` per base, one registry for all.

Every part reads the spec and nothing else names a base: the trainer (how to build it, what to
adapt, how to turn examples into inputs), the exporter (ONNX sample and dynamic axes, the
transformers model inside it), the engines (the head to tap, which backends serve it) and the
server (input and output tensor specs, preprocessing).

Three kinds of source, resolved by `resolve_base`:

* a built-in name (``minilm``, ``effnet-lite0``: `wara_train.bases`);
* ``hf:PATH[@TASK]``: a transformers model directory on local disk (`wara_train.hf`);
* ``py:package.module:function``: a factory returning ``(model, spec)`` (see `from_factory`).

The model contract: ``model(*inputs)`` takes the tensors of ``spec.inputs`` in order and returns
``head(features)``, where ``spec.head`` names the final ``nn.Linear`` (the task head). Replace the
head by an identity and the model returns its features, which is how the engines give every row
its own adapter's head.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn as nn

from .errors import ConfigError

TASKS: tuple[str, ...] = ("feature-extraction", "text-classification", "image-classification")
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime")
DATATYPES: tuple[str, ...] = ("FP32", "FP16", "FP64", "INT64", "INT32", "BYTES")
Output = Literal["embeddings", "logits"]
RawKind = Literal["text", "image"]
RAW_INPUTS: dict[str, str] = {"text": "text", "image": "image_bytes"}  # raw kind -> wire name (BYTES)


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: a KServe v2 name, datatype and shape (-1: any size).

    ``min_dims`` / ``max_dims`` bound the dynamic axes (None: unbounded), ``value_range``
    bounds integer values as ``[low, high)`` (token ids: ``[0, vocab_size)``)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    min_dims: tuple[int | None, ...] = ()
    max_dims: tuple[int | None, ...] = ()
    value_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ConfigError(f"tensor {self.name!r}: unknown datatype {self.datatype!r}; valid: {', '.join(DATATYPES)}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        for bounds in (self.min_dims, self.max_dims):
            if bounds and len(bounds) != len(self.shape):
                raise ConfigError(f"tensor {self.name!r}: dim bounds {bounds} do not match its shape {self.shape}")


@dataclass(frozen=True)
class HFModel:
    """Where a base's transformers model sits, for exports the ecosystem loads.

    ``prefix``: the dotted path of the transformers model inside the served module ('' when it
    is the module itself), so ``<prefix>.<name>`` of ours is ``<name>`` in transformers (peft
    target names, merged state-dict keys). ``auto_class`` loads a merged directory back;
    ``path`` holds its config, tokenizer or image-processor files; ``head_in_model``: the task
    head is part of the transformers model (a classification model) rather than ours;
    ``arg_names``: the keywords the transformers model takes the spec's inputs as, in order."""

    prefix: str
    auto_class: str
    path: str
    head_in_model: bool
    arg_names: tuple[str, ...] = ("input_ids", "attention_mask")


Preprocessor = Callable[[Sequence[Any]], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class BaseSpec:
    """Everything the project needs to know about one base model."""

    name: str  # the served name; adapters record it as their base_model
    source: str  # how it was given: a built-in name, hf:PATH@TASK, py:module:function
    task: str  # one of TASKS, or "custom" for factory bases
    build: Callable[[int | None], nn.Module]  # a fresh base; with n, a fresh n-way task head
    inputs: tuple[TensorSpec, ...]  # what model(*inputs) takes, in order
    head: str  # module name of the task head (a Linear); features are its input
    output: Output  # what the base itself answers with: normalised embeddings, or its logits
    sample: Callable[[int, int], tuple[torch.Tensor, ...]]  # (batch, seq) -> ONNX sample inputs
    default_targets: tuple[str, ...] | str | None = None  # None: every adaptable layer
    labels: tuple[str, ...] | None = None  # the base head's label names, if any
    raw_input: RawKind | None = None  # "text": the server tokenizes; "image": it decodes images
    preprocessor: Callable[..., Preprocessor] | None = None  # (max_length=...) -> raw examples -> inputs
    onnx_dynamic: tuple[dict[int, str], ...] = ()  # per input: axis -> name of a dynamic ONNX axis
    backends: tuple[str, ...] = ("torch",)  # supported engines, preferred first on CPU
    hf: HFModel | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError("a base needs a non-empty name")
        if self.task not in TASKS + ("custom",):
            raise ConfigError(f"unknown task {self.task!r}: valid tasks are {', '.join(TASKS)}")
        if not self.inputs:
            raise ConfigError(f"base {self.name!r}: inputs is empty; name the tensors model(*inputs) takes")
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or not self.backends:
            raise ConfigError(f"base {self.name!r}: unknown backends {bad}; valid: {', '.join(BACKENDS)}")
        if self.output not in ("embeddings", "logits"):
            raise ConfigError(f"base {self.name!r}: output must be 'embeddings' or 'logits', got {self.output!r}")
        if self.raw_input is not None and self.raw_input not in RAW_INPUTS:
            raise ConfigError(f"base {self.name!r}: raw_input must be one of {', '.join(RAW_INPUTS)}, got {self.raw_input!r}")
        if self.raw_input is not None and self.preprocessor is None:
            raise ConfigError(f"base {self.name!r}: raw_input {self.raw_input!r} needs a preprocessor")

    def with_name(self, name: str) -> "BaseSpec":
        return dataclasses.replace(self, name=name)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def raw_spec(self) -> TensorSpec | None:
        """The BYTES input the server preprocesses itself (``text`` or ``image_bytes``)."""
        return TensorSpec(RAW_INPUTS[self.raw_input], "BYTES", (-1,)) if self.raw_input else None


# ------------------------------------------------------------------------------------------
# sources


def parse_source(source: str) -> tuple[str, str, str | None]:
    """``(kind, target, task)``: kind "builtin" | "hf" | "py". An ``@TASK`` suffix is split off
    hf sources; an unknown task is refused here, naming the valid ones."""
    if not isinstance(source, str) or not source:
        raise ConfigError("a base source must be a built-in name, hf:PATH[@TASK] or py:module:function")
    if source.startswith("hf:"):
        path, task = source[3:], None
        if "@" in path:
            path, task = path.rsplit("@", 1)
            if task not in TASKS:
                raise ConfigError(f"unknown task {task!r} in {source!r}: valid tasks are {', '.join(TASKS)}")
        if not path:
            raise ConfigError(f"{source!r}: hf: needs a model directory, hf:PATH[@TASK]")
        return "hf", path, task
    if source.startswith("py:"):
        target = source[3:]
        if target.count(":") != 1 or not all(target.split(":")):
            raise ConfigError(f"{source!r}: a factory base is py:package.module:function")
        return "py", target, None
    return "builtin", source, None


def _resolve_builtin(target: str, task: str | None) -> BaseSpec:
    if task is not None:
        raise ConfigError(f"built-in base {target!r} has a fixed task; --task/@TASK is for hf: sources")
    from .bases import BUILTINS

    factory = BUILTINS.get(target)
    if factory is None:
        raise ConfigError(f"unknown base {target!r}: use a built-in name ({', '.join(BUILTINS)}), "
                          "hf:PATH[@TASK] or py:package.module:function")
    return factory()


def _resolve_hf(target: str, task: str | None) -> BaseSpec:
    from .hf import hf_spec

    return hf_spec(target, task=task)


def _resolve_py(target: str, task: str | None) -> BaseSpec:
    if task is not None:
        raise ConfigError(f"factory base py:{target} has its own task; --task/@TASK is for hf: sources")
    return from_factory(target, source=f"py:{target}")


RESOLVERS: dict[str, Callable[[str, str | None], BaseSpec]] = {
    "builtin": _resolve_builtin,
    "hf": _resolve_hf,
    "py": _resolve_py,
}


def resolve_base(source: str, *, task: str | None = None, name: str | None = None) -> BaseSpec:
    """The spec for a base source (see the module docstring). ``task`` applies to hf sources
    (an ``@TASK`` suffix wins); ``name`` renames the base (the default: the built-in's name, the
    directory's name, the factory function's name)."""
    kind, target, suffix_task = parse_source(source)
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: valid tasks are {', '.join(TASKS)}")
    spec = RESOLVERS[kind](target, suffix_task or task)
    return spec.with_name(name) if name else spec


def from_factory(target: str, *, source: str) -> BaseSpec:
    """``package.module:function`` -> its spec. The function returns ``(model, spec)``: the
    plain base model and a `BaseSpec` for it whose ``build`` may be None, in which case every
    build is a deep copy of ``model`` (with a fresh n-way Linear head when asked for one).
    Whatever the user's module or function raises becomes a `ConfigError` naming ``source``."""
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{source!r}: cannot import {module_name!r} ({e})") from None
    except Exception as e:  # a bug in the user's module: name the source, keep the cause
        raise ConfigError(f"{source!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from e
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"{source!r}: {module_name} has no function {func_name!r}")
    try:
        made = func()
    except Exception as e:
        raise ConfigError(f"{source!r}: the factory {func_name}() raised {type(e).__name__}: {e}") from e
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module) and isinstance(made[1], BaseSpec)):
        raise ConfigError(f"{source!r}: the factory must return (model, BaseSpec), got {type(made).__name__}")
    model, spec = made
    model.eval()
    if spec.build is None:
        spec = dataclasses.replace(spec, build=copying_builder(model, spec.head))
    return dataclasses.replace(spec, source=source)


def copying_builder(model: nn.Module, head: str) -> Callable[[int | None], nn.Module]:
    """A ``build`` that deep-copies ``model``, giving it a fresh n-way Linear head on request."""

    def build(num_labels: int | None = None) -> nn.Module:
        fresh = copy.deepcopy(model).eval()
        if num_labels:
            replace_head(fresh, head, num_labels)
        return fresh

    return build


def replace_head(model: nn.Module, head: str, num_labels: int) -> None:
    """Swap the model's head Linear for a fresh ``num_labels``-way one (seeded by the caller)."""
    from .model import set_submodule

    old = model.get_submodule(head)
    set_submodule(model, head, nn.Linear(old.in_features, num_labels, bias=old.bias is not None))
