"""Run an exported form in onnxruntime against the PyTorch unmerged model on sample inputs."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from wara_train.artifact import WaraAdapter, apply_adapter
from wara_train.basespec import BaseSpec
from wara_train.errors import ConfigError
from wara_train.layer import layer_shape

from .common import load_hf, read_head, resolve_adapter_base, saved_head, served_from_hf, with_saved_modules
from .onnx_export import INDEX_INPUT, ModelIO, model_io
from .slots import head_feeds, parse_input_name, slot_feeds, stack_folded

DEFAULT_ATOL = 1e-4


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
    """Slot feeds for a ``multi`` graph's inputs (`exporter.slots`): slot 0 the base (zero
    factors, its own head), slot i+1 ``adapters[i]`` folded, zero-padded to the largest rank
    (and head size)."""
    parsed = [p for p in map(parse_input_name, session_inputs) if p is not None]
    layers = sorted({m for m, kind in parsed if kind in ("lora_A", "lora_B")})
    heads = sorted({m for m, kind in parsed if kind in ("weight", "bias")})
    shapes = {m: layer_shape(base.get_submodule(m)) for m in layers}
    feeds = slot_feeds(stack_folded([a.folded_all() for a in adapters], shapes))
    for h in heads:
        feeds.update(head_feeds(h, base.get_submodule(h).state_dict(), [a.saved_modules.get(h) for a in adapters]))
    return {n: feeds[n] for n in session_inputs if n in feeds}


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
    spec: BaseSpec | None = None,
    io: ModelIO | None = None,
    rows: Sequence[int] | None = None,
    atol: float = DEFAULT_ATOL,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> VerifyResult:
    """Compare an exported graph with the PyTorch reference. For ``multi`` graphs, ``rows``
    gives each row's adapter (an index into ``adapters``; -1 for the base) so a heterogeneous
    batch is checked row by row; single-adapter forms use ``adapters[0]``. ``io``: default the
    spec's sample (``spec``: default `resolve_adapter_base` of the first adapter)."""
    sess = ort_session(path, providers=providers)
    meta = sess.get_modelmeta().custom_metadata_map
    form = meta.get("wara.form", "?")
    names = [i.name for i in sess.get_inputs()]
    first = adapters[0]
    if io is None:
        io = model_io(spec or resolve_adapter_base(first), batch=len(rows) if rows is not None else 3, seq=24)
    feeds = {n: t.numpy() for n, t in zip(io.input_names, io.sample)}
    batch = io.sample[0].shape[0]
    if form == "multi":
        rows = list(rows) if rows is not None else [0] * batch
        if len(rows) != batch:
            raise ConfigError(f"rows has {len(rows)} entries for a batch of {batch}")
        feeds.update(pack_slots(names, adapters, base))
        feeds[INDEX_INPUT] = np.asarray([r + 1 for r in rows], dtype=np.int64)
    got = sess.run(None, feeds)[0]
    with torch.no_grad():
        if form == "multi":
            refs = {i: reference_model(a, base) for i, a in enumerate(adapters) if i in set(rows)}
            expected = []
            for r, row in enumerate(rows):
                one = tuple(t[r : r + 1] for t in io.sample)
                expected.append((refs[row](*one) if row >= 0 else base(*one))[0].numpy())
            labels = max(e.shape[-1] for e in expected)
            want = np.zeros((batch, labels), dtype=np.float32)
            for r, e in enumerate(expected):
                want[r, : e.shape[-1]] = e
            got = got[:, :labels]
        elif form == "base":
            want = with_saved_modules(base, first)(*io.sample).numpy()
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
    diff = (got.float() - want).abs()
    rel = diff / want.abs().clamp_min(1e-6)
    return VerifyResult(form, float(diff.max()), float(rel.max()), atol, "torch CPU")


def peft_model(lora_dir: str | os.PathLike, adapter: WaraAdapter, spec: BaseSpec, base: nn.Module) -> nn.Module:
    """A peft LoRA directory loaded by peft onto the model it was written for: the base's own
    transformers model for a transformers base (wrapped as the spec's served module, with the
    head written beside it), else a copy of ``base`` with the adapter's saved modules."""
    lora_dir = Path(lora_dir)
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{lora_dir}: adapter_config.json is not a peft LoRA adapter")
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ConfigError(f"verifying a LoRA export needs peft installed ({e})") from None
    if spec.hf is None:
        return PeftModel.from_pretrained(copy.deepcopy(base), str(lora_dir)).eval()
    head = saved_head(adapter, spec)
    num_labels = int(head["weight"].shape[0]) if spec.hf.head_in_model and head is not None else None
    if num_labels is not None and spec.labels is not None and len(spec.labels) == num_labels:
        num_labels = None
    hf = load_hf(spec, spec.hf.path, num_labels=num_labels)
    PeftModel.from_pretrained(hf, str(lora_dir)).eval()  # injects into hf in place
    return served_from_hf(spec, hf, read_head(lora_dir))


def verify_exported(adapter_dir, exported, *, atol: float = DEFAULT_ATOL, source: str | None = None) -> VerifyResult:
    """Verify any exported form (an .onnx file, a merged directory, or a peft LoRA directory)
    of the adapter in ``adapter_dir`` against the PyTorch unmerged model. ``source``: the base,
    when the adapter's is not built in (as ``--base``)."""
    from .common import load_with_base
    from .merge import INFO_FILE, load_merged

    adapter, spec, base = load_with_base(adapter_dir, source)
    exported = Path(exported)
    io = model_io(spec, batch=3, seq=24)
    if exported.suffix == ".onnx" and exported.is_file():
        rows = [0, -1, 0] if describe(str(exported)).get("wara.form") == "multi" else None
        return verify_onnx(str(exported), [adapter], base, io=io, rows=rows, atol=atol)
    if (exported / INFO_FILE).is_file() or (exported / "model.safetensors").is_file():
        return _compare_torch("merged weights", load_merged(exported, spec), adapter, base, io, atol)
    if (exported / "adapter_config.json").is_file():
        return _compare_torch("peft LoRA", peft_model(exported, adapter, spec, base), adapter, base, io, atol)
    raise ConfigError(f"{exported}: not an .onnx file, a merged directory or a peft LoRA directory")
