"""WaRA layers: explicit == merged == folded == the pywt reference; init, gradients, counts."""

from __future__ import annotations

import copy

import pytest
import pywt
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_close

from wara_train.config import WaraConfig, wara_param_count
from wara_train.errors import ConfigError
from wara_train.layer import PATHS, WaraConv1D, WaraConv1x1, WaraLinear, is_conv1d, wrap
from wara_train.model import adaptable_layers, find_targets, inject, set_path, wara_layers
from wara_train.synthetic import randomize_factors as randomize
from wara_train.wavelets import blocks


def pywt_delta(layer) -> torch.Tensor:
    """Independent reference ΔW: pywt.waverec2 of the block products, float64."""
    cfg = layer.config
    j = cfg.levels
    prod = {n: (layer.wara_B[n].double() @ layer.wara_A[n].double()).detach().numpy() for n in layer.wara_A}
    coeffs = [prod[f"a{j}"]] + [tuple(prod[f"{k}{i}"] for k in "hvd") for i in range(j, 0, -1)]
    return cfg.scale * torch.from_numpy(pywt.waverec2(coeffs, cfg.wavelet, mode="periodization"))


CASES = [("haar", 1), ("db2", 2), ("sym4", 3)]


@pytest.mark.parametrize("wavelet,levels", CASES)
def test_linear_paths_match_pywt_reference_float64(wavelet, levels):
    torch.manual_seed(0)
    base = nn.Linear(96, 64).double()
    layer = WaraLinear(copy.deepcopy(base), WaraConfig(rank=3, alpha=6, wavelet=wavelet, levels=levels, dtype="float64"))
    randomize(layer)
    x = torch.randn(2, 7, 96, dtype=torch.float64)
    ref = F.linear(x, base.weight + pywt_delta(layer), base.bias)
    for path in PATHS:
        layer.set_path(path)
        with torch.no_grad():
            assert_close(layer(x), ref, msg=f"path {path}")


@pytest.mark.parametrize("mode", ["periodization", "boundary"])
def test_paths_agree_in_boundary_and_periodization_modes(mode):
    base = nn.Linear(64, 128).double()
    layer = WaraLinear(base, WaraConfig(rank=2, wavelet="db2", mode=mode, levels=2, dtype="float64"))
    randomize(layer, 1)
    x = torch.randn(5, 64, dtype=torch.float64)
    outs = {}
    for path in PATHS:
        layer.set_path(path)
        with torch.no_grad():
            outs[path] = layer(x)
    ref = x @ (base.weight + layer.delta_weight()).T + base.bias
    for path, y in outs.items():
        assert_close(y, ref, msg=path)


