"""Finding target modules in any torch model and replacing them with WaRA layers."""

from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn as nn

from .config import WaraConfig
from .errors import ConfigError
from .layer import Path, WaraLayer, check_wrappable, is_adaptable, layer_shape, weight_matrix, wrap


def _matches(name: str, targets: tuple[str, ...] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _select(model: nn.Module, target_modules: tuple[str, ...] | str) -> list[tuple[str, bool]]:
    """``(name, adaptable)`` of every module ``target_modules`` selects, in model order
    (outermost only: the children of a selected layer are not selected again)."""
    if not target_modules:
        raise ConfigError("target_modules is empty: name the layers to adapt (names, suffixes or a regex)")
    selected: list[tuple[str, bool]] = []
    for name, module in model.named_modules():
        if isinstance(module, WaraLayer) or not name or not _matches(name, target_modules):
            continue
        if any(name.startswith(f + ".") for f, ok in selected if ok):
            continue
        selected.append((name, is_adaptable(module)))
    if not any(ok for _, ok in selected) and not (isinstance(target_modules, tuple) and selected):
        raise ConfigError(f"no nn.Linear, 1x1 nn.Conv2d or Conv1D module matches target_modules={target_modules!r}")
    if isinstance(target_modules, tuple):
        for t in target_modules:
            if not any(_matches(n, (t,)) for n, _ in selected):
                raise ConfigError(f"target module {t!r} matches no module of the model")
    return selected


def find_targets(model: nn.Module, target_modules: tuple[str, ...] | str) -> list[str]:
    """Full names of the modules selected by ``target_modules`` (exact names, name suffixes, or
    one regex matching the whole name), in model order. Errors name what did not match; named
    layers (not a regex's matches) that cannot take an adapter are refused, all listed."""
    selected = _select(model, target_modules)
    unsupported = [n for n, ok in selected if not ok]
    if unsupported and isinstance(target_modules, tuple):
        kinds = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in unsupported)
        raise ConfigError(f"target modules cannot take an adapter: {kinds}; "
                          "WaRA adapts nn.Linear, 1x1 stride-1 nn.Conv2d and Conv1D layers")
    return [n for n, ok in selected if ok]


def adaptable_layers(model: nn.Module, *, levels: int = 0, exclude: tuple[str, ...] = ()) -> list[str]:
    """The fallback targets: every adaptable layer (Linear, 1x1 Conv2d, Conv1D) whose dims are
    divisible by ``2**levels``, outside the modules in ``exclude`` (the task head). Raises
    `ConfigError` naming what the model has when none qualifies."""
    step = 1 << levels
    found, skipped = [], []
    for name, module in model.named_modules():
        if not name or isinstance(module, WaraLayer) or not is_adaptable(module):
            continue
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        m, n = layer_shape(module)
        (found if m % step == 0 and n % step == 0 else skipped).append(f"{name} ({m}x{n})")
    if not found:
        if skipped:
            raise ConfigError(f"no layer of the model has both dims divisible by 2^{levels} = {step}: "
                              f"{', '.join(skipped[:8])}{' ...' if len(skipped) > 8 else ''}")
        raise ConfigError("the model has no adaptable layer: WaRA adapts nn.Linear, 1x1 nn.Conv2d and Conv1D layers")
    return [f.rsplit(" (", 1)[0] for f in found]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model`` (the one module swap in the project)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: WaraConfig, *, seed: int | None = None) -> nn.Module:
    """Wrap every target module of ``model`` (in place) and freeze everything but the WaRA
    factors and ``modules_to_save``. Returns ``model``. Validates all targets before changing
    anything: every named layer that cannot take the adapter (its kind or its shape) is listed
    in one error. ``seed`` makes the A-factor init reproducible."""
    selected = _select(model, config.target_modules)
    if isinstance(config.target_modules, str):  # a regex adapts what it can among its matches
        selected = [(n, ok) for n, ok in selected if ok]
    targets = [n for n, ok in selected if ok]
    for name in config.modules_to_save:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"modules_to_save: the model has no module {name!r}") from None
    # Validate every target first, then wrap and swap them in: a bad config changes nothing.
    frozen_config = config.replace(target_modules=tuple(targets))
    refused: dict[str, list[str]] = {}  # reason -> every layer refused for it
    for name, _ in selected:
        try:
            check_wrappable(model.get_submodule(name), frozen_config)
        except ConfigError as e:
            refused.setdefault(str(e), []).append(name)
    if refused:
        count = sum(len(names) for names in refused.values())
        raise ConfigError(f"{count} target layer(s) cannot take this adapter, nothing was changed: "
                          + "; ".join(f"{', '.join(names)}: {reason}" for reason, names in refused.items()))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    wrappers = {}
    for name in targets:
        layer = wrap(model.get_submodule(name), frozen_config)
        if gen is not None:
            layer.reset_parameters(gen)
        wrappers[name] = layer
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in wrappers.items():
        set_submodule(model, name, layer)
        for p in list(layer.wara_A.values()) + list(layer.wara_B.values()):
            p.requires_grad_(True)
    for name in config.modules_to_save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.wara_config = frozen_config  # type: ignore[attr-defined]
    return model


def wara_layers(model: nn.Module) -> dict[str, WaraLayer]:
    """Every WaRA layer of ``model``, by the full name of the module it wraps."""
    return {name: m for name, m in model.named_modules() if isinstance(m, WaraLayer)}


def set_path(model: nn.Module, path: Path) -> None:
    """Switch every WaRA layer to the ``explicit``, ``folded`` or ``merged`` forward."""
    for layer in wara_layers(model).values():
        layer.set_path(path)


def trainable_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)


def base_weights(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The frozen base weight of each named module as an (m, n) matrix, whether or not it is
    wrapped yet."""
    out = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"the model has no module {name!r}") from None
        if isinstance(module, WaraLayer):
            out[name] = module.base_matrix()
        elif is_adaptable(module):
            out[name] = weight_matrix(module)
        else:
            raise ConfigError(f"module {name!r} is {type(module).__name__}, not an adaptable layer")
    return out
