"""Exports of the user's own transformers models (``hf:DIR``), each checked as the ecosystem uses it.

For a tiny BERT text classifier, a ViT and a ConvNeXt image classifier (ConvNeXt's pointwise
Linears see channels-last (B, H, W, C) inputs) and a GPT-2 (Conv1D layers) feature extractor,
with a random WaRA adapter each:

* ``export merge`` -> the real ``AutoModel*.from_pretrained(dir)``;
* ``export lora`` -> ``PeftModel.from_pretrained(AutoModel*.from_pretrained(DIR), lora_dir)``;
* ``export onnx --form multi`` -> onnxruntime, rows of the adapter and of the base in one batch;

all against an independent reference: the plain transformers model with ``W0 + ΔW`` set by the
test, ΔW reconstructed from the adapter's factors by ``pywt.waverec2`` in float64 (DESIGN.md 2;
`references.merge_into`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_models
from helpers import assert_close, tol
from references import merge_into
from exporter.common import HEAD_FILE, base_for, load_with_base, resolve_adapter_base
from exporter.lora import save_peft_lora
from exporter.merge import INFO_FILE, save_merged
from exporter.onnx_export import export_onnx, model_io
from exporter.verify import ort_session, pack_slots, verify_exported, verify_onnx
from wara_train.artifact import WaraAdapter, load_adapter, save_adapter
from wara_train.basespec import BaseSpec, resolve_base
from wara_train.config import WaraConfig
from wara_train.errors import ConfigError, IncompatibleAdapterError
from wara_train.model import adaptable_layers, inject, wara_layers
from wara_train.synthetic import randomize_factors

transformers = pytest.importorskip("transformers")

RANK, ALPHA, WAVELET, LEVELS = 2, 4.0, "db2", 2


@dataclass(frozen=True)
class Kind:
    make: Callable[[Path], Path]
    task: str = ""  # an @TASK suffix for the source
    head_labels: tuple[str, ...] | None = None  # a new head trained with the adapter (feature extraction)
    with_head: bool = True


KINDS = {
    "bert": Kind(tiny_models.make_bert_classifier),
    "vit": Kind(tiny_models.make_vit_classifier),
    "convnext": Kind(tiny_models.make_convnext_classifier),
    "gpt2": Kind(tiny_models.make_gpt2, "@feature-extraction", head_labels=("a", "b", "c", "d")),
    "gpt2-embed": Kind(tiny_models.make_gpt2, "@feature-extraction", with_head=False),
    # a new 5-way head in place of the classifier's own 3-way one
    "bert-5": Kind(tiny_models.make_bert_classifier, head_labels=("v", "w", "x", "y", "z")),
}
ONNX_KINDS = ["bert", "vit", "convnext", "gpt2", "gpt2-embed"]
F32 = torch.float32  # every export is checked at float32's tolerance (helpers.TOLERANCES)


@dataclass
class Case:
    kind: str
    model_dir: Path
    spec: BaseSpec
    adapter_dir: Path
    adapter: WaraAdapter
    base: torch.nn.Module


def _make_case(kind: str, root: Path) -> Case:
    k = KINDS[kind]
    model_dir = root / kind.split("-")[0]  # gpt2 and gpt2-embed share one model
    if not model_dir.exists():
        k.make(model_dir)
    spec = resolve_base(f"hf:{model_dir}{k.task}")
    labels = list(k.head_labels or spec.labels or []) or None
    model = spec.build(len(k.head_labels) if k.head_labels else None)
    targets = spec.default_targets or tuple(adaptable_layers(model, levels=LEVELS, exclude=(spec.head,)))
    config = WaraConfig(rank=RANK, alpha=ALPHA, wavelet=WAVELET, levels=LEVELS, target_modules=targets,
                        modules_to_save=(spec.head,) if k.with_head else ())
    inject(model, config, seed=0)
    for i, layer in enumerate(wara_layers(model).values()):
        randomize_factors(layer, seed=100 + i, std=0.1)
    if k.with_head:
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.get_submodule(spec.head).parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    adapter_dir = root / f"{kind}-adapter"
    save_adapter(model, adapter_dir, base_model=spec.name, labels=labels if k.with_head else None,
                 base_source=spec.source)
    adapter = load_adapter(adapter_dir)
    return Case(kind, model_dir, spec, adapter_dir, adapter, base_for(adapter, spec))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-exports")
    made: dict[str, Case] = {}

    def get(kind: str) -> Case:
        if kind not in made:
            made[kind] = _make_case(kind, root)
        return made[kind]

    return get


# ------------------------------------------------------------------------------------------
# the independent reference


def merge_by_hand(model: torch.nn.Module, spec: BaseSpec, adapter: WaraAdapter) -> torch.nn.Module:
    """``W0 + ΔW(pywt)`` in a plain transformers model (`references.merge_into`), and the
    adapter's head where it is part of that model."""
    prefix = spec.hf.prefix + "." if spec.hf.prefix else ""
    merge_into(model, adapter, prefix=prefix)
    if spec.hf.head_in_model and spec.head in adapter.saved_modules:
        model.get_submodule(spec.head[len(prefix):]).load_state_dict(adapter.saved_modules[spec.head])
    return model.eval()


