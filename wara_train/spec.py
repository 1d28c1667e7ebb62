"""What a base model is, as data: `BaseSpec`, the `TensorSpec` of each input and `HFModel`.

The model contract: ``model(*inputs)`` takes the tensors of ``spec.inputs`` in order and returns
``head(features)``, where ``spec.head`` names the final ``nn.Linear`` (the task head). Replace the
head by an identity and the model returns its features, which is how the engines give every row
its own adapter's head. A text-generation base (a causal LM) takes ``input_ids`` and
``attention_mask`` (B, T) and returns next-token logits (B, T, vocab): its head is the
vocabulary projection, applied to every position's features.

The sources that make specs (built-ins, ``hf:``, ``py:``) import this module; the registry that
picks among them is `wara_train.basespec`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn as nn

from .errors import ConfigError
from .model import set_submodule

TASKS: tuple[str, ...] = ("feature-extraction", "text-classification", "image-classification", "text-generation")
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
    ``arg_names``: the keywords the transformers model takes the spec's inputs as, in order;
    ``peft_task_type``: the ``task_type`` a peft LoRA of it records (``CAUSAL_LM`` gives
    ``PeftModelForCausalLM``, with ``generate``), None for a plain ``PeftModel``."""

    prefix: str
    auto_class: str
    path: str
    head_in_model: bool
    arg_names: tuple[str, ...] = ("input_ids", "attention_mask")
    peft_task_type: str | None = None


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
    # True: ``head`` is a task head an adapter may replace by a fresh n-way one and trains (saved
    # as modules_to_save). False: it is the base's own output layer (a language model's
    # vocabulary projection, often tied to its embeddings), never replaced, trained or saved.
    task_head: bool = True
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


def replace_head(model: nn.Module, head: str, num_labels: int) -> None:
    """Swap the model's head Linear for a fresh ``num_labels``-way one (seeded by the caller)."""
    old = model.get_submodule(head)
    set_submodule(model, head, nn.Linear(old.in_features, num_labels, bias=old.bias is not None))
