"""The fused multi-adapter ops (runtime/native) in all three implementations, against float64
row-by-row oracles: `reference.sgmv_delta_f64` for the LoRA form, pywt's ``waverec2`` of each
slot's blocks for the wavelet form.

* native: ``torch.ops.wara.*`` from the C++ library, built here (the build is part of set-up: if
  it fails, these tests fail and say why).
* torch: the pure-PyTorch twins (what serves when the build fails).
* triton: the GPU kernels, run in Triton's interpreter (``TRITON_INTERPRET=1``) where there is no
  GPU, on small shapes (the interpreter runs each program in numpy).
"""

from __future__ import annotations

import math

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_close

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton_ops' kernels are decorated

from references import pywt_delta  # noqa: E402
from runtime import native  # noqa: E402
from runtime.native import reference  # noqa: E402
from runtime.native.packing import own_layout, pack_folded, pack_own, stack_slots, wavelet_filters  # noqa: E402
from runtime.selection import op_backend  # noqa: E402
from wara_train.delta import delta_weight, fold  # noqa: E402
from wara_train.wavelets import WaveletSpec, blocks  # noqa: E402

IMPLS = ("native", "torch", "triton")
SEQ = 3  # tokens per batch row: a row's tokens are one run of its adapter


def impl(name: str):
    """The object whose ``sgmv`` / ``wavelet_lowrank`` are under test (on CPU tensors)."""
    if name == "triton" and torch.cuda.is_available():
        pytest.skip("compiled Triton takes CUDA tensors here: the cuda tests below run it")
    if name == "native":
        st = native.load()
        if not st.native:
            pytest.fail(f"the native library did not build or load: {st.reason}")
        return torch.ops.wara
    if name == "triton":
        try:
            from runtime.native import triton_ops
        except ImportError as e:
            pytest.fail(f"triton is not installed ({e}); `make test` installs it")
        return triton_ops
    return reference


