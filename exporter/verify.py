"""Run an exported form in onnxruntime against the PyTorch unmerged model on sample inputs."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from wara_train.artifact import WaraAdapter, apply_adapter
from wara_train.errors import ConfigError, WaraError

from .onnx_export import INDEX_INPUT, ModelIO, model_io

DEFAULT_ATOL = 1e-4


class VerificationError(WaraError):
    """An exported form disagrees with the PyTorch reference past the tolerance."""


def ort_session(path: str, *, providers: Sequence[str] = ("CPUExecutionProvider",), spinning: bool = True):
    """An onnxruntime session that really uses ``providers[0]`` (the GPU build falls back to
    CPU silently when CUDA libraries are missing: DESIGN.md 6). ``spinning=False`` stops its
    worker threads busy-waiting after a run: right for a server, whose other threads (gRPC,
    tokenizer, batcher) need those cores between runs."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ConfigError(f"running ONNX needs the 'cpu' (or 'gpu') extra: pip install 'wara-serve[cpu]' ({e})") from None
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    if sess.get_providers()[0] != providers[0]:
        raise ConfigError(f"onnxruntime runs on {sess.get_providers()[0]}, not the requested {providers[0]}")
    return sess


def pack_slots(
    session_inputs: Sequence[str], adapters: Sequence[WaraAdapter], base: nn.Module
) -> dict[str, np.ndarray]:
    """Slot tensors for a ``multi`` graph: slot 0 is the base (zero factors), slot i+1 holds
    ``adapters[i]`` folded and zero-padded to the largest rank (and head size)."""
    feeds: dict[str, np.ndarray] = {}
    slots = len(adapters) + 1
    for name in session_inputs:
        if not name.startswith("wara."):
            continue
        module, kind = name[len("wara."):].rsplit(".", 1)
        layer = base.get_submodule(module)
        if kind in ("lora_A", "lora_B"):
            m, n = layer.weight.shape[:2]
            folded = [a.folded(module) for a in adapters]
            rank = max(la.shape[0] for la, _ in folded)
            arr = np.zeros((slots, rank, n) if kind == "lora_A" else (slots, m, rank), dtype=np.float32)
            for i, (la, lb) in enumerate(folded, start=1):
                if kind == "lora_A":
                    arr[i, : la.shape[0]] = la.numpy()
                else:
                    arr[i, :, : lb.shape[1]] = lb.numpy()
        else:  # a task head: weight (labels, n) / bias (labels)
            own = layer.state_dict()[kind]
            tensors = [own] + [a.saved_modules[module][kind] for a in adapters]
            labels = max(t.shape[0] for t in tensors)
            arr = np.zeros((slots, labels, *own.shape[1:]), dtype=np.float32)
            for i, t in enumerate(tensors):
                arr[i, : t.shape[0]] = t.float().numpy()
        feeds[name] = arr
    return feeds


@dataclass
class VerifyResult:
    form: str
    max_abs: float
    max_rel: float
    atol: float
    provider: str

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.atol

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"{self.form}: max abs error {self.max_abs:.3e}, max rel error {self.max_rel:.3e} "
                f"(tolerance {self.atol:.0e}, {self.provider}) {verdict}")


def reference_model(adapter: WaraAdapter, base: nn.Module) -> nn.Module:
    """The PyTorch unmerged model (explicit wavelet path): the reference for every form."""
    return apply_adapter(copy.deepcopy(base), adapter).eval()


