"""The multi-adapter LoRA kernel, reading factors in place from a layer's page pool, against its
slow row-by-row float64 reference (which takes plain zero-padded stacks, not the pool)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from references import reference_lora
from runtime.engine import PagePool, Routing, SlotLayer
from runtime.kernels import default_kernel, grouped_lora, sgmv_lora


def test_the_native_op_serves_on_cpu():
    """`make test` builds the native library: the engine's default CPU kernel is its op."""
    from runtime import native

    assert native.load().native, native.load().reason
    kernel, what = default_kernel(torch.device("cpu"))
    assert kernel is sgmv_lora and what.startswith("native sgmv")


@pytest.mark.parametrize("kernel", [grouped_lora, sgmv_lora], ids=["grouped_lora", "sgmv"])
def test_kernels_read_each_slots_own_rank_from_the_pool(kernel):
    gen = torch.Generator().manual_seed(0)
    n, m = 24, 40
    ranks = {1: 8, 2: 3, 3: 5, 4: 1, 5: 2, 6: 8, 7: 4}
    routing = Routing()
    layer = SlotLayer(torch.nn.Linear(n, m), pages=sum(ranks.values()) + 3, routing=routing, kernel=kernel)
    pool = PagePool(layer.pool.numel() // (n + m))
    a = torch.zeros(8, 8, n)  # the reference's padded stacks (slot 0: zeros)
    b = torch.zeros(8, m, 8)
    for s, r in ranks.items():
        fa, fb = torch.randn(r, n, generator=gen), torch.randn(m, r, generator=gen)
        a[s, :r], b[s, :, :r] = fa, fb
        page = pool.find(r)
        pool.runs[s] = (page, r)
        layer.place(s, page, fa, fb)
    layer.place(8, pool.find(1), None, None)  # an adapter that skips this layer: rank 0 here
    x = torch.randn(9, 6, n, generator=gen)
    few = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1])  # one adapter plus base rows: its GEMM pair
    many = torch.tensor([1, 0, 2, 1, 4, 3, 7, 5, 6])  # many adapters: gathered batched matmuls
    skip = torch.tensor([8, 0, 2, 8, 2, 0, 0, 0, 8])  # with rows whose adapter skips the layer
    for row_slots in (few, many, skip):
        groups = [(s, (row_slots == s).nonzero().flatten()) for s in sorted(set(row_slots.tolist()) - {0})]
        ref_groups = [(s, rows) for s, rows in groups if s != 8]
        routing.cache = {}  # a new forward
        got = kernel(x, layer, groups)
        assert_close(got, reference_lora(x, a, b, ref_groups))
        assert torch.count_nonzero(got[1]) == 0  # the base row gets no delta
    one = [(2, torch.arange(9))]  # every row on one adapter: the single-GEMM path
    assert_close(kernel(x, layer, one), reference_lora(x, a, b, one))
    assert kernel(x, layer, []) is None
    assert kernel(x, layer, [(8, torch.arange(9))]) is None  # nothing to add
    # In place: the delta is added into `out` (the engine's layer output), base rows untouched.
    y = torch.randn(9, 6, m, generator=gen)
    for g in (groups, one):
        routing.cache = {}
        acc = y.clone()
        assert kernel(x, layer, g, out=acc) is acc
        assert_close(acc, y + reference_lora(x, a, b, [(s, r) for s, r in g if s != 8]))
    assert kernel(x, layer, [], out=y) is y


def test_page_pool_first_fit_and_compaction_plan():
    pool = PagePool(20)
    assert pool.find(21) is None and pool.find(20) == 0
    pool.runs = {1: (0, 4), 2: (6, 5), 3: (14, 3)}
    assert pool.free == 8
    assert pool.find(2) == 4 and pool.find(3) == 11 and pool.find(4) is None  # runs of 2, 3 and 3 free
    assert pool.compaction() == [(2, 6, 4), (3, 14, 9)]