def row_slots(gen: torch.Generator, rows: int, adapters: int) -> list[int]:
    """A slot per batch row: every adapter at least once where rows allow, base rows (-1) and the
    empty slot (rank 0, index ``adapters``) mixed in, shuffled."""
    pool = list(range(adapters)) + ([-1, adapters] if rows > adapters else [])
    picks = (pool * (rows // len(pool) + 1))[:rows]
    return [picks[i] for i in torch.randperm(rows, generator=gen).tolist()]


def tokens_of(rows: list[int]) -> torch.Tensor:
    return torch.tensor([s for s in rows for _ in range(SEQ)], dtype=torch.int64)


def ranks_for(adapters: int) -> list[int]:
    """Mixed ranks, then the empty slot (rank 0) and one slot no token uses."""
    cycle = [4, 1, 16, 3, 8, 5]
    return [cycle[i % len(cycle)] for i in range(adapters)] + [0, 2]


def lora_pool(gen, ranks: list[int], m: int, n: int):
    slots = [pack_folded(0.3 * torch.randn(r, n, generator=gen), 0.3 * torch.randn(m, r, generator=gen))
             for r in ranks]
    pool, offsets = stack_slots(slots)
    return pool, torch.tensor(offsets), torch.tensor(ranks)


def wara_factors(gen, rank: int, m: int, n: int, levels: int) -> dict:
    return {b.name: (0.3 * torch.randn(rank, n >> b.level, generator=gen),
                     0.3 * torch.randn(m >> b.level, rank, generator=gen)) for b in blocks(levels)}


def wara_pool(gen, ranks: list[int], m: int, n: int, spec: WaveletSpec, scale: float = 0.5):
    slots = [pack_own(wara_factors(gen, r, m, n, spec.levels), spec=spec, scale=scale) for r in ranks]
    pool, offsets = stack_slots(slots)
    return pool, torch.tensor(offsets), torch.tensor(ranks)


def check_update(y0: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, token_slot: torch.Tensor, ranks) -> None:
    """y == y0 + delta within y's tolerance, and rows of base tokens or empty slots unchanged."""
    assert_close(y, y0.double() + delta)
    idle = [t for t, s in enumerate(token_slot.tolist()) if s < 0 or ranks[s] == 0]
    assert torch.equal(y[idle], y0[idle])


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("rows,adapters", [(1, 1), (8, 1), (8, 5), (32, 3), (32, 32)])
def test_sgmv_matches_float64_reference(name, rows, adapters):
    ops = impl(name)
    gen = torch.Generator().manual_seed(rows * 100 + adapters)
    n, m = 40, 56  # not multiples of the vector width or of Triton's tiles: every tail runs
    ranks = ranks_for(adapters)
    pool, offsets, rank_t = lora_pool(gen, ranks, m, n)
    token_slot = tokens_of(row_slots(gen, rows, adapters))
    x = torch.randn(len(token_slot), n, generator=gen)
    y0 = torch.randn(len(token_slot), m, generator=gen)
    y = y0.clone()
    ops.sgmv(x, y, pool, token_slot, offsets, rank_t)
    delta = reference.sgmv_delta_f64(x, pool, token_slot, offsets, rank_t, out_features=m)
    check_update(y0, y, delta, token_slot, ranks)


@pytest.mark.parametrize("name", IMPLS)
def test_sgmv_interleaved_tokens_and_strided_rows(name):
    """Tokens of many slots interleaved one by one (no runs), x and y views with padded rows."""
    ops = impl(name)
    gen = torch.Generator().manual_seed(7)
    n, m, ranks = 24, 33, [2, 7, 0, 16, 1]
    pool, offsets, rank_t = lora_pool(gen, ranks, m, n)
    token_slot = torch.randint(-1, len(ranks), (29,), generator=gen)
    x = torch.randn(29, n + 5, generator=gen)[:, :n]
    y_store = torch.randn(29, m + 3, generator=gen)
    y0 = y_store[:, :m].clone()
    ops.sgmv(x, y_store[:, :m], pool, token_slot, offsets, rank_t)
    delta = reference.sgmv_delta_f64(x, pool, token_slot, offsets, rank_t, out_features=m)
    check_update(y0, y_store[:, :m], delta, token_slot, ranks)


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("wavelet,levels", [("haar", 1), ("haar", 2), ("haar", 3), ("db2", 1), ("db2", 2), ("db2", 3)])
def test_wavelet_lowrank_matches_pywt(name, wavelet, levels):
    ops = impl(name)
    gen = torch.Generator().manual_seed(levels * 10 + len(wavelet))
    n, m = 64, 48
    spec = WaveletSpec(wavelet, "periodization", levels)
    ranks = ranks_for(4)
    pool, offsets, rank_t = wara_pool(gen, ranks, m, n, spec)
    token_slot = tokens_of(row_slots(gen, 8, 4))
    x = torch.randn(len(token_slot), n, generator=gen)
    y0 = torch.randn(len(token_slot), m, generator=gen)
    y = y0.clone()
    lo, hi = wavelet_filters(wavelet)
    ops.wavelet_lowrank(x, y, pool, token_slot, offsets, rank_t, levels, lo, hi)
    delta = reference.wavelet_delta_f64(x, pool, token_slot, offsets, rank_t, out_features=m, levels=levels,
                                        wavelet=wavelet)
    check_update(y0, y, delta, token_slot, ranks)


@pytest.mark.parametrize("name", ["native", "torch"])
@pytest.mark.parametrize("rows,adapters", [(1, 1), (32, 32)])
def test_wavelet_lowrank_batch_sizes(name, rows, adapters):
    """One row on one adapter, and 32 rows on 32 adapters (MiniLM's FFN shape over 4)."""
    ops = impl(name)
    gen = torch.Generator().manual_seed(rows + adapters)
    n, m = 96, 384
    spec = WaveletSpec("db2", "periodization", 2)
    ranks = ranks_for(adapters)
    pool, offsets, rank_t = wara_pool(gen, ranks, m, n, spec)
    token_slot = tokens_of(row_slots(gen, rows, adapters))
    x = torch.randn(len(token_slot), n, generator=gen)
    y0 = torch.randn(len(token_slot), m, generator=gen)
    y = y0.clone()
    lo, hi = wavelet_filters("db2")
    ops.wavelet_lowrank(x, y, pool, token_slot, offsets, rank_t, 2, lo, hi)
    delta = reference.wavelet_delta_f64(x, pool, token_slot, offsets, rank_t, out_features=m, levels=2,
                                        wavelet="db2")
    check_update(y0, y, delta, token_slot, ranks)


@pytest.mark.parametrize("wavelet,levels", [("haar", 1), ("db2", 2)])
@pytest.mark.parametrize("tokens", [1, 5, 67])
def test_native_every_rank_and_odd_token_counts(wavelet, levels, tokens):
    """The CPU kernels' register blocks (ranks 4 at a time, then 3, 2 or 1; tokens 3 at a time,
    then 2, 1; output panels, whole and partial vectors, scalar tails) for ranks 1-9, one slot
    per call, odd token counts, band widths that are no multiple of the vector width."""
    ops = impl("native")
    n, m = 104, 232  # J=1 bands 52 and 116: a partial expand panel, vector and scalar tails
    spec = WaveletSpec(wavelet, "periodization", levels)
    lo, hi = wavelet_filters(wavelet)
    for rank in range(1, 10):
        gen = torch.Generator().manual_seed(rank * 1000 + tokens)
        token_slot = torch.zeros(tokens, dtype=torch.int64)
        x = torch.randn(tokens, n, generator=gen)
        y0 = torch.randn(tokens, m, generator=gen)
        pool, offsets, rank_t = wara_pool(gen, [rank], m, n, spec)
        y = y0.clone()
        ops.wavelet_lowrank(x, y, pool, token_slot, offsets, rank_t, levels, lo, hi)
        delta = reference.wavelet_delta_f64(x, pool, token_slot, offsets, rank_t, out_features=m, levels=levels,
                                            wavelet=wavelet)
        check_update(y0, y, delta, token_slot, [rank])
        pool, offsets, rank_t = lora_pool(gen, [rank * 4], m, n)
        y = y0.clone()
        ops.sgmv(x, y, pool, token_slot, offsets, rank_t)
        check_update(y0, y, reference.sgmv_delta_f64(x, pool, token_slot, offsets, rank_t, out_features=m),
                     token_slot, [rank * 4])


DTYPES = [(torch.bfloat16, torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32, torch.float32),
          (torch.float32, torch.bfloat16, torch.float32), (torch.float32, torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("x_dtype,pool_dtype,y_dtype", DTYPES)
def test_bfloat16(name, x_dtype, pool_dtype, y_dtype):
    """Cast inputs: the oracle sees the same rounded x and factors, so what is left is the
    kernel's float32 math and y's one rounding, within bfloat16's tolerance."""
    ops = impl(name)
    gen = torch.Generator().manual_seed(3)
    n, m, ranks = 32, 40, [3, 8, 0]
    token_slot = tokens_of([0, -1, 1, 2, 0, 1])
    x = torch.randn(len(token_slot), n, generator=gen).to(x_dtype)
    y0 = torch.randn(len(token_slot), m, generator=gen).to(y_dtype)
    pool, offsets, rank_t = lora_pool(gen, ranks, m, n)
    pool = pool.to(pool_dtype)
    y = y0.clone()
    ops.sgmv(x, y, pool, token_slot, offsets, rank_t)
    assert y.dtype == y_dtype
    assert_close(y, y0.double() + reference.sgmv_delta_f64(x, pool, token_slot, offsets, rank_t, out_features=m),
                 dtype=torch.bfloat16)
    for wavelet in ("db2", "haar"):  # haar at one level: the expands fused with the synthesis
        spec = WaveletSpec(wavelet, "periodization", 1)
        pool, offsets, rank_t = wara_pool(gen, ranks, m, n, spec)
        pool = pool.to(pool_dtype)
        y = y0.clone()
        lo, hi = wavelet_filters(wavelet)
        ops.wavelet_lowrank(x, y, pool, token_slot, offsets, rank_t, 1, lo, hi)
        delta = reference.wavelet_delta_f64(x, pool, token_slot, offsets, rank_t, out_features=m, levels=1,
                                            wavelet=wavelet)
        assert_close(y, y0.double() + delta, dtype=torch.bfloat16)


def _set_layers(gen, spec, n, shapes_ranks, dtype=torch.float32):
    """Pools of several layers that share an input (out features, per-slot ranks), one slot
    table shape: (pools, offsets, ranks) lists."""
    pools, offs, ranks = [], [], []
    for m, rs in shapes_ranks:
        pool, off, rank = wara_pool(gen, rs, m, n, spec)
        pools.append(pool.to(dtype)), offs.append(off), ranks.append(rank)
    return pools, offs, ranks


@pytest.mark.parametrize("wavelet,levels", [("haar", 1), ("db2", 2), ("haar", 3)])
def test_wavelet_lowrank_set_writes_bias_plus_update_for_layers_sharing_an_input(wavelet, levels):
    """``wara::wavelet_lowrank_set`` (the CPU op an adapted Linear runs before its base GEMM) and
    ``_set_shared``: for each of several layers that share x (one DWT, one stacked shrink per band), y = bias + ΔW_s x
    on adapted rows, the bias alone on base rows and where a slot is empty in that layer (rank 0:
    the adapter skips the layer), 0 without a bias; y is never read (it starts as NaN); ranks
    differ per slot and per layer; the layers' widths differ (a narrower value projection)."""
    ops = impl("native")
    gen = torch.Generator().manual_seed(levels * 7 + len(wavelet))
    n = 64
    spec = WaveletSpec(wavelet, "periodization", levels)
    layers = [(48, [3, 1, 4, 0, 2]), (48, [5, 0, 2, 0, 1]), (24, [3, 2, 0, 0, 6])]  # slot 3: empty everywhere
    pools, offs, ranks = _set_layers(gen, spec, n, layers)
    token_slot = tokens_of([0, -1, 1, 2, 3, 0, 2, -1, 4, 1])
    x = torch.randn(len(token_slot), n, generator=gen)
    biases = [torch.randn(48, generator=gen), None, torch.randn(24, generator=gen)]
    lo, hi = wavelet_filters(wavelet)
    for k in ([0], [0, 1, 2], [2, 1]):  # one layer, all three, a subset in another order
        ys = [torch.full((len(token_slot), layers[i][0]), float("nan")) for i in k]
        ops.wavelet_lowrank_set_shared(x, ys, [biases[i] for i in k], [pools[i] for i in k], token_slot,
                                       [offs[i] for i in k], [ranks[i] for i in k], levels, lo, hi)
        if len(k) == 1:  # the one-layer op: the same
            y1 = torch.full_like(ys[0], float("nan"))
            ops.wavelet_lowrank_set(x, y1, biases[k[0]], pools[k[0]], token_slot, offs[k[0]], ranks[k[0]], levels, lo, hi)
            assert torch.equal(y1, ys[0])
        for y, i in zip(ys, k):
            m = layers[i][0]
            delta = reference.wavelet_delta_f64(x, pools[i], token_slot, offs[i], ranks[i], out_features=m,
                                                levels=levels, wavelet=wavelet)
            bias = torch.zeros(m) if biases[i] is None else biases[i]
            assert_close(y, bias.double() + delta)
            idle = [t for t, s in enumerate(token_slot.tolist()) if s < 0 or layers[i][1][s] == 0]
            assert torch.equal(y[idle], bias.expand(len(idle), m))


def test_narrow_layers_at_three_levels_and_one_token_tiles():
    """Bands narrower than a vector and a cache line (width 16 at J = 3: bands of 8, 4, 2), one
    token per tile (the slot changes every token): the per-thread band buffers hold every band
    as laid out (each rounded up to a cache line), in both modes and with several layers."""
    ops = impl("native")
    gen = torch.Generator().manual_seed(21)
    n, spec = 16, WaveletSpec("db2", "periodization", 3)
    layers = [(16, [2, 3, 1]), (8, [1, 0, 2])]
    pools, offs, ranks = _set_layers(gen, spec, n, layers)
    token_slot = torch.tensor([0, 1, 2, -1, 0, 2, 1, 0, 1, 2, 0])
    x = torch.randn(len(token_slot), n, generator=gen)
    lo, hi = wavelet_filters("db2")
    y0 = torch.randn(len(token_slot), 16, generator=gen)
    y = y0.clone()
    ops.wavelet_lowrank(x, y, pools[0], token_slot, offs[0], ranks[0], 3, lo, hi)
    deltas = [reference.wavelet_delta_f64(x, p, token_slot, o, r, out_features=m, levels=3, wavelet="db2")
              for (m, _), p, o, r in zip(layers, pools, offs, ranks)]
    check_update(y0, y, deltas[0], token_slot, layers[0][1])
    ys = [torch.full((len(token_slot), m), float("nan")) for m, _ in layers]
    ops.wavelet_lowrank_set_shared(x, ys, [None, None], pools, token_slot, offs, ranks, 3, lo, hi)
    for y, delta in zip(ys, deltas):
        assert_close(y, delta)


def test_wavelet_lowrank_set_in_bfloat16_and_its_bad_arguments():
    ops = impl("native")
    gen = torch.Generator().manual_seed(11)
    n, spec = 32, WaveletSpec("db2", "periodization", 1)
    layers = [(40, [3, 8, 0]), (40, [2, 0, 5])]
    pools, offs, ranks = _set_layers(gen, spec, n, layers, dtype=torch.bfloat16)
    token_slot = tokens_of([0, -1, 1, 2, 0, 1])
    x = torch.randn(len(token_slot), n, generator=gen).to(torch.bfloat16)
    biases = [torch.randn(40, generator=gen).to(torch.bfloat16), None]
    for wavelet in ("db2", "haar"):  # haar at one level: the expands fused with the synthesis
        ys = [torch.empty(len(token_slot), 40, dtype=torch.bfloat16) for _ in layers]
        lo, hi = wavelet_filters(wavelet)
        ops.wavelet_lowrank_set_shared(x, ys, biases, pools, token_slot, offs, ranks, 1, lo, hi)
        for y, bias, pool, off, rank in zip(ys, biases, pools, offs, ranks):
            delta = reference.wavelet_delta_f64(x, pool, token_slot, off, rank, out_features=40, levels=1,
                                                wavelet=wavelet)
            assert_close(y, (0 if bias is None else bias.double()) + delta, dtype=torch.bfloat16)
    good = {"ys": [torch.zeros(len(token_slot), 40) for _ in layers], "biases": [None, None], "pools":
            [p.float() for p in pools], "offs": offs, "ranks": ranks}
    xf = x.float()
    for change, message in [({"biases": [None]}, "one entry per layer"),
                            ({"pools": pools[:1]}, "one entry per layer"),
                            ({"biases": [torch.zeros(39), None]}, "bias must be 1-D with one value per output"),
                            ({"biases": [None, torch.zeros(40, dtype=torch.float64)]}, "bias must be float32"),
                            ({"ys": [torch.zeros(len(token_slot), 40), torch.zeros(len(token_slot), 40,
                                                                                   dtype=torch.bfloat16)]}, "one dtype"),
                            ({"offs": [offs[0], offs[1][:2]], "ranks": [ranks[0], ranks[1][:2]]},
                             r"\(layer 1\): every layer needs the same slots"),
                            ({"ys": [torch.zeros(len(token_slot), 40), torch.zeros(3, 40)]},
                             r"\(layer 1\): x has \d+ tokens but y has 3"),
                            ({"ys": [torch.zeros(len(token_slot), 40), torch.zeros(len(token_slot), 41)]},
                             "divisible by 2\\^levels"),
                            ({"ys": []}, "one entry per layer")]:
        args = {**good, **change}
        ys = [y.clone() for y in args["ys"]]
        with pytest.raises(RuntimeError, match=message):
            ops.wavelet_lowrank_set_shared(xf, ys, args["biases"], args["pools"], token_slot, args["offs"],
                                           args["ranks"], 1, lo, hi)
    with pytest.raises(RuntimeError, match="bias must be 1-D"):
        ops.wavelet_lowrank_set(xf, good["ys"][0], torch.zeros(3), good["pools"][0], token_slot, offs[0], ranks[0], 1,
                                lo, hi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wavelet_linear_is_the_whole_layer(dtype):
    """``wara::wavelet_linear`` (``_shared`` for layers fed one input): y = x W^T + bias + ΔW_s x
    in a new y per layer, for nn.Linear weights (m, n) and Conv1D's transposed (n, m), against
    float64 on the same weights and pywt's delta; base rows and empty slots get the base layer."""
    ops = impl("native")
    gen = torch.Generator().manual_seed(5)
    n, spec = 32, WaveletSpec("haar", "periodization", 2)
    layers = [(40, [3, 0, 2]), (24, [1, 4, 0])]
    pools, offs, ranks = _set_layers(gen, spec, n, layers, dtype=dtype)
    token_slot = tokens_of([0, -1, 1, 2, 0])
    x = torch.randn(len(token_slot), n, generator=gen).to(dtype)
    weights = [torch.randn(m, n, generator=gen).to(dtype) for m, _ in layers]
    biases = [torch.randn(40, generator=gen).to(dtype), None]
    lo, hi = wavelet_filters("haar")
    want = []
    for (m, _), w, b, pool, off, rank in zip(layers, weights, biases, pools, offs, ranks):
        delta = reference.wavelet_delta_f64(x, pool, token_slot, off, rank, out_features=m, levels=2, wavelet="haar")
        want.append(x.double() @ w.double().T + (0 if b is None else b.double()) + delta)
    tol = dict(atol=2e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=2e-2)
    for transposed in (False, True):
        ws = [w.T.contiguous() if transposed else w for w in weights]
        ys = ops.wavelet_linear_shared(x, ws, biases, pools, token_slot, offs, ranks, 2, lo, hi, transposed)
        y0 = ops.wavelet_linear(x, ws[0], biases[0], pools[0], token_slot, offs[0], ranks[0], 2, lo, hi, transposed)
        assert [y.dtype for y in ys] == [dtype, dtype]
        for y, w in zip([y0, *ys], want[:1] + want):
            torch.testing.assert_close(y.double(), w, **tol)
    # Leading dims are tokens: (batch, seq, n) in, (batch, seq, m) out, the same values.
    x3 = x[:4].reshape(2, 2, n)
    ys3 = ops.wavelet_linear_shared(x3, weights, biases, pools, token_slot[:4], offs, ranks, 2, lo, hi)
    y3 = ops.wavelet_linear(x3, weights[1], biases[1], pools[1], token_slot[:4], offs[1], ranks[1], 2, lo, hi)
    assert [tuple(y.shape) for y in [*ys3, y3]] == [(2, 2, 40), (2, 2, 24), (2, 2, 24)]
    for y, w in zip([*ys3, y3], want + want[1:]):
        torch.testing.assert_close(y.reshape(4, -1).double(), w[:4], **tol)
    xf, wf = x.float(), [w.float() for w in weights]
    pf = [p.float() for p in pools]
    for call, message in [
        (lambda: ops.wavelet_linear(xf, wf[0][:, :30], None, pf[0], token_slot, offs[0], ranks[0], 2, lo, hi),
         r"weight of shape \[40, 30\] \(out_features, in_features\) does not fit x"),
        (lambda: ops.wavelet_linear(xf, wf[0], None, pf[0], token_slot, offs[0], ranks[0], 2, lo, hi, True),
         r"\(in_features, out_features\) does not fit"),
        (lambda: ops.wavelet_linear(xf, wf[0].double(), None, pf[0], token_slot, offs[0], ranks[0], 2, lo, hi),
         "weight is Double but x is Float"),
        (lambda: ops.wavelet_linear(xf, wf[0][0], None, pf[0], token_slot, offs[0], ranks[0], 2, lo, hi),
         "weight must be 2-D"),
        (lambda: ops.wavelet_linear(xf[0], wf[0], None, pf[0], token_slot, offs[0], ranks[0], 2, lo, hi),
         r"x must be \(\.\.\., in_features\), at least 2-D"),
        (lambda: ops.wavelet_linear(xf[:4].reshape(2, 2, n), wf[0], None, pf[0], token_slot, offs[0], ranks[0], 2,
                                    lo, hi), "token_slot"),
        (lambda: ops.wavelet_linear_shared(xf, wf, [None], pf, token_slot, offs, ranks, 2, lo, hi),
         "weights and biases need one entry per layer"),
        (lambda: ops.wavelet_linear_shared(xf, [wf[0], wf[1][:, :8]], [None, None], pf, token_slot, offs, ranks, 2,
                                           lo, hi), r"\(layer 1\): weight of shape"),
        (lambda: ops.wavelet_linear_shared(xf, wf, [None, None], pf[:1], token_slot, offs, ranks, 2, lo, hi),
         "one entry per layer"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_wavelet_linear_streams_a_large_y_and_matches_float64():
    """A y larger than twice the threads' L2 is written with streaming stores (`stream_y` in
    csrc/cpu/common.h; haar's synthesis, float32): one thread and 2048 tokens x 3072 features
    (24 MiB, past any L2 of 12 MiB or less) of mixed slots, base rows and an empty slot, against
    float64 and pywt's delta; then the same layer over 8 tokens (no streaming) matches too."""
    ops = impl("native")
    gen = torch.Generator().manual_seed(11)
    n, m, spec = 32, 3072, WaveletSpec("haar", "periodization", 1)
    pools, offs, ranks = _set_layers(gen, spec, n, [(m, [4, 2, 0])])
    token_slot = torch.tensor(([0] * 700 + [-1] * 300 + [1] * 600 + [2] * 48 + [0] * 400), dtype=torch.int64)
    x = torch.randn(len(token_slot), n, generator=gen)
    w, b = torch.randn(m, n, generator=gen), torch.randn(m, generator=gen)
    lo, hi = wavelet_filters("haar")
    delta = reference.wavelet_delta_f64(x, pools[0], token_slot, offs[0], ranks[0], out_features=m, levels=1,
                                        wavelet="haar")
    want = x.double() @ w.double().T + b.double() + delta
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        y = ops.wavelet_linear(x, w, b, pools[0], token_slot, offs[0], ranks[0], 1, lo, hi)
        y8 = ops.wavelet_linear(x[:8], w, b, pools[0], token_slot[:8], offs[0], ranks[0], 1, lo, hi)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(y.double(), want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(y8.double(), want[:8], atol=2e-4, rtol=1e-4)


def test_packed_factors_kept_between_calls_follow_every_write_to_the_pool():
    """The CPU op keeps each slot's packed float32 factors between calls (WARA_PACK_CACHE_MB):
    new factors written in place into a slot (same offset and rank), through a view as the
    engine writes them, are what the next call uses; so are those of a pool allocated where a
    freed one was, and of a pool made under inference mode (no version counter: packed per call)."""
    ops = impl("native")
    gen = torch.Generator().manual_seed(8)
    n, m, spec = 32, 48, WaveletSpec("haar", "periodization", 1)
    token_slot = tokens_of([0, 1, -1, 1])
    x = torch.randn(len(token_slot), n, generator=gen)
    lo, hi = wavelet_filters("haar")

    if os.environ.get("WARA_PACK_CACHE_MB") == "0":
        pytest.skip("WARA_PACK_CACHE_MB=0 turns the cache off in this process")
    stats = native.pack_cache_stats

    def check(pool, offs, ranks, expect: str):
        """expect: "packed" (every slot missed at least once: two threads may both look a slot up
        before either has stored it), "found" (no misses) or "uncached" (no lookups)."""
        before = stats()
        y = torch.full((len(token_slot), m), float("nan"))
        ops.wavelet_lowrank_set(x, y, None, pool, token_slot, offs, ranks, 1, lo, hi)
        assert_close(y, reference.wavelet_delta_f64(x, pool, token_slot, offs, ranks, out_features=m, levels=1,
                                                    wavelet="haar"))
        after = stats()
        hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
        assert {"packed": misses >= 2, "found": misses == 0 and hits >= 2,
                "uncached": misses == hits == 0}[expect], (expect, hits, misses)

    assert stats()["capacity_bytes"] == 64 << 20 or "WARA_PACK_CACHE_MB" in os.environ
    pool, offs, ranks = wara_pool(gen, [2, 3], m, n, spec)
    check(pool, offs, ranks, "packed")  # both slots
    check(pool, offs, ranks, "found")  # again
    for _ in range(2):  # slot 1 rewritten in place, as SlotLayer.place_own does: every slot packed anew
        fresh, _, _ = wara_pool(gen, [2, 3], m, n, spec)
        start, end = int(offs[1]), pool.numel()
        with torch.inference_mode():
            pool[start:end].copy_(fresh[start:end])
        check(pool, offs, ranks, "packed")
    for _ in range(4):  # pools freed and made again, of one size (the allocator may reuse the address)
        del pool
        pool, offs, ranks = wara_pool(gen, [2, 3], m, n, spec)
        check(pool, offs, ranks, "packed")
    with torch.inference_mode():
        frozen = pool.clone()
    check(frozen, offs, ranks, "uncached")  # no version counter: packed per call, never cached
    with torch.inference_mode():
        frozen.mul_(2)
    check(frozen, offs, ranks, "uncached")
    # layers sharing x (one key for all of them), bfloat16 pools
    pools, offs2, ranks2 = _set_layers(gen, spec, n, [(m, [2, 3]), (16, [1, 0])], dtype=torch.bfloat16)
    xb = x.to(torch.bfloat16)
    for found in (False, True, False):  # packed, found again, packed anew after a write to one pool
        before = stats()
        ys = [torch.empty(len(token_slot), w, dtype=torch.bfloat16) for w in (m, 16)]
        ops.wavelet_lowrank_set_shared(xb, ys, [None, None], pools, token_slot, offs2, ranks2, 1, lo, hi)
        for y, p, o, r, w in zip(ys, pools, offs2, ranks2, (m, 16)):
            assert_close(y, reference.wavelet_delta_f64(xb, p, token_slot, o, r, out_features=w, levels=1,
                                                        wavelet="haar"), dtype=torch.bfloat16)
        after = stats()
        hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
        assert (misses == 0 and hits >= 2) if found else misses >= 2, (found, hits, misses)
        if found:
            pools[1].mul_(-1)  # the second layer's pool only: the shared key changes


def test_packers_follow_the_core_delta_and_fold():
    """pack_own (scale folded into B) reproduces the core's ΔW (pywt, via tests/references), and
    the folded LoRA of the same adapter through sgmv equals the fused op on its own factors."""
    gen = torch.Generator().manual_seed(11)
    m, n, rank, scale = 48, 32, 3, 0.75
    spec = WaveletSpec("db2", "periodization", 2)
    factors = wara_factors(gen, rank, m, n, 2)
    own = pack_own(factors, spec=spec, scale=scale)
    assert own.numel() == native.own_numel(m, n, rank, 2)
    unpacked = native.unpack(own, 0, rank, own_layout(m, n, 2))
    core = pywt_delta(factors, shape=(m, n), wavelet="db2", levels=2, scale=scale)
    assert_close(reference.pywt_delta_weight(unpacked, shape=(m, n), wavelet="db2", levels=2), core, dtype=torch.float32)
    assert_close(delta_weight(factors, shape=(m, n), spec=spec, scale=scale), core, dtype=torch.float32)
    la, lb = fold(factors, shape=(m, n), spec=spec, scale=scale)
    folded = pack_folded(la, lb)
    assert la.shape[0] == 7 * rank and folded.numel() == native.folded_numel(m, n, 7 * rank)
    assert 5 * folded.numel() == 14 * own.numel()  # J=2: the folded slot holds 2.8x the own factors
    x = torch.randn(6, n, generator=gen)
    token_slot, offsets, ranks = torch.zeros(6, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), torch.tensor([rank])
    y_own, y_fold = torch.zeros(6, m), torch.zeros(6, m)
    ops = impl("native")
    lo, hi = wavelet_filters("db2")
    ops.wavelet_lowrank(x, y_own, own, token_slot, offsets, ranks, 2, lo, hi)
    ops.sgmv(x, y_fold, folded, token_slot, offsets, torch.tensor([la.shape[0]]))
    assert_close(y_own, x.double() @ core.T)
    assert_close(y_fold, x.double() @ core.T)


def test_packing_many_layers_at_once_and_the_delta_bound():
    """pack_own_many: every layer's slot as a hand-built flat (A, then scale · B in float32, per
    block) would hold it, all views of one tensor; own_delta_bounds is an upper bound on each
    layer's max |ΔW| (pywt's inverse transform, float64) and turns nan or inf for a non-finite
    factor value."""
    from runtime.native import own_delta_bounds, pack_own_many

    gen = torch.Generator().manual_seed(12)
    rank, scale = 3, 0.6
    for wavelet, levels in (("haar", 1), ("db2", 2), ("haar", 3)):
        spec = WaveletSpec(wavelet, "periodization", levels)
        shapes = {"q": (48, 32), "up": (64, 32), "down": (32, 64)}
        layers = {t: wara_factors(gen, rank, m, n, levels) for t, (m, n) in shapes.items()}
        pack = pack_own_many(layers, spec=spec, scale=scale)
        assert pack.flat.numel() == sum(native.own_numel(m, n, rank, levels) for m, n in shapes.values())
        bounds = own_delta_bounds(pack)
        for t, (m, n) in shapes.items():
            want = torch.cat([torch.cat([layers[t][blk.name][0].reshape(-1), (layers[t][blk.name][1] * scale).reshape(-1)])
                              for blk in own_layout(m, n, levels)])
            assert torch.equal(pack.views[t], want)
            assert pack.views[t].untyped_storage().data_ptr() == pack.flat.untyped_storage().data_ptr()
            peak = float(pywt_delta(layers[t], shape=(m, n), wavelet=wavelet, levels=levels, scale=scale).abs().max())
            assert peak <= bounds[t] < 1e3 * peak
    layers["up"][next(iter(layers["up"]))][0][0, 0] = float("nan")
    layers["down"][next(iter(layers["down"]))][1][1, 1] = float("inf")
    bounds = own_delta_bounds(pack_own_many(layers, spec=spec, scale=scale))
    assert math.isnan(bounds["up"]) and math.isinf(bounds["down"]) and math.isfinite(bounds["q"])
    # float64 factors: B scaled in float64 and cast once; a value past float32's range is inf in
    # a float32 slot, so its bound is not finite even where B is zero (an untrained adapter).
    f64 = {b.name: (0.3 * torch.randn(rank, 32 >> b.level, generator=gen, dtype=torch.float64),
                    torch.zeros(48 >> b.level, rank, dtype=torch.float64)) for b in blocks(levels)}
    f64[next(iter(f64))][0][0, 0] = 1e39
    pack = pack_own_many({"x": f64}, spec=spec, scale=scale)
    assert pack.flat.dtype == torch.float32 and not math.isfinite(own_delta_bounds(pack)["x"])
    # bfloat16 slots: every value equals the float32 pack rounded once.
    layers = {"q": wara_factors(gen, rank, 48, 32, levels)}
    want = pack_own_many(layers, spec=spec, scale=scale).flat.to(torch.bfloat16)
    assert torch.equal(pack_own_many(layers, spec=spec, scale=scale, dtype=torch.bfloat16).flat, want)
    assert pack_own_many({}, spec=spec, scale=scale).flat.numel() == 0


def _bad_calls(m: int, n: int):
    """(description, kwargs overrides, message) for each malformed call."""
    return [
        ("x 1-D", {"x": torch.zeros(n)}, "x must be 2-D"),
        ("token counts differ", {"y": torch.zeros(5, m)}, "tokens but y has"),
        ("integer x", {"x": torch.zeros(4, n, dtype=torch.int32)}, "float32 or bfloat16"),
        ("float64 pool", {"pool": torch.zeros(1000, dtype=torch.float64)}, "float32 or bfloat16"),
        ("2-D pool", {"pool": torch.zeros(10, 100)}, "contiguous 1-D"),
        ("int32 slots", {"token_slot": torch.zeros(4, dtype=torch.int32)}, "must be int64"),
        ("slot table lengths differ", {"slot_rank": torch.tensor([2, 2, 2])}, "same length"),
        ("slot past the table", {"token_slot": torch.tensor([0, 1, 2, -1])}, r"token 2 has slot 2, outside \[-1, 2\)"),
        ("slot below -1", {"token_slot": torch.tensor([0, -2, 1, 1])}, "token 1 has slot -2"),
        ("factors past the pool", {"slot_offset": torch.tensor([0, 990])}, "lies outside the pool"),
        ("negative offset", {"slot_offset": torch.tensor([-1, 0])}, "lies outside the pool"),
        ("negative rank", {"slot_rank": torch.tensor([2, -1])}, "negative rank"),
        ("features not contiguous", {"x": torch.zeros(n, 4).T}, "unit stride"),
    ]


@pytest.mark.parametrize("name", IMPLS)
def test_bad_arguments_raise_clear_errors(name):
    ops = impl(name)
    m, n = 16, 8
    good = {"x": torch.zeros(4, n), "y": torch.zeros(4, m), "pool": torch.zeros(1000),
            "token_slot": torch.tensor([0, 1, -1, 1]), "slot_offset": torch.tensor([0, 100]),
            "slot_rank": torch.tensor([2, 3])}
    order = ["x", "y", "pool", "token_slot", "slot_offset", "slot_rank"]
    lo, hi = wavelet_filters("db2")
    for what, change, message in _bad_calls(m, n):
        args = [change.get(k, good[k]) for k in order]
        with pytest.raises(RuntimeError, match=message):
            ops.sgmv(*args)
        with pytest.raises(RuntimeError, match=message):
            ops.wavelet_lowrank(*args, 1, lo, hi)
    args = [good[k] for k in order]
    for levels, flo, fhi, message in [(4, lo, hi, "divisible by 2\\^levels = 16"), (0, lo, hi, "levels must be"),
                                      (1, lo[:3], hi[:3], "even number of taps"), (1, lo, hi[:2], "of one length")]:
        with pytest.raises(RuntimeError, match=message):
            ops.wavelet_lowrank(*args, levels, flo, fhi)
    ops.sgmv(*args)  # the good call runs: the checks above failed for their own reason
    assert torch.count_nonzero(good["y"]) == 0  # zero factors add nothing


def test_dispatcher_picks_native_on_cpu_and_matches():
    gen = torch.Generator().manual_seed(5)
    pool, offsets, ranks = lora_pool(gen, [4, 2], 24, 16)
    token_slot = tokens_of([0, 1, -1])
    x = torch.randn(len(token_slot), 16, generator=gen)
    assert op_backend("cpu", native.status(), native.triton_available()) == "native", native.status().reason
    y = torch.zeros(len(token_slot), 24)
    native.sgmv(x, y, pool, token_slot, offsets, ranks)
    assert_close(y, reference.sgmv_delta_f64(x, pool, token_slot, offsets, ranks, out_features=24))


def test_failed_build_falls_back_with_a_warning_naming_the_reason(tmp_path):
    """No cmake on PATH and an empty build directory: the library cannot build, the pure kernels
    serve, and the warning says why."""
    code = textwrap.dedent("""
        import warnings, torch
        from runtime import native
        st = native.load()
        print("NATIVE", st.native, "|", st.reason.splitlines()[0])
        pool = torch.arange(12, dtype=torch.float32)  # A (2, 2) then B (4, 2)
        y = torch.zeros(1, 4)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            native.sgmv(torch.ones(1, 2), y, pool, torch.tensor([0]), torch.tensor([0]), torch.tensor([2]))
        print("WARN", w[0].message)
        print("Y", y.tolist())
    """)
    env = {**os.environ, "PATH": str(tmp_path), "WARA_NATIVE_BUILD_DIR": str(tmp_path / "build")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert "NATIVE False | build failed: cmake not found on PATH" in out.stdout
    assert "pure PyTorch kernels (build failed: cmake not found" in out.stdout
    # u = A @ [1, 1] = [0+1, 2+3] = [1, 5]; y = B @ u, B = [[4, 5], [6, 7], [8, 9], [10, 11]]
    assert "Y [[29.0, 41.0, 53.0, 65.0]]" in out.stdout


# ------------------------------------------------------------------------------------------
# On a GPU (`make gpu-check`): the CUDA and the compiled Triton kernels on device tensors,
# against the same CPU float64 oracles.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def gpu_impl(name: str):
    if name == "native":
        st = native.load()
        if not (st.native and st.cuda):
            pytest.fail(f"the native library has no CUDA kernels here: {st.describe()}")
        return torch.ops.wara
    from runtime.native import triton_ops

    return triton_ops


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels_match_cpu_float64_reference(name, dtype):
    ops = gpu_impl(name)
    gen = torch.Generator().manual_seed(21)
    cuda = torch.device("cuda")
    m, n = 1536, 384  # MiniLM's FFN, 32 rows of 64 tokens over 32 adapters plus base rows
    token_slot = torch.tensor([s for s in row_slots(gen, 40, 32) for _ in range(64)])
    x = torch.randn(len(token_slot), n, generator=gen).to(dtype)
    y0 = torch.randn(len(token_slot), m, generator=gen).to(dtype)
    ranks = ranks_for(32)
    pool, offsets, rank_t = lora_pool(gen, ranks, m, n)
    pool = pool.to(dtype)
    args = [t.to(cuda) for t in (x, y0.clone(), pool, token_slot, offsets, rank_t)]
    ops.sgmv(*args)
    delta = reference.sgmv_delta_f64(x, pool, token_slot, offsets, rank_t, out_features=m)
    assert_close(args[1].cpu(), y0.double() + delta, dtype=dtype)
    for wavelet, levels in [("haar", 1), ("db2", 2), ("db2", 3)]:
        spec = WaveletSpec(wavelet, "periodization", levels)
        pool, offsets, rank_t = wara_pool(gen, ranks, m, n, spec)
        pool = pool.to(dtype)
        lo, hi = wavelet_filters(wavelet)
        args = [t.to(cuda) for t in (x, y0.clone(), pool, token_slot, offsets, rank_t)]
        ops.wavelet_lowrank(*args, levels, lo, hi)
        delta = reference.wavelet_delta_f64(x, pool, token_slot, offsets, rank_t, out_features=m, levels=levels,
                                            wavelet=wavelet)
        assert_close(args[1].cpu(), y0.double() + delta, dtype=dtype, msg=f"{name} {wavelet} J={levels}")
        idle = (token_slot < 0).nonzero().flatten()
        assert torch.equal(args[1].cpu()[idle], y0[idle])


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", ["native", "triton"])
def test_gpu_kernels_reject_bad_indices(name):
    ops = gpu_impl(name)
    cuda = torch.device("cuda")
    x, y, pool = torch.zeros(4, 8, device=cuda), torch.zeros(4, 16, device=cuda), torch.zeros(100, device=cuda)
    offsets, ranks = torch.tensor([0, 50], device=cuda), torch.tensor([2, 2], device=cuda)
    with pytest.raises(RuntimeError, match="token 3 has slot 5"):
        ops.sgmv(x, y, pool, torch.tensor([0, 1, -1, 5], device=cuda), offsets, ranks)
    with pytest.raises(RuntimeError, match="lies outside the pool"):
        ops.sgmv(x, y, pool, torch.tensor([0, 1, -1, 1], device=cuda), torch.tensor([0, 90], device=cuda), ranks)
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        ops.sgmv(x, y.cpu(), pool, torch.tensor([0, 1, -1, 1], device=cuda), offsets, ranks)


TRITON_COMPILE = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from runtime.native import triton_ops as k

def build(fn, sig, consts):
    sig = {**sig, **{c: "constexpr" for c in consts}}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))

idx = {"slot_ptr": "*i64", "off_ptr": "*i64", "rank_ptr": "*i64", "blk_ptr": "*i64", "T": "i32"}
for x, pool in (("*fp32", "*fp32"), ("*bf16", "*bf16")):
    build(k._shrink, {"x_ptr": x, "stride_x": "i64", "u_ptr": "*fp32", "stride_u": "i64", "pool_ptr": pool, **idx},
          {"BLOCK_T": k.BLOCK_T, "BLOCK_N": k.BLOCK_N, "BLOCK_R": 32})
    build(k._expand, {"u_ptr": "*fp32", "stride_u": "i64", "y_ptr": x, "stride_y": "i64", "pool_ptr": pool, **idx},
          {"BLOCK_T": k.BLOCK_T, "BLOCK_M": k.BLOCK_M, "BLOCK_R": 16})
band = {"lo_ptr": "*fp32", "hi_ptr": "*fp32", "slot_ptr": "*i64", "T": "i32", "half": "i32"}
consts = {"TAPS": 4, "BLOCK_T": k.BLOCK_T, "BLOCK_K": k.BLOCK_K}
build(k._dwt_level, {"in_ptr": "*bf16", "stride_in": "i64", "in_col": "i32", "out_ptr": "*fp32", "stride_out": "i64",
                     "a_col": "i32", "d_col": "i32", **band}, consts)
build(k._idwt_level, {"in_ptr": "*fp32", "stride_in": "i64", "a_col": "i32", "d_col": "i32", "dst_ptr": "*bf16",
                      "stride_dst": "i64", "dst_col": "i32", **band}, consts)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda tests run the compiled kernels")
def test_triton_kernels_compile_for_the_gpu(tmp_path):
    """The interpreter accepts code the compiler may not: compile every Triton kernel for sm_90
    (H100/H200) ahead of time, down to a cubin, as the GPU machine's JIT would."""
    impl("triton")  # fails with the reason where triton is missing
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", TRITON_COMPILE], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


def test_kernel_benchmark_checks_then_times_every_kernel(tmp_path):
    """benchmarks.kernels --quick runs (as `make bench` would) and reports every kernel."""
    import json

    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--quick", "--out", str(out)], capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine_label"] == "2-core CPU VM" and report["native"]["serving"]
    kernels = {r["kernel"] for r in report["results"]}
    assert {"sgmv[native]", "wavelet_lowrank[native]", "sgmv[torch]", "grouped_lora"} <= kernels
    assert {r["adapters"] for r in report["results"]} == {1, 32}
    for r in report["results"]:
        assert r["max_rel_error"] <= 1e-4 and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["gflops"] > 0


def test_slot_form_rule_benchmark_checks_then_times_and_compares_with_the_rule(tmp_path):
    """benchmarks.kernels --rule --quick: the fused op on own factors and the GEMM pair on their
    fold, both checked against the float64 oracle, timed, and set against `own_form_wins`."""
    import json

    from runtime.selection import own_form_wins

    out = tmp_path / "rule.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--rule", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["own_ms"] > 0 and row["pair_ms"] > 0 and row["own_over_pair"] == pytest.approx(row["own_ms"] / row["pair_ms"])
    assert row["rule_says_own"] == own_form_wins(wavelet="haar", levels=1, rank=4, shapes=[(64, 64)])
    assert "where the rule and this run disagree" in proc.stdout


def test_own_form_rule_follows_the_measured_widths():
    """The slot-form rule (runtime.selection.own_form_wins): haar own factors from width 256 (128 at
    J >= 2), db2 only at J >= 2 and rank >= 8 from width 256; the narrowest layer decides."""
    from runtime.selection import own_form_wins

    minilm = [(384, 384), (1536, 384), (384, 1536)]
    assert own_form_wins(wavelet="haar", levels=1, rank=4, shapes=minilm)
    assert not own_form_wins(wavelet="haar", levels=1, rank=4, shapes=minilm + [(64, 64)])
    assert own_form_wins(wavelet="haar", levels=2, rank=4, shapes=[(128, 256)])
    assert not own_form_wins(wavelet="haar", levels=1, rank=4, shapes=[(128, 256)])
    assert not own_form_wins(wavelet="db2", levels=1, rank=8, shapes=minilm)
    assert own_form_wins(wavelet="db2", levels=2, rank=8, shapes=minilm)
    assert not own_form_wins(wavelet="db2", levels=2, rank=4, shapes=minilm)
    assert not own_form_wins(wavelet="db2", levels=3, rank=8, shapes=[(128, 128)])