def verify_onnx(
    path: str,
    adapters: Sequence[WaraAdapter],
    base: nn.Module,
    *,
    io: ModelIO | None = None,
    rows: Sequence[int] | None = None,
    atol: float = DEFAULT_ATOL,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> VerifyResult:
    """Compare an exported graph with the PyTorch reference. For ``multi`` graphs, ``rows``
    gives each row's adapter (an index into ``adapters``; -1 for the base) so a heterogeneous
    batch is checked row by row; single-adapter forms use ``adapters[0]``."""
    sess = ort_session(path, providers=providers)
    meta = sess.get_modelmeta().custom_metadata_map
    form = meta.get("wara.form", "?")
    names = [i.name for i in sess.get_inputs()]
    first = adapters[0]
    io = io or model_io(first.base_model, batch=len(rows) if rows is not None else 3, seq=24)
    feeds = {n: t.numpy() for n, t in zip(io.input_names, io.sample)}
    batch = io.sample[0].shape[0]
    if form == "multi":
        rows = list(rows) if rows is not None else [0] * batch
        if len(rows) != batch:
            raise ConfigError(f"rows has {len(rows)} entries for a batch of {batch}")
        feeds.update(pack_slots(names, adapters, base))
        feeds[INDEX_INPUT] = np.asarray([r + 1 for r in rows], dtype=np.int64)
    got = sess.run(None, feeds)[0]
    expected = []
    with torch.no_grad():
        if form == "multi":
            refs = {i: reference_model(a, base) for i, a in enumerate(adapters) if i in set(rows or [])}
            for r, row in enumerate(rows or []):
                one = tuple(t[r : r + 1] for t in io.sample)
                out = refs[row](*one) if row >= 0 else base(*one)
                expected.append(out[0].numpy())
            labels = max(e.shape[-1] for e in expected)
            want = np.zeros((batch, labels), dtype=np.float32)
            for r, e in enumerate(expected):
                want[r, : e.shape[-1]] = e
            got = got[:, :labels]
        elif form == "base":
            head = copy.deepcopy(base)
            for mod, params in first.saved_modules.items():
                head.get_submodule(mod).load_state_dict(params, strict=False)
            want = head(*io.sample).numpy()
        else:
            want = reference_model(first, base)(*io.sample).numpy()
    diff = np.abs(got - want)
    rel = diff / np.maximum(np.abs(want), 1e-6)
    return VerifyResult(form, float(diff.max()), float(rel.max()), atol, sess.get_providers()[0])


def describe(path: str) -> dict:
    """The metadata an exported graph carries (form, base, adapter hash, labels)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: (json.loads(p.value) if p.key in ("wara.labels", "wara.inputs", "wara.slot_inputs") else p.value)
            for p in model.metadata_props}


def _compare_torch(form: str, model: nn.Module, adapter: WaraAdapter, base: nn.Module, io: ModelIO, atol: float) -> VerifyResult:
    with torch.no_grad():
        want = reference_model(adapter, base)(*io.sample)
        got = model(*io.sample)
    diff = (got - want).abs()
    rel = diff / want.abs().clamp_min(1e-6)
    return VerifyResult(form, float(diff.max()), float(rel.max()), atol, "torch CPU")


def verify_exported(adapter_dir, exported, *, atol: float = DEFAULT_ATOL) -> VerifyResult:
    """Verify any exported form (an .onnx file, a merged directory, or a peft LoRA directory)
    of the adapter in ``adapter_dir`` against the PyTorch unmerged model."""
    from pathlib import Path

    from .common import load_with_base

    adapter, base = load_with_base(adapter_dir)
    exported = Path(exported)
    io = model_io(adapter.base_model, batch=3, seq=24)
    if exported.suffix == ".onnx" and exported.is_file():
        rows = [0, -1, 0] if describe(str(exported)).get("wara.form") == "multi" else None
        return verify_onnx(str(exported), [adapter], base, io=io, rows=rows, atol=atol)
    if (exported / "model.safetensors").is_file():
        from .merge import load_merged

        return _compare_torch("merged weights", load_merged(exported), adapter, base, io, atol)
    if (exported / "adapter_config.json").is_file():
        cfg = json.loads((exported / "adapter_config.json").read_text())
        if cfg.get("peft_type") != "LORA":
            raise ConfigError(f"{exported}: adapter_config.json is not a peft LoRA adapter")
        try:
            from peft import PeftModel
        except ImportError as e:
            raise ConfigError(f"verifying a LoRA export needs peft installed ({e})") from None
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(exported)).eval()
        return _compare_torch("peft LoRA", model, adapter, base, io, atol)
    raise ConfigError(f"{exported}: not an .onnx file, a merged directory or a peft LoRA directory")