def run_hf(model: torch.nn.Module, spec: BaseSpec, inputs: tuple[torch.Tensor, ...],
           head: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """What the base answers, computed from a plain transformers model: its logits, or the
    masked mean of last_hidden_state (normalised, or through the adapter's head)."""
    with torch.no_grad():
        if spec.task == "image-classification":
            return model(pixel_values=inputs[0]).logits
        if spec.task == "text-classification":
            return model(input_ids=inputs[0], attention_mask=inputs[1]).logits
        h = model(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state
        mask = inputs[1].unsqueeze(-1).float()
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1) if head is None else F.linear(pooled, head["weight"], head.get("bias"))


def auto(spec: BaseSpec, path, num_labels: int | None = None) -> torch.nn.Module:
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
    return getattr(transformers, spec.hf.auto_class).from_pretrained(str(path), local_files_only=True, **kwargs).eval()


def own_model(case: Case) -> torch.nn.Module:
    """The user's model from its directory, with a head of the adapter's size."""
    head = case.adapter.saved_modules.get(case.spec.head)
    resized = case.spec.hf.head_in_model and head is not None and head["weight"].shape[0] != len(case.spec.labels)
    return auto(case.spec, case.model_dir, int(head["weight"].shape[0]) if resized else None)


def sample_inputs(spec: BaseSpec) -> tuple[torch.Tensor, ...]:
    inputs = spec.sample(3, 12)
    if spec.raw_input == "text":  # one row right-padded, as the server's tokenizer pads
        ids, mask = inputs
        mask = mask.clone()
        mask[1, 8:] = 0
        inputs = (ids, mask)
    return inputs


def reference(case: Case, inputs) -> torch.Tensor:
    head = case.adapter.saved_modules.get(case.spec.head) if not case.spec.hf.head_in_model else None
    return run_hf(merge_by_hand(own_model(case), case.spec, case.adapter), case.spec, inputs, head)


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return (got.float() - want.float()).abs().max().item()


# ------------------------------------------------------------------------------------------
# the three exports


@pytest.mark.parametrize("kind", list(KINDS))
def test_merge_loads_with_from_pretrained_and_matches(cases, tmp_path, kind):
    case = cases(kind)
    spec, adapter = case.spec, case.adapter
    out = save_merged(case.base, [(adapter, 1.0)], tmp_path / "merged", spec=spec, sources=[case.adapter_dir])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] in ("bert", "vit", "convnext", "gpt2")
    info = json.loads((out / INFO_FILE).read_text())
    assert info["format"] == "wara-merged" and info["base_source"] == spec.source
    assert info["sources"][0]["content_hash"] == adapter.content_hash and info["labels"] == adapter.labels
    merged = auto(spec, out)  # the real transformers class, not our loader
    head = None
    if spec.hf.head_in_model:
        assert [config["id2label"][str(i)] for i in range(len(adapter.labels))] == adapter.labels
        assert config["label2id"] == {label: i for i, label in enumerate(adapter.labels)}
        assert not (out / HEAD_FILE).exists()
    else:
        # A feature extractor's config names no labels, whatever head the adapter trained: they
        # would invite AutoModelForSequenceClassification, which builds a random head.
        assert config.get("id2label") is None and config.get("label2id") is None
        if KINDS[kind].with_head:
            from safetensors import safe_open
            from safetensors.torch import load_file

            head = load_file(str(out / HEAD_FILE))
            assert set(head) == {"weight", "bias"} and info["head"]["labels"] == adapter.labels
            with safe_open(str(out / HEAD_FILE), "pt") as f:
                assert json.loads(f.metadata()["labels"]) == adapter.labels
        else:
            assert not (out / HEAD_FILE).exists()
    inputs = sample_inputs(spec)
    want = reference(case, inputs)
    assert_close(run_hf(merged, spec, inputs, head), want, dtype=F32)
    plain = run_hf(own_model(case), spec, inputs, head)
    assert plain.shape != want.shape or max_err(plain, want) > 1e-2  # the adapter matters
    # The directory's own preprocessing comes along.
    if spec.raw_input == "text":
        assert transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)("hello world")["input_ids"]
    else:
        assert (out / "preprocessor_config.json").is_file()
        transformers.AutoImageProcessor.from_pretrained(str(out), local_files_only=True)


