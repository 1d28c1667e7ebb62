"""The base registry (DESIGN.md section 5): one source string -> one `BaseSpec`.

Every part reads the spec and nothing else names a base: the trainer (how to build it, what to
adapt, how to turn examples into inputs), the exporter (ONNX sample and dynamic axes, the
transformers model inside it), the engines (the head to tap, which backends serve it) and the
server (input and output tensor specs, preprocessing). The spec types themselves live in
`wara_train.spec` and are re-exported here, the one place callers import bases from.

Three kinds of source, resolved by `resolve_base`:

* a built-in name (``minilm``, ``effnet-lite0``: `wara_train.bases`);
* ``hf:PATH[@TASK]``: a transformers model directory on local disk (`wara_train.hf`);
* ``py:package.module:function``: a factory returning ``(model, spec)`` (see `from_factory`).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from typing import Callable

import torch.nn as nn

from .bases import BUILTINS
from .errors import ConfigError
from .hf import hf_spec
from .spec import TASKS, BaseSpec, HFModel, TensorSpec, replace_head

__all__ = ["RESOLVERS", "TASKS", "BaseSpec", "HFModel", "TensorSpec", "from_factory", "parse_source", "resolve_base"]


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
    factory = BUILTINS.get(target)
    if factory is None:
        raise ConfigError(f"unknown base {target!r}: use a built-in name ({', '.join(BUILTINS)}), "
                          "hf:PATH[@TASK] or py:package.module:function")
    return factory()


def _resolve_hf(target: str, task: str | None) -> BaseSpec:
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