class Conv1D(nn.Module):
    """A minimal stand-in for transformers' GPT-2 ``Conv1D``: ``y = x W + b``, W stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(-1, x.shape[-1]) @ self.weight + self.bias).reshape(*x.shape[:-1], self.nf)


def _conv1d_classes():
    yield pytest.param(Conv1D, id="stand-in")
    try:
        from transformers.pytorch_utils import Conv1D as HFConv1D
    except ImportError:
        return
    yield pytest.param(HFConv1D, id="transformers")


@pytest.mark.parametrize("conv1d", list(_conv1d_classes()))
@pytest.mark.parametrize("wavelet,levels", CASES)
def test_conv1d_paths_match_pywt_reference_float64(conv1d, wavelet, levels):
    torch.manual_seed(2)
    base = conv1d(64, 96).double()  # 96 in, 64 out: W stored (96, 64)
    with torch.no_grad():
        base.bias.normal_()
    assert is_conv1d(base)
    layer = wrap(copy.deepcopy(base), WaraConfig(rank=3, alpha=6, wavelet=wavelet, levels=levels, dtype="float64"))
    assert isinstance(layer, WaraConv1D) and layer.weight_shape == (64, 96)
    randomize(layer, 3)
    x = torch.randn(2, 7, 96, dtype=torch.float64)
    ref = x @ (base.weight + pywt_delta(layer).T) + base.bias  # ΔW is (out, in): the weight's transpose
    for path in PATHS:
        layer.set_path(path)
        with torch.no_grad():
            assert_close(layer(x), ref, msg=f"path {path}")
    assert torch.equal(layer.base.weight, base.weight)  # merging never touches the base


@pytest.mark.parametrize("wavelet,levels", CASES[:2])
def test_conv1x1_paths_match_reference(wavelet, levels):
    torch.manual_seed(1)
    base = nn.Conv2d(32, 48, kernel_size=1).double()
    layer = WaraConv1x1(copy.deepcopy(base), WaraConfig(rank=2, wavelet=wavelet, levels=levels, dtype="float64"))
    randomize(layer, 2)
    x = torch.randn(2, 32, 5, 3, dtype=torch.float64)
    w = base.weight[:, :, 0, 0] + pywt_delta(layer)
    ref = F.conv2d(x, w[:, :, None, None], base.bias)
    for path in PATHS:
        layer.set_path(path)
        with torch.no_grad():
            assert_close(layer(x), ref, msg=path)


def test_fold_is_an_exact_lora_of_rank_blocks_times_r():
    layer = WaraLinear(nn.Linear(96, 64).double(), WaraConfig(rank=3, wavelet="db2", levels=2, dtype="float64"))
    randomize(layer)
    la, lb = layer.folded()
    assert la.shape == (7 * 3, 96) and lb.shape == (64, 7 * 3)  # (3J+1)·r blocks
    assert_close(lb @ la, pywt_delta(layer))


def test_zero_init_equals_base_and_merge_keeps_base_pristine():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    pristine = base.weight.detach().clone()
    layer = WaraLinear(base, WaraConfig(rank=4, wavelet="db2"))
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = F.linear(x, pristine, base.bias)
        for path in PATHS:
            layer.set_path(path)
            assert torch.equal(layer(x), expected), path  # exactly: ΔW is exactly zero
    assert all(torch.count_nonzero(b) == 0 for b in layer.wara_B.values())
    randomize(layer)
    for _ in range(10):  # merge/unmerge cycles never touch the base weight
        layer.merge()
        layer.unmerge()
    assert torch.equal(layer.base.weight, pristine)


def test_gradients_reach_only_factors_and_modules_to_save():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    inject(model, WaraConfig(rank=2, target_modules=("0", "2"), modules_to_save=("4",)))
    for path in PATHS:
        set_path(model, path)
        model.zero_grad()
        model(torch.randn(8, 32)).sum().backward()
        for name, p in model.named_parameters():
            is_factor = ".wara_A." in name or ".wara_B." in name
            trainable = is_factor or name.startswith("4.")
            assert p.requires_grad == trainable, name
            if not trainable:
                assert p.grad is None, name
        # B is zero at init, so A gets no gradient at step 0; B and the head do.
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None for n, g in grads.items() if ".wara_B." in n or n.startswith("4.")), path
        assert any(g.abs().sum() > 0 for n, g in grads.items() if ".wara_B." in n), path


@pytest.mark.parametrize("m,n", [(384, 384), (1536, 384), (64, 96)])
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_parameter_count_formula(m, n, rank):
    layer = WaraLinear(nn.Linear(n, m), WaraConfig(rank=rank, levels=1))
    count = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert count == wara_param_count(m, n, rank=rank, levels=1) == 2 * rank * (m + n)
    lora_2r = 2 * rank * (m + n)  # LoRA rank 2r: A (2r, n) + B (m, 2r)
    assert count == lora_2r
    # Deeper pyramids: r · Σ_s (m_s + n_s) over the blocks.
    for levels in (2, 3):
        layer = WaraLinear(nn.Linear(n, m), WaraConfig(rank=rank, levels=levels))
        count = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert count == rank * sum(sum(b.shape(m, n)) for b in blocks(levels))
        assert count == wara_param_count(m, n, rank=rank, levels=levels)


def test_target_selection_exact_suffix_regex_and_errors():
    model = nn.Sequential()
    model.add_module("enc", nn.ModuleDict({"query": nn.Linear(8, 8), "value": nn.Linear(8, 8), "norm": nn.LayerNorm(8)}))
    model.add_module("head", nn.Linear(8, 2))
    assert find_targets(model, ("enc.query",)) == ["enc.query"]
    assert find_targets(model, ("query", "value")) == ["enc.query", "enc.value"]
    assert find_targets(model, r"enc\.(query|value)") == ["enc.query", "enc.value"]
    with pytest.raises(ConfigError, match="'key' matches no module"):
        find_targets(model, ("query", "key"))
    with pytest.raises(ConfigError, match="LayerNorm.*nn.Linear, 1x1"):
        find_targets(model, ("norm",))
    with pytest.raises(ConfigError, match="no nn.Linear, 1x1 nn.Conv2d or Conv1D module matches"):
        find_targets(model, r"nothing.*")
    with pytest.raises(ConfigError, match="not divisible"):
        inject(nn.Sequential(nn.Linear(10, 8)), WaraConfig(target_modules=("0",), levels=2))
    with pytest.raises(ConfigError, match="1x1 convolutions"):
        WaraConv1x1(nn.Conv2d(8, 8, 3), WaraConfig())


def test_inject_failure_leaves_model_unchanged():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 10))
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(ConfigError):
        inject(model, WaraConfig(target_modules=("0", "1"), levels=2))  # 10 rows: not divisible by 4
    assert not wara_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def _mixed_model() -> nn.Module:
    """Every kind of layer, some whose dims do not halve twice, and a head."""
    model = nn.Module()
    model.wide = nn.Linear(16, 32)
    model.odd_out = nn.Linear(16, 10)  # 10 rows: not divisible by 4
    model.odd_in = nn.Linear(6, 16)  # 6 columns: not divisible by 4
    model.pointwise = nn.Conv2d(16, 32, 1)
    model.spatial = nn.Conv2d(16, 16, 3)  # not pointwise: never adaptable
    model.norm = nn.LayerNorm(16)
    model.block = nn.ModuleDict({"fc": nn.Linear(32, 32), "c1d": Conv1D(32, 16)})  # Conv1D: 16 in, 32 out
    model.odd_c1d = Conv1D(10, 16)  # 10 out
    model.head = nn.Linear(32, 4)
    return model


def test_adaptable_layers_fallback_keeps_divisible_layers_outside_the_head():
    model = _mixed_model()
    assert adaptable_layers(model, levels=2, exclude=("head",)) == ["wide", "pointwise", "block.fc", "block.c1d"]
    assert adaptable_layers(model, levels=1, exclude=("head", "block")) == ["wide", "odd_out", "odd_in", "pointwise",
                                                                           "odd_c1d"]
    assert "head" in adaptable_layers(model, levels=2)  # only what `exclude` names is left out


def test_adaptable_layers_errors_name_the_layers():
    model = nn.Module()
    model.proj = nn.Linear(9, 6)
    model.c1d = Conv1D(6, 3)
    model.head = nn.Linear(6, 3)
    with pytest.raises(ConfigError, match="divisible by 2\\^1 = 2") as e:
        adaptable_layers(model, levels=1, exclude=("head",))
    assert "proj (6x9)" in str(e.value) and "c1d (6x3)" in str(e.value) and "head" not in str(e.value)
    with pytest.raises(ConfigError, match="no adaptable layer"):
        adaptable_layers(nn.Sequential(nn.Conv2d(3, 3, 3), nn.LayerNorm(3)))
    only_head = nn.Module()
    only_head.stem = nn.Conv2d(3, 8, 3)
    only_head.head = nn.Linear(8, 2)
    with pytest.raises(ConfigError, match="no adaptable layer"):
        adaptable_layers(only_head, exclude=("head",))


def _snapshot(model: nn.Module):
    return ({n: p.detach().clone() for n, p in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def test_inject_lists_every_bad_target_and_changes_nothing():
    model = _mixed_model()
    state, types, grads = _snapshot(model)
    bad = ["odd_out", "odd_in", "spatial", "norm", "odd_c1d"]
    with pytest.raises(ConfigError, match="5 target layer\\(s\\) cannot take this adapter, nothing was changed") as e:
        inject(model, WaraConfig(target_modules=("wide", *bad, "c1d"), levels=2, modules_to_save=("head",)))
    msg = str(e.value)
    for name in bad:
        assert f"{name}:" in msg or f"{name}," in msg, (name, msg)
    assert "wide" not in msg and "block.c1d" not in msg
    assert "not divisible" in msg and "1x1 convolutions" in msg and "not LayerNorm" in msg
    after_state, after_types, after_grads = _snapshot(model)
    assert after_types == types and after_grads == grads and not hasattr(model, "wara_config")
    assert state.keys() == after_state.keys() and all(torch.equal(state[k], after_state[k]) for k in state)


def test_find_targets_lists_every_layer_that_cannot_take_an_adapter():
    model = nn.Sequential(*[nn.LayerNorm(8) for _ in range(10)], nn.Linear(8, 8))
    names = tuple(str(i) for i in range(11))
    with pytest.raises(ConfigError, match="cannot take an adapter") as e:
        find_targets(model, names)
    assert all(f"{i} (LayerNorm)" in str(e.value) for i in range(10))
    assert find_targets(model, r"\d+") == ["10"]  # a regex adapts what it can among its matches