@pytest.mark.parametrize("kind", list(KINDS))
def test_lora_loads_in_peft_on_the_transformers_model(cases, tmp_path, kind):
    from peft import PeftModel

    case = cases(kind)
    spec, adapter = case.spec, case.adapter
    out = save_peft_lora(adapter, tmp_path / "lora", spec=spec, base=case.base)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == spec.hf.path
    assert cfg["r"] == (3 * LEVELS + 1) * RANK and cfg["lora_alpha"] == cfg["r"]
    assert cfg["fan_in_fan_out"] == kind.startswith("gpt2")
    assert not any(t.startswith(spec.hf.prefix + ".") for t in cfg["target_modules"])
    peft_model = PeftModel.from_pretrained(own_model(case), str(out)).eval()
    head = None
    if not spec.hf.head_in_model and KINDS[kind].with_head:
        from safetensors.torch import load_file

        assert cfg["modules_to_save"] is None
        head = load_file(str(out / HEAD_FILE))
    elif spec.hf.head_in_model:
        assert cfg["modules_to_save"] == ["classifier"]
    inputs = sample_inputs(spec)
    got = run_hf(peft_model, spec, inputs, head)
    assert_close(got, reference(case, inputs), dtype=F32)
    assert verify_exported(case.adapter_dir, out).ok  # our own verify agrees


@pytest.mark.parametrize("kind", ONNX_KINDS)
def test_onnx_multi_matches_in_onnxruntime(cases, tmp_path, kind):
    case = cases(kind)
    spec, adapter, base = case.spec, case.adapter, case.base
    path = export_onnx(adapter, base, "multi", tmp_path / "multi.onnx", spec=spec, log=lambda s: None)
    rows = [0, -1, 0]
    result = verify_onnx(str(path), [adapter], base, spec=spec, rows=rows, atol=tol(F32)[1])
    assert result.provider == "CPUExecutionProvider"
    assert result.ok, str(result)
    # Every row against the independent reference, on inputs with padding: the adapter's rows
    # against the pywt-merged transformers model, the base row against the plain one.
    sess = ort_session(str(path))
    inputs = sample_inputs(spec)
    feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs)}
    feeds.update(pack_slots([i.name for i in sess.get_inputs()], [adapter], base))
    feeds["adapter_index"] = np.asarray([r + 1 for r in rows], dtype=np.int64)
    got = torch.from_numpy(sess.run(None, feeds)[0])
    want = reference(case, inputs)
    assert_close(got[[0, 2], : want.shape[1]], want[[0, 2]], dtype=F32)
    own_head = None if spec.hf.head_in_model or not KINDS[kind].with_head else base.get_submodule(spec.head).state_dict()
    plain = run_hf(own_model(case), spec, inputs, own_head)
    assert_close(got[[1], : plain.shape[1]], plain[[1]], dtype=F32)
    assert max_err(got[[1], : plain.shape[1]], want[[1]]) > 1e-2  # the base row is not adapted


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "vit"])
def test_onnx_unmerged_conv1d_and_vision(cases, tmp_path, kind):
    case = cases(kind)
    path = export_onnx(case.adapter, case.base, "unmerged", tmp_path / "u.onnx", spec=case.spec, log=lambda s: None)
    result = verify_onnx(str(path), [case.adapter], case.base, spec=case.spec, atol=tol(F32)[1])
    assert result.ok, str(result)


