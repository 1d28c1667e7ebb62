"""The multi-adapter LoRA kernel against its slow row-by-row float64 reference."""

from __future__ import annotations

import torch
from helpers import assert_close

from references import reference_lora
from runtime.kernels import grouped_lora


def test_grouped_lora_matches_reference_with_padded_ranks():
    gen = torch.Generator().manual_seed(0)
    slots, max_rank, n, m = 8, 8, 24, 40
    ranks = [0, 8, 3, 5, 1, 2, 8, 4]
    a = torch.zeros(slots, max_rank, n)
    b = torch.zeros(slots, m, max_rank)
    for s, r in enumerate(ranks):  # real factors up to the slot's rank, zeros after
        a[s, :r] = torch.randn(r, n, generator=gen)
        b[s, :, :r] = torch.randn(m, r, generator=gen)
    x = torch.randn(9, 6, n, generator=gen)
    # One adapter on some rows (its GEMM pair) and many adapters (gathered batched matmuls).
    few = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1])  # one adapter plus base rows
    many = torch.tensor([1, 0, 2, 1, 4, 3, 7, 5, 6])
    for row_slots in (few, many):
        groups = [(s, (row_slots == s).nonzero().flatten()) for s in sorted(set(row_slots.tolist()) - {0})]
        got = grouped_lora(x, a, b, groups, ranks)
        assert_close(got, reference_lora(x, a, b, groups, ranks))
        assert torch.count_nonzero(got[1]) == 0  # the base row gets no delta
    one = [(2, torch.arange(9))]  # every row on one adapter: the single-GEMM path
    assert_close(grouped_lora(x, a, b, one, ranks), reference_lora(x, a, b, one, ranks))
    assert grouped_lora(x, a, b, [], ranks) is None
    # In place: the delta is added into `out` (the engine's layer output), base rows untouched.
    y = torch.randn(9, 6, m, generator=gen)
    for g in (groups, one):
        acc = y.clone()
        assert grouped_lora(x, a, b, g, ranks, out=acc) is acc
        assert_close(acc, y + reference_lora(x, a, b, g, ranks))
    assert grouped_lora(x, a, b, [], ranks, out=y) is y
