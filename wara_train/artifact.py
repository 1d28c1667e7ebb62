"""The adapter artifact (DESIGN.md section 3): save, load-and-validate, apply.

A directory with ``adapter_config.json`` and ``adapter_model.safetensors``:

* ``<module>.wara_A.<block>`` (r, n_s) and ``<module>.wara_B.<block>`` (m_s, r), blocks named
  ``a{J}``, ``h{j}``, ``v{j}``, ``d{j}``;
* ``<module>.<param>`` full tensors for each of ``modules_to_save``.

`load_adapter` checks everything that can be checked without a base model; `check_compatible`
checks the rest against one (shapes, fingerprint). Nothing is changed until both pass. The files
themselves are read, size-checked and header-checked by `wara_train.artifact_files`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .artifact_files import (CONFIG_NAME, MAX_CONFIG_BYTES, MAX_HEADER_BYTES, MAX_WEIGHTS_BYTES, WEIGHTS_NAME,
                             check_safetensors_header, read_artifact_files)
from .artifact_files import path_inside  # noqa: F401  (re-exported: the server's adapter root checks paths with it)
from .config import FORMAT, FORMAT_VERSION, WaraConfig
from .delta import delta_weight, fold, fold_many
from .errors import AdapterError, ConfigError, IncompatibleAdapterError
from .layer import WaraLayer
from .model import base_weights, inject, wara_layers
from .wavelets import blocks


def fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the targeted base weights (name, shape, float32 bytes), sorted by name, so an
    adapter is never applied to a different base."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(w.shape)};".encode())
        h.update(w.numpy().tobytes())
    return "sha256:" + h.hexdigest()


@dataclass
class WaraAdapter:
    """A validated adapter, independent of any model instance."""

    config: WaraConfig  # target_modules: the full module names
    base_model: str
    base_fingerprint: str
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # module -> block -> (A, B)
    saved_modules: dict[str, dict[str, torch.Tensor]]  # module -> param name -> tensor
    labels: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    base_source: str | None = None  # how the base was given at training (a hint for exports)

    def shape(self, module: str) -> tuple[int, int]:
        """The (m, n) of the base layer, read off the level-1 detail factors."""
        return _layer_shape(self.factors[module])

    def _float_factors(self, module: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {blk: (a.float(), b.float()) for blk, (a, b) in self.factors[module].items()}

    def delta_weight(self, module: str) -> torch.Tensor:
        """ΔW of one adapted module, float32, shape (m, n)."""
        return delta_weight(self._float_factors(module), shape=self.shape(module), spec=self.config.spec,
                            scale=self.config.scale)

    def folded(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The equivalent LoRA pair (lora_A (R, n), lora_B (m, R)) of one module, float32."""
        return fold(self._float_factors(module), shape=self.shape(module), spec=self.config.spec,
                    scale=self.config.scale)

    def folded_all(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`folded` for every target module, in a few batched cascades (the load-time path)."""
        return fold_many({t: (self._float_factors(t), self.shape(t)) for t in self.config.target_modules},
                         spec=self.config.spec, scale=self.config.scale)


# ------------------------------------------------------------------------------------------
# save


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    base_model: str,
    labels: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    base_fingerprint: str | None = None,
    base_source: str | None = None,
) -> Path:
    """Write the WaRA factors (and ``modules_to_save``) of an injected ``model`` to ``out_dir``.

    ``base_fingerprint``: a value from `fingerprint` computed earlier for this same model (it
    hashes ~85 MB for MiniLM); callers writing many adapters of one model pass it once."""
    from safetensors.torch import save_file

    layers = wara_layers(model)
    config: WaraConfig | None = getattr(model, "wara_config", None)
    if not layers or config is None:
        raise ConfigError("the model has no WaRA layers: call inject(model, config) first")
    dtype = getattr(torch, config.dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for blk in layer.wara_A:
            tensors[f"{name}.wara_A.{blk}"] = layer.wara_A[blk].detach().to("cpu", dtype).contiguous()
            tensors[f"{name}.wara_B.{blk}"] = layer.wara_B[blk].detach().to("cpu", dtype).contiguous()
    for mod in config.modules_to_save:
        for pname, p in model.get_submodule(mod).state_dict().items():
            tensors[f"{mod}.{pname}"] = p.detach().to("cpu").contiguous()
    cfg = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **config.to_dict(),
        "target_modules": list(layers),
        "base_model": base_model,
        "base_fingerprint": base_fingerprint or fingerprint(base_weights(model, layers)),
        **({"base_source": base_source} if base_source and base_source != base_model else {}),
        "labels": list(labels) if labels is not None else None,
        **({"extra": dict(extra)} if extra else {}),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Write beside, then rename: a reader never sees half an artifact.
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": FORMAT})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        os.replace(os.path.join(tmp, WEIGHTS_NAME), out / WEIGHTS_NAME)
        os.replace(os.path.join(tmp, CONFIG_NAME), out / CONFIG_NAME)
    return out


# ------------------------------------------------------------------------------------------
# load + validate (no model needed)


def adapter_from_files(files: Mapping[str, bytes], *, source: str = "adapter") -> WaraAdapter:
    """Validate an artifact given as ``{file name: contents}`` (a directory read, or the files
    a RepositoryModelLoad request sends), in memory."""
    missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if f not in files]
    if missing:
        raise AdapterError(f"{source}: adapter files missing: {', '.join(missing)} (send both {CONFIG_NAME} and {WEIGHTS_NAME})")
    return adapter_from_bytes(files[CONFIG_NAME], files[WEIGHTS_NAME], source=source,
                              header=getattr(files, "header", None))


def load_adapter(path: str | os.PathLike) -> WaraAdapter:
    """Read and validate an artifact directory. Raises `AdapterError` naming the problem."""
    return adapter_from_files(read_artifact_files(path), source=str(path))


def adapter_from_bytes(config_bytes: bytes, weights_bytes: bytes, *, source: str = "adapter",
                       header: dict | None = None) -> WaraAdapter:
    """Validate an artifact given as the contents of its two files (what RepositoryModelLoad
    sends, or `load_adapter` read). Errors start with ``source``. ``header``: the weights
    header as `check_safetensors_header` returned it for these very bytes (not checked again)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{source}: {CONFIG_NAME} is {len(config_bytes)} bytes, larger than the {MAX_CONFIG_BYTES}-byte limit")
    if len(weights_bytes) > MAX_WEIGHTS_BYTES:
        raise AdapterError(f"{source}: {WEIGHTS_NAME} is {len(weights_bytes)} bytes, over the {MAX_WEIGHTS_BYTES}-byte limit")
    try:
        raw = json.loads(config_bytes.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{source}: {CONFIG_NAME} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{source}: {CONFIG_NAME}: expected a JSON object")
    if raw.get("format") != FORMAT:
        raise AdapterError(f"{source}: format is {raw.get('format')!r}, expected {FORMAT!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise AdapterError(
            f"{source}: format_version {raw.get('format_version')!r} is not supported (this build reads {FORMAT_VERSION})"
        )
    for key in ("base_model", "base_fingerprint", "target_modules", "rank", "alpha", "wavelet", "mode", "levels"):
        if key not in raw:
            raise AdapterError(f"{source}: {CONFIG_NAME} is missing the key {key!r}")
    if not isinstance(raw["target_modules"], list) or not raw["target_modules"]:
        raise AdapterError(f"{source}: target_modules must be a non-empty list of full module names")
    try:
        config = WaraConfig.from_dict(raw)
    except (ConfigError, TypeError) as e:
        raise AdapterError(f"{source}: {e}") from None
    labels = raw.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise AdapterError(f"{source}: labels must be a list of strings")
    if header is None:
        header = check_safetensors_header(
            weights_bytes[:8 + min(int.from_bytes(weights_bytes[:8], "little"), MAX_HEADER_BYTES)],
            len(weights_bytes), source=source)
    finite = _all_finite(weights_bytes, header)
    try:
        tensors = load_safetensors(weights_bytes)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise AdapterError(f"{source}: {WEIGHTS_NAME} is an unreadable safetensors file (truncated or corrupt?): {e}") from None

    factors, saved = _split_tensors(source, tensors, config, finite_checked=finite)
    return WaraAdapter(
        config=config,
        base_model=str(raw["base_model"]),
        base_fingerprint=str(raw["base_fingerprint"]),
        factors=factors,
        saved_modules=saved,
        labels=labels,
        extra=raw.get("extra") or {},
        base_source=raw.get("base_source") if isinstance(raw.get("base_source"), str) else None,
        content_hash="sha256:" + hashlib.sha256(config_bytes + weights_bytes).hexdigest(),
    )


def _layer_shape(blocks_: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int]:
    # h1 = (D_1 rows, A_1 cols) and v1 = (A_1 rows, D_1 cols): both halves of the layer.
    return 2 * blocks_["h1"][1].shape[0], 2 * blocks_["v1"][0].shape[1]


def _all_finite(weights_bytes: bytes, header: dict) -> bool:
    """True when every tensor of a safetensors file is float32 and its whole data region is
    finite, checked in one pass (the usual adapter); False means: check tensor by tensor."""
    import numpy as np

    entries = [v for k, v in header.items() if k != "__metadata__"]
    if not entries or any(v["dtype"] != "F32" for v in entries):
        return False
    start = 8 + int.from_bytes(weights_bytes[:8], "little")  # the header checked that the data follows it
    data = np.frombuffer(weights_bytes, dtype=np.uint8, offset=start)
    return data.size % 4 == 0 and bool(np.isfinite(data.view(np.float32)).all())


def _split_tensors(source: str, tensors: dict[str, torch.Tensor], config: WaraConfig, *, finite_checked: bool = False):
    targets = list(config.target_modules)
    r, j = config.rank, config.levels
    names = [b.name for b in blocks(j)]
    want = getattr(torch, config.dtype)
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    used = set()
    for mod in targets:
        factors[mod] = {}
        for blk in names:
            ka, kb = f"{mod}.wara_A.{blk}", f"{mod}.wara_B.{blk}"
            for k in (ka, kb):
                if k not in tensors:
                    raise AdapterError(f"{source}: {WEIGHTS_NAME} is missing the tensor {k!r}")
            factors[mod][blk] = (tensors[ka], tensors[kb])
            used |= {ka, kb}
            for k in (ka, kb):
                t = tensors[k]
                if not t.is_floating_point():
                    raise AdapterError(f"{source}: factor {k!r} is {str(t.dtype).removeprefix('torch.')}, "
                                       f"not a floating type (the config's dtype is {config.dtype})")
                if t.dtype != want:
                    raise AdapterError(f"{source}: factor {k!r} is {str(t.dtype).removeprefix('torch.')}, "
                                       f"but the config's dtype is {config.dtype}")
        if any(t.ndim != 2 for pair in factors[mod].values() for t in pair):
            raise AdapterError(f"{source}: {mod} factors must be 2-D matrices")
        m, n = _layer_shape(factors[mod])
        try:
            config.spec.check_length(m, f"{mod}: rows")
            config.spec.check_length(n, f"{mod}: columns")
        except ConfigError as e:
            raise AdapterError(f"{source}: {e}") from None
        for b in blocks(j):
            a, bb = factors[mod][b.name]
            ms, ns = b.shape(m, n)
            if tuple(a.shape) != (r, ns) or tuple(bb.shape) != (ms, r):
                raise AdapterError(
                    f"{source}: {mod} block {b.name} has A {tuple(a.shape)} and B {tuple(bb.shape)}; "
                    f"expected A {(r, ns)} and B {(ms, r)} for rank {r}, levels {j}, layer ({m}, {n})"
                )
    saved: dict[str, dict[str, torch.Tensor]] = {mod: {} for mod in config.modules_to_save}
    for key, t in tensors.items():
        if key in used:
            continue
        owner = next((mod for mod in config.modules_to_save if key.startswith(mod + ".")), None)
        if owner is None:
            raise AdapterError(f"{source}: unexpected tensor {key!r} (neither a target factor nor in modules_to_save)")
        if not t.is_floating_point():
            raise AdapterError(f"{source}: modules_to_save tensor {key!r} is {str(t.dtype).removeprefix('torch.')}, "
                               "not a floating type")
        saved[owner][key[len(owner) + 1 :]] = t
    for mod, params in saved.items():
        if not params:
            raise AdapterError(f"{source}: modules_to_save names {mod!r} but the file has no tensors for it")
    for key, t in ([] if finite_checked else tensors.items()):
        if not torch.isfinite(t).all():
            raise AdapterError(f"{source}: tensor {key!r} contains NaN or Inf")
    return factors, saved


# ------------------------------------------------------------------------------------------
# apply to a model


def incompatibility(adapter: WaraAdapter, shapes: Mapping[str, tuple[int, int]],
                    base_fingerprint: Callable[[tuple[str, ...]], str]) -> str | None:
    """Why ``adapter`` does not fit a base (None: it does), the one compatibility rule: every
    target is a layer of the base (``shapes``: its adaptable layers' (out, in)) with the
    adapter's shape, and the base's weights at the targets hash to the adapter's fingerprint
    (``base_fingerprint(targets)``, called last: it is the costly check)."""
    targets = tuple(adapter.config.target_modules)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        return f"it targets layers this base does not have or adapt ({', '.join(unknown[:3])})"
    for t in targets:
        if tuple(shapes[t]) != adapter.shape(t):
            return f"{t} is {tuple(shapes[t])} here, {adapter.shape(t)} in the adapter"
    got = base_fingerprint(targets)
    if got != adapter.base_fingerprint:
        return (f"its weights hash to {got[:19]}..., the adapter's base fingerprint is "
                f"{adapter.base_fingerprint[:19]}... (a different or modified base)")
    return None


def check_compatible(adapter: WaraAdapter, model: nn.Module, *, base_model: str | None = None) -> None:
    """Raise `IncompatibleAdapterError` unless ``adapter`` fits ``model`` exactly
    (`incompatibility`, and its modules_to_save fit the model's modules)."""
    if base_model is not None and adapter.base_model != base_model:
        raise IncompatibleAdapterError(
            f"adapter was trained for base model {adapter.base_model!r}, not {base_model!r}"
        )
    targets = list(adapter.config.target_modules)
    try:
        weights = base_weights(model, targets)
    except ConfigError as e:
        raise IncompatibleAdapterError(f"adapter targets do not fit this model: {e}") from None
    why = incompatibility(adapter, {mod: tuple(w.shape) for mod, w in weights.items()},
                          lambda _targets: fingerprint(weights))
    if why is not None:
        raise IncompatibleAdapterError(f"the adapter does not fit this model: {why}")
    for mod, params in adapter.saved_modules.items():
        try:
            own = model.get_submodule(mod).state_dict()
        except AttributeError:
            raise IncompatibleAdapterError(f"modules_to_save: the model has no module {mod!r}") from None
        for pname, t in params.items():
            if pname not in own:
                raise IncompatibleAdapterError(f"modules_to_save: {mod} has no parameter {pname!r}")
            if own[pname].shape != t.shape:
                raise IncompatibleAdapterError(
                    f"modules_to_save: {mod}.{pname} is {tuple(own[pname].shape)} in the model, "
                    f"{tuple(t.shape)} in the adapter"
                )


def apply_adapter(model: nn.Module, adapter: WaraAdapter, *, base_model: str | None = None) -> nn.Module:
    """Inject ``adapter`` into a plain (not yet injected) ``model`` and load its tensors.
    Everything is validated first; on error the model is unchanged."""
    if wara_layers(model):
        raise ConfigError("the model already has WaRA layers; apply an adapter to a fresh base model")
    check_compatible(adapter, model, base_model=base_model)
    inject(model, adapter.config)
    layers = wara_layers(model)
    with torch.no_grad():
        for mod, blocks_ in adapter.factors.items():
            layer: WaraLayer = layers[mod]
            for blk, (a, b) in blocks_.items():
                layer.wara_A[blk].copy_(a)
                layer.wara_B[blk].copy_(b)
    return load_saved_modules(model, adapter.saved_modules)


def load_saved_modules(model: nn.Module, saved: Mapping[str, Mapping[str, torch.Tensor]]) -> nn.Module:
    """Load modules_to_save tensors (a task head) into ``model`` in place (shapes were checked
    by `check_compatible`); returns ``model``. The one place saved modules are loaded."""
    with torch.no_grad():
        for mod, params in saved.items():
            model.get_submodule(mod).load_state_dict(dict(params), strict=False)
    return model