# ------------------------------------------------------------------------------------------
# atomic exports: a failure leaves nothing behind, and an existing directory as it was


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_merge_that_fails_midway_leaves_nothing(cases, tmp_path, monkeypatch):
    case = cases("gpt2")

    def broken_save(self, directory, *args, **kwargs):
        (Path(directory) / "config.json").write_text("{}")  # part of the model is on disk
        raise RuntimeError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_merged(case.base, [(case.adapter, 1.0)], tmp_path / "merged", spec=case.spec)
    assert list(tmp_path.iterdir()) == []  # no out, no staging directory
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text('{"old": true}')
    (old / "notes.txt").write_text("mine")
    before = _snapshot(old)
    with pytest.raises(RuntimeError, match="disk full"):
        save_merged(case.base, [(case.adapter, 1.0)], old, spec=case.spec)
    assert _snapshot(old) == before and list(tmp_path.iterdir()) == [old]


def test_a_merge_over_an_earlier_one_leaves_no_stale_head(cases, tmp_path):
    with_head, without = cases("gpt2"), cases("gpt2-embed")
    out = save_merged(with_head.base, [(with_head.adapter, 1.0)], tmp_path / "m", spec=with_head.spec)
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # an ordinary directory, not mkdtemp's 0700
    (out / "notes.txt").write_text("mine")
    assert (out / HEAD_FILE).is_file()
    save_merged(without.base, [(without.adapter, 1.0)], out, spec=without.spec)
    assert not (out / HEAD_FILE).exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / INFO_FILE).read_text())["sources"][0]["content_hash"] == without.adapter.content_hash
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_lora_export_that_fails_midway_leaves_nothing(cases, tmp_path, monkeypatch):
    import exporter.lora

    case = cases("gpt2")

    def broken_head(*args, **kwargs):  # after the weights and config are written
        raise OSError("disk full")

    monkeypatch.setattr(exporter.lora, "write_head", broken_head)
    with pytest.raises(OSError, match="disk full"):
        save_peft_lora(case.adapter, tmp_path / "lora", spec=case.spec, base=case.base)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# finding the base


