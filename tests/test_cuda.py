"""On a CUDA device, against slow CPU references: the multi-adapter LoRA kernel, the PyTorch
engine on a mixed batch (and its merged path), and the WaRA layer's three paths.

Marked ``cuda`` (``pytest -m cuda``, run by ``make gpu-check``); skipped where torch sees no
CUDA device, so the CPU suite only collects them.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_close
from test_layer import CASES, pywt_delta

from references import reference_lora
from runtime.kernels import grouped_lora
from wara_train.config import WaraConfig
from wara_train.layer import PATHS, WaraConv1x1, WaraLinear
from wara_train.synthetic import randomize_factors

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
CUDA = "cuda"


def test_grouped_lora_on_cuda_matches_cpu_reference():
    """The kernel on a CUDA page pool (MiniLM's intermediate layer, ranks 32, 8, 3 and 16)."""
    from runtime.adapters import PagePool
    from runtime.kernels import Routing
    from runtime.slots import SlotLayer

    gen = torch.Generator().manual_seed(0)
    n, m = 384, 1536
    ranks = {1: 32, 2: 8, 3: 3, 4: 16}
    layer = SlotLayer(torch.nn.Linear(n, m).to(CUDA), pages=64, routing=Routing(), kernel=grouped_lora)
    pool = PagePool(64)
    a = torch.zeros(5, 32, n)  # the reference's padded stacks (slot 0: zeros)
    b = torch.zeros(5, m, 32)
    for s, r in ranks.items():
        fa, fb = 0.1 * torch.randn(r, n, generator=gen), 0.1 * torch.randn(m, r, generator=gen)
        a[s, :r], b[s, :, :r] = fa, fb
        page = pool.find(r)
        pool.runs[s] = (page, r)
        layer.place(s, page, fa.to(CUDA), fb.to(CUDA))
    x = torch.randn(9, 16, n, generator=gen)
    row_slots = torch.tensor([1, 0, 2, 1, 4, 3, 2, 0, 4])
    groups = [(s, (row_slots == s).nonzero().flatten()) for s in (1, 2, 3, 4)]
    on_cuda = [(s, rows.to(CUDA)) for s, rows in groups]  # the engine routes with device indices
    xc = x.to(CUDA)
    got = grouped_lora(xc, layer, on_cuda)
    assert got.is_cuda
    assert_close(got.cpu(), reference_lora(x, a, b, groups))
    assert torch.count_nonzero(got[1]) == 0 and torch.count_nonzero(got[7]) == 0  # base rows
    one = [(3, torch.arange(9))]  # every row on one adapter: the single-GEMM path
    assert_close(grouped_lora(xc, layer, [(3, torch.arange(9, device=CUDA))]).cpu(), reference_lora(x, a, b, one))
    assert grouped_lora(xc, layer, []) is None


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random GPT-2 (Conv1D layers) as a feature extractor: no model package needed on
    the GPU machine, only transformers."""
    import tiny_models

    from wara_train.basespec import resolve_base

    return resolve_base(f"hf:{tiny_models.make_gpt2(tmp_path_factory.mktemp('cuda-base') / 'gpt2')}@feature-extraction")


@pytest.fixture(scope="module")
def two_adapters(tiny_base, tmp_path_factory):
    from wara_train.synthetic import random_adapter

    root = tmp_path_factory.mktemp("cuda-adapters")
    return (random_adapter(tiny_base, root / "one", wavelet="haar", levels=1, rank=2, num_labels=5, seed=1),
            random_adapter(tiny_base, root / "two", wavelet="db2", levels=2, rank=3, num_labels=3, seed=2))


def test_engine_mixed_batch_on_cuda_matches_cpu_engine(tiny_base, two_adapters):
    from runtime.adapters import DeviceTier, prepare
    from runtime.engine import TorchEngine

    inputs = tiny_base.sample(3, 12)
    slots = [0, 1, 2]  # base row, adapter 1, adapter 2: one forward
    answers = {}
    for device in ("cpu", CUDA):
        engine = TorchEngine(tiny_base, device=device)
        tier = DeviceTier(engine)
        folded = [prepare(engine, f"a{i}", a) for i, a in enumerate(two_adapters, start=1)]
        for i, f in enumerate(folded, start=1):
            tier.write(i, f)
        assert next(engine.model.parameters()).device.type == device
        rows = engine.forward(inputs, slots)
        merged = engine.forward_merged(engine.build_merged(folded[1].factors), folded[1].head, inputs)  # the hot-adapter path
        answers[device] = (rows, merged)
        del engine, tier
    (cpu_rows, cpu_merged), (gpu_rows, gpu_merged) = answers["cpu"], answers[CUDA]
    assert set(gpu_rows[0]) == {"embeddings"}
    assert gpu_rows[1]["logits"].shape == (5,) and gpu_rows[2]["logits"].shape == (3,)
    for i, (want, got) in enumerate(zip(cpu_rows, gpu_rows)):
        assert set(got) == set(want)
        for k in want:
            assert_close(got[k], want[k], dtype=torch.float32, msg=f"row {i} ({k})")
    for j in range(len(slots)):  # merged adapter 2 on every row == the served adapter 2 row on the CPU
        assert_close(gpu_merged[j]["logits"], cpu_merged[j]["logits"], dtype=torch.float32, msg=f"merged row {j}")
    assert_close(gpu_merged[2]["logits"], cpu_rows[2]["logits"], dtype=torch.float32, msg="merged vs slot")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("wavelet,levels", CASES)
def test_linear_paths_on_cuda_match_pywt_reference(wavelet, levels, dtype):
    torch.manual_seed(0)
    base = nn.Linear(96, 64).to(dtype)
    layer = WaraLinear(copy.deepcopy(base), WaraConfig(rank=3, alpha=6, wavelet=wavelet, levels=levels,
                                                       dtype=str(dtype).removeprefix("torch.")))
    randomize_factors(layer)
    x = torch.randn(2, 7, 96, dtype=dtype)
    want = F.linear(x.double(), base.weight.double() + pywt_delta(layer), base.bias.double())  # CPU, float64
    layer.to(CUDA)
    for path in PATHS:
        layer.set_path(path)
        with torch.no_grad():
            got = layer(x.to(CUDA))
        assert got.is_cuda and got.dtype == dtype
        assert_close(got.cpu(), want, dtype=dtype, msg=f"path {path}")


@pytest.mark.parametrize("wavelet,levels", CASES[:2])
def test_conv1x1_paths_on_cuda_match_pywt_reference(wavelet, levels):
    torch.manual_seed(1)
    base = nn.Conv2d(32, 48, kernel_size=1).double()  # float64: cuDNN's TF32 does not apply
    layer = WaraConv1x1(copy.deepcopy(base), WaraConfig(rank=2, wavelet=wavelet, levels=levels, dtype="float64"))
    randomize_factors(layer, 2)
    x = torch.randn(2, 32, 5, 3, dtype=torch.float64)
    w = base.weight[:, :, 0, 0] + pywt_delta(layer)
    want = F.conv2d(x, w[:, :, None, None], base.bias)
    layer.to(CUDA)
    for path in PATHS:
        layer.set_path(path)
        with torch.no_grad():
            got = layer(x.to(CUDA))
        assert got.is_cuda
        assert_close(got.cpu(), want, msg=f"path {path}")
