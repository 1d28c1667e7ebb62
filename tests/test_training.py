"""Training through the Python API (custom model + data) and the `wara train` CLI contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from wara_train.artifact import apply_adapter, load_adapter, save_adapter
from wara_train.config import WaraConfig
from wara_train.data import stratified_split
from wara_train.errors import ConfigError
from wara_train.model import inject
from wara_train.trainer import TrainOptions, macro_f1, train


def _toy_task(n=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return [(x[i], int(y[i])) for i in range(n)]


def test_custom_model_and_dataset_through_the_python_api(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 2))
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    data = _toy_task()
    model = inject(base, WaraConfig(rank=2, wavelet="db2", target_modules=("0", "2"), modules_to_save=("4",)), seed=0)
    result = train(model, train_set=data[:192], eval_set=data[192:], collate=torch.stack,
                   options=TrainOptions(epochs=15, lr=2e-2, progress=False))
    assert result.after.accuracy >= 0.85 and result.after.accuracy > result.before.accuracy
    assert result.history[-1] < result.history[0]
    # Frozen base weights did not move; the artifact reloads onto a fresh copy of the base.
    assert torch.equal(model.get_submodule("0").base.weight, reference["0.weight"])
    save_adapter(model, tmp_path / "toy", base_model="toy")
    fresh = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 2))
    fresh.load_state_dict(reference)
    restored = apply_adapter(fresh, load_adapter(tmp_path / "toy"))
    x = torch.stack([d[0] for d in data[192:]])
    with torch.no_grad():
        assert torch.allclose(restored(x), model(x))


def test_split_is_stratified_and_deterministic():
    labels = [0] * 50 + [1] * 10 + [2] * 2
    tr, te = stratified_split(labels, test_fraction=0.2, seed=3)
    assert sorted(tr + te) == list(range(len(labels)))
    assert [labels[i] for i in te].count(1) == 2 and [labels[i] for i in te].count(2) == 1
    assert (tr, te) == stratified_split(labels, test_fraction=0.2, seed=3)


def test_macro_f1_against_hand_computed_value():
    # class 0: tp=1 fp=1 fn=1 -> 0.5; class 1: tp=1 fp=1 fn=1 -> 0.5; class 2: tp=1 -> 1.0
    assert macro_f1([0, 1, 1, 0, 2], [0, 0, 1, 1, 2]) == pytest.approx(2.0 / 3.0)


def _wara(*args, **kw):
    return subprocess.run([sys.executable, "-m", "wara", *args], capture_output=True, text=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("task,extra", [
    ("minilm-topics", []),
    ("minilm-langid", ["--wavelet", "db2", "--levels", "2", "--rank", "2"]),
    ("effnet-digits", ["--mode", "boundary", "--wavelet", "db2"]),
])
def test_cli_train_smoke_run_writes_a_complete_artifact(tmp_path, task, extra):
    out = tmp_path / task
    proc = _wara("train", "--task", task, "--out", str(out), "--steps", "2", "--seed", "1", "--no-progress", *extra)
    assert proc.returncode == 0, proc.stderr
    assert "held-out accuracy" in proc.stdout
    adapter = load_adapter(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model"] == ("effnet-lite0" if task.startswith("effnet") else "minilm")
    assert cfg["extra"]["steps"] == 2 and cfg["labels"] and adapter.saved_modules
    from wara_train.bases import build_base

    model = apply_adapter(build_base(cfg["base_model"], num_labels=len(cfg["labels"])), adapter, base_model=cfg["base_model"])
    assert model is not None


def test_cli_rejects_bad_flags_with_clear_errors(tmp_path):
    proc = _wara("train", "--task", "nope", "--out", str(tmp_path))
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr
    proc = _wara("train", "--task", "minilm-topics", "--out", str(tmp_path), "--wavelet", "bior2.2")
    assert proc.returncode == 2 and "unknown wavelet 'bior2.2'" in proc.stderr
    proc = _wara("train", "--task", "minilm-topics", "--out", str(tmp_path), "--levels", "0")
    assert proc.returncode == 2 and "levels must be an integer >= 1" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_train_refuses_a_model_without_adapters():
    with pytest.raises(ConfigError, match="no trainable parameters"):
        model = nn.Linear(4, 2).requires_grad_(False)
        train(model, train_set=[(torch.zeros(4), 0)], eval_set=[], collate=torch.stack, options=TrainOptions(progress=False))


def test_integer_labels_sort_numerically(tmp_path):
    from wara_train.data import load_jsonl, sort_labels

    f = tmp_path / "ints.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "label": y}) + "\n" for i, y in enumerate([10, 2, "1", 2, -3])))
    texts, labels, names = load_jsonl(f)
    assert names == ["-3", "1", "2", "10"]
    assert [names[y] for y in labels] == ["10", "2", "1", "2", "-3"]
    assert sort_labels(["10", "2", "b"]) == ["10", "2", "b"]  # not all integers: string order


def _gpt2_classifier(path, *, labels, config_eos: bool):
    """A GPT-2 ``ForSequenceClassification`` directory: tests/tiny_models' tokenizer and sizes,
    a classification head, and no ``pad_token_id`` (as GPT-2 ships); with ``config_eos`` False
    the config names no eos either, so the pad id comes from the tokenizer."""
    import tiny_models
    from transformers import AutoConfig, GPT2ForSequenceClassification

    tiny_models.make_gpt2(path)
    config = AutoConfig.from_pretrained(path)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {n: i for i, n in enumerate(labels)}
    config.pad_token_id = None
    if not config_eos:
        config.eos_token_id = config.bos_token_id = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2ForSequenceClassification(config).eval().save_pretrained(path)
    return path


@pytest.mark.parametrize("config_eos", [True, False], ids=["config-eos", "tokenizer-eos"])
def test_decoder_text_classifier_trains_in_batches(tmp_path, config_eos):
    """transformers' decoder classifiers refuse batches > 1 without config.pad_token_id."""
    import tiny_models
    from wara_train.basespec import resolve_base
    from wara_train.tasks import train_on_base

    labels = ("negative", "positive", "neutral")
    base = _gpt2_classifier(tmp_path / "gpt2-cls", labels=labels, config_eos=config_eos)
    data = tiny_models.write_text_jsonl(tmp_path / "train.jsonl", n=24, labels=labels)
    source = f"hf:{base}@text-classification"
    lines = []
    result = train_on_base(source, data, tmp_path / "adapter", steps=2, batch_size=4, progress=False, log=lines.append)
    assert result.steps == 2 and "its own head" in lines[0] and lines[-1].startswith("adapter written to")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_source"] == f"hf:{base.resolve()}@text-classification" and cfg["labels"] == list(labels)
    eos = json.loads((base / "vocab.json").read_text())[tiny_models.EOS_GPT2]
    assert resolve_base(source).build(None).model.config.pad_token_id == eos