def test_adapter_finds_its_base_from_its_recorded_source(cases, tmp_path):
    case = cases("gpt2")
    assert resolve_adapter_base(case.adapter).source == case.spec.source
    cfg = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    cfg.pop("base_source")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text(json.dumps(cfg))
    (bare / "adapter_model.safetensors").write_bytes((case.adapter_dir / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"trained on base 'gpt2', which is not built in.*--base SOURCE"):
        load_with_base(bare)
    adapter, spec, _ = load_with_base(bare, case.spec.source)  # --base
    assert spec.hf.path == case.spec.hf.path and adapter.base_source is None


def test_a_base_with_other_weights_is_refused(cases, tmp_path):
    case = cases("bert")
    other = tiny_models.make_bert_classifier(tmp_path / "other-bert", seed=1)
    with pytest.raises(IncompatibleAdapterError, match="fingerprint"):
        load_with_base(case.adapter_dir, f"hf:{other}")


def test_model_io_comes_from_the_spec(cases):
    spec = cases("gpt2").spec
    io = model_io(spec, batch=3, seq=10)
    assert io.input_names == ("input_ids", "attention_mask") and tuple(io.sample[0].shape) == (3, 10)
    assert io.bounds["seq"] == (2, 64) and io.output_name == "embeddings"
    with pytest.raises(ConfigError, match="takes images of 32x32 only"):
        model_io(cases("vit").spec, image_size=64)


def _wara(*args: str) -> subprocess.CompletedProcess:
    """The umbrella CLI as a user runs it."""
    return subprocess.run([sys.executable, "-m", "wara", "export", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_exports_with_base(cases, tmp_path):
    case = cases("gpt2")
    src = case.spec.source
    proc = _wara("merge", "--adapter", str(case.adapter_dir), "--base", src, "--out", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / HEAD_FILE).is_file()
    proc = _wara("verify", "--adapter", str(case.adapter_dir), "--base", src, "--exported", str(tmp_path / "m"))
    assert proc.returncode == 0 and "merged weights: max abs error" in proc.stdout, proc.stdout + proc.stderr
    proc = _wara("lora", "--adapter", str(case.adapter_dir), "--out", str(tmp_path / "l"))  # base from the adapter
    assert proc.returncode == 0, proc.stderr
    proc = _wara("verify", "--adapter", str(case.adapter_dir), "--exported", str(tmp_path / "l"))
    assert proc.returncode == 0 and "peft LoRA" in proc.stdout, proc.stdout + proc.stderr
    proc = _wara("merge", "--adapter", str(case.adapter_dir), "--base", "hf:/no/such/dir", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "no such directory" in proc.stderr


# ------------------------------------------------------------------------------------------
# the built-in MiniLM, as a new user tries its exports


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from wara_train.synthetic import random_adapter

    root = tmp_path_factory.mktemp("minilm")
    adapter = random_adapter("minilm", root / "adapter", rank=2, num_labels=5, seed=3)
    spec = resolve_adapter_base(adapter)
    return root / "adapter", adapter, spec, base_for(adapter, spec)


def _minilm_reference(adapter, spec, inputs):
    from wara_train.bases import _minilm_dir

    model = merge_by_hand(auto(spec, _minilm_dir()), spec, adapter)
    return run_hf(model, spec, inputs, adapter.saved_modules["classifier"])


@pytest.mark.slow
def test_minilm_lora_loads_in_peft_on_automodel(minilm, tmp_path):
    from peft import PeftModel

    from wara_train.bases import _minilm_dir

    _, adapter, spec, base = minilm
    out = save_peft_lora(adapter, tmp_path / "lora", spec=spec, base=base)
    model = PeftModel.from_pretrained(auto(spec, _minilm_dir()), str(out)).eval()  # NoMatchingPeftModuleError before
    from safetensors.torch import load_file

    inputs = sample_inputs(spec)
    got = run_hf(model, spec, inputs, load_file(str(out / HEAD_FILE)))
    assert_close(got, _minilm_reference(adapter, spec, inputs), dtype=F32)


@pytest.mark.slow
def test_minilm_merge_is_a_complete_transformers_model(minilm, tmp_path):
    from safetensors.torch import load_file

    _, adapter, spec, base = minilm
    out = save_merged(base, [(adapter, 1.0)], tmp_path / "merged", spec=spec)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config.get("id2label") is None  # labels: beside the head
    assert json.loads((out / INFO_FILE).read_text())["labels"] == adapter.labels
    assert (out / "vocab.txt").is_file() and (out / "tokenizer.json").is_file()
    model, info = transformers.AutoModel.from_pretrained(str(out), local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the pooler comes along
    inputs = sample_inputs(spec)
    got = run_hf(model.eval(), spec, inputs, load_file(str(out / HEAD_FILE)))
    assert_close(got, _minilm_reference(adapter, spec, inputs), dtype=F32)
