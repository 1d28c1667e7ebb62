"""Artifact round trip and the refusal of every kind of malformed artifact."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from wara_train.artifact import CONFIG_NAME, WEIGHTS_NAME, apply_adapter, check_compatible, load_adapter, save_adapter
from wara_train.config import WaraConfig
from wara_train.errors import AdapterError, IncompatibleAdapterError
from wara_train.model import inject, wara_layers
from wara_train.synthetic import randomize_factors as randomize


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.enc(x))


def make_base(seed=0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def trained_adapter(tmp_path, base, **cfg):
    model = copy.deepcopy(base)
    config = WaraConfig(rank=2, target_modules=("enc.0", "enc.2"), modules_to_save=("head",), **cfg)
    inject(model, config, seed=0)
    for i, layer in enumerate(wara_layers(model).values()):
        randomize(layer, i)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    out = tmp_path / "adapter"
    save_adapter(model, out, base_model="tiny", labels=["a", "b", "c"])
    return model, out


@pytest.mark.parametrize("wavelet,levels", [("haar", 1), ("db2", 2)])
def test_round_trip_is_exact(tmp_path, wavelet, levels):
    base = make_base()
    model, out = trained_adapter(tmp_path, base, wavelet=wavelet, levels=levels)
    adapter = load_adapter(out)
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["format"] == "wara" and cfg["format_version"] == 1
    assert cfg["target_modules"] == ["enc.0", "enc.2"] and cfg["labels"] == ["a", "b", "c"]
    assert cfg["base_fingerprint"].startswith("sha256:")
    keys = set(load_file(str(out / WEIGHTS_NAME)))
    assert f"enc.0.wara_A.a{levels}" in keys and "enc.2.wara_B.d1" in keys and "head.weight" in keys
    restored = apply_adapter(make_base(), adapter, base_model="tiny")
    for name, layer in wara_layers(model).items():
        other = wara_layers(restored)[name]
        for blk in layer.wara_A:
            assert torch.equal(layer.wara_A[blk], other.wara_A[blk])
            assert torch.equal(layer.wara_B[blk], other.wara_B[blk])
    assert torch.equal(model.head.weight, restored.head.weight)
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))
    # The content hash is the version: same bytes, same hash; new content, new hash.
    assert load_adapter(out).content_hash == adapter.content_hash


def _rewrite_config(out, **changes):
    cfg = json.loads((out / CONFIG_NAME).read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (out / CONFIG_NAME).write_text(json.dumps(cfg))


def _rewrite_tensors(out, fn):
    tensors = load_file(str(out / WEIGHTS_NAME))
    fn(tensors)
    save_file(tensors, str(out / WEIGHTS_NAME))


MALFORMED = {
    "truncated file": (
        lambda out: (out / WEIGHTS_NAME).write_bytes((out / WEIGHTS_NAME).read_bytes()[:-100]),
        "unreadable safetensors file",
    ),
    "missing weights file": (lambda out: (out / WEIGHTS_NAME).unlink(), "missing adapter_model.safetensors"),
    "missing config": (lambda out: (out / CONFIG_NAME).unlink(), "missing adapter_config.json"),
    "config not json": (lambda out: (out / CONFIG_NAME).write_text("{oops"), "not valid JSON"),
    "missing tensor": (lambda out: _rewrite_tensors(out, lambda t: t.pop("enc.2.wara_B.v1")), "missing the tensor 'enc.2.wara_B.v1'"),
    "missing config key": (lambda out: _rewrite_config(out, rank=None), "missing the key 'rank'"),
    "wrong shape": (
        lambda out: _rewrite_tensors(out, lambda t: t.__setitem__("enc.0.wara_A.h1", torch.zeros(2, 7))),
        "block h1 has A \\(2, 7\\)",
    ),
    "wrong rank in config": (lambda out: _rewrite_config(out, rank=3), "expected A \\(3, "),
    "NaN": (
        lambda out: _rewrite_tensors(out, lambda t: t["enc.0.wara_B.d1"].__setitem__((0, 0), float("nan"))),
        "'enc.0.wara_B.d1' contains NaN or Inf",
    ),
    "Inf": (
        lambda out: _rewrite_tensors(out, lambda t: t["head.weight"].__setitem__((0, 0), float("inf"))),
        "'head.weight' contains NaN or Inf",
    ),
    "wrong format_version": (lambda out: _rewrite_config(out, format_version=99), "format_version 99 is not supported"),
    "wrong format": (lambda out: _rewrite_config(out, format="lora"), "format is 'lora'"),
    "unknown wavelet": (lambda out: _rewrite_config(out, wavelet="bior2.2"), "unknown wavelet 'bior2.2'"),
    "unknown mode": (lambda out: _rewrite_config(out, mode="zero"), "valid modes are periodization, boundary"),
    "stray tensor": (
        lambda out: _rewrite_tensors(out, lambda t: t.__setitem__("evil.weight", torch.zeros(2))),
        "unexpected tensor 'evil.weight'",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_artifacts_are_refused_by_name(tmp_path, case):
    _, out = trained_adapter(tmp_path, make_base())
    corrupt, message = MALFORMED[case]
    corrupt(out)
    with pytest.raises(AdapterError, match=message):
        load_adapter(out)


def test_dims_not_divisible_by_2_pow_levels(tmp_path):
    """Factors for a 20 x 12 layer (divisible by 4) in an artifact that claims 3 levels."""
    model = nn.Sequential(nn.Linear(12, 20))
    inject(model, WaraConfig(rank=1, levels=2, target_modules=("0",)))
    out = save_adapter(model, tmp_path / "odd", base_model="x")
    _rewrite_config(out, levels=3)
    _rewrite_tensors(out, lambda t: [t.__setitem__(f"0.wara_{k}.{b}3", t[f"0.wara_{k}.{b}2"].clone()) for k in "AB" for b in "ahvd"])
    with pytest.raises(AdapterError, match="0: rows 20 is not divisible by 2\\^levels = 8"):
        load_adapter(out)


def test_wrong_base_is_refused_and_model_left_unchanged(tmp_path):
    _, out = trained_adapter(tmp_path, make_base(0))
    adapter = load_adapter(out)
    other = make_base(seed=1)  # same architecture, different weights
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(IncompatibleAdapterError, match="a different or modified base"):
        apply_adapter(other, adapter)
    assert not wara_layers(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(IncompatibleAdapterError, match="trained for base model 'tiny', not 'minilm'"):
        check_compatible(adapter, make_base(0), base_model="minilm")
    wide = make_base(0)
    wide.enc[0] = nn.Linear(32, 128)
    with pytest.raises(IncompatibleAdapterError, match="enc.0 is \\(128, 32\\) here"):
        apply_adapter(wide, adapter)


def test_save_is_atomic_and_overwrites(tmp_path):
    base = make_base()
    _, out = trained_adapter(tmp_path, base)
    first = load_adapter(out).content_hash
    model, _ = trained_adapter(tmp_path, base, wavelet="db2")
    assert load_adapter(out).content_hash != first
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    shutil.rmtree(out)
