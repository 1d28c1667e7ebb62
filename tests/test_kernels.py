"""The multi-adapter LoRA kernel, reading factors in place from a layer's page pool, against its
slow row-by-row float64 reference (which takes plain zero-padded stacks, not the pool)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from references import reference_lora
from runtime.adapters import PagePool
from runtime.kernels import KERNELS, Routing, grouped_lora, native_lora
from runtime.selection import adapter_kernel
from runtime.slots import SlotLayer


@pytest.fixture(autouse=True, scope="module")
def _native_loaded():
    """`native_lora` calls torch.ops.wara: the library is loaded whichever test runs first (`make
    test` builds it; a failed build fails here, naming why)."""
    from runtime import native

    st = native.load()
    assert st.native, st.reason


def test_the_native_op_serves_on_cpu():
    """`make test` builds the native library: the engine's default CPU kernel is its op."""
    from runtime import native

    assert native.load().native, native.load().reason
    name, what = adapter_kernel(torch.device("cpu"), native.load(), native.triton_available())
    assert KERNELS[name] is native_lora and what.startswith("native sgmv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kernel", [grouped_lora, native_lora], ids=["grouped_lora", "native"])
def test_kernels_read_each_slots_own_rank_from_the_pool(kernel, dtype):
    """In float32 and in bfloat16 (a bfloat16 base: its pool, x and y), against the float64
    oracle on the same rounded factors and x, within the dtype's tolerance (values of order 1)."""
    gen = torch.Generator().manual_seed(0)
    n, m = 24, 40
    ranks = {1: 8, 2: 3, 3: 5, 4: 1, 5: 2, 6: 8, 7: 4}
    routing = Routing()
    layer = SlotLayer(torch.nn.Linear(n, m, dtype=dtype), pages=sum(ranks.values()) + 3, routing=routing,
                      kernel=kernel)
    assert layer.pool.dtype == dtype
    pool = PagePool(layer.pool.numel() // (n + m))
    a = torch.zeros(8, 8, n)  # the reference's padded stacks (slot 0: zeros)
    b = torch.zeros(8, m, 8)
    for s, r in ranks.items():
        fa = (0.3 * torch.randn(r, n, generator=gen)).to(dtype).float()
        fb = (0.3 * torch.randn(m, r, generator=gen)).to(dtype).float()
        a[s, :r], b[s, :, :r] = fa, fb
        page = pool.find(r)
        pool.runs[s] = (page, r)
        layer.place(s, page, fa, fb)
    layer.place(8, pool.find(1), None, None)  # an adapter that skips this layer: rank 0 here
    x = torch.randn(9, 6, n, generator=gen).to(dtype)
    few = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1])  # one adapter plus base rows: its GEMM pair
    many = torch.tensor([1, 0, 2, 1, 4, 3, 7, 5, 6])  # many adapters: gathered batched matmuls
    skip = torch.tensor([8, 0, 2, 8, 2, 0, 0, 0, 8])  # with rows whose adapter skips the layer
    for row_slots in (few, many, skip):
        groups = [(s, (row_slots == s).nonzero().flatten()) for s in sorted(set(row_slots.tolist()) - {0})]
        ref_groups = [(s, rows) for s, rows in groups if s != 8]
        routing.cache = {}  # a new forward
        got = kernel(x, layer, groups)
        assert got.dtype == dtype
        assert_close(got, reference_lora(x.double(), a, b, ref_groups))
        assert torch.count_nonzero(got[1]) == 0  # the base row gets no delta
    one = [(2, torch.arange(9))]  # every row on one adapter: the single-GEMM path
    assert_close(kernel(x, layer, one), reference_lora(x.double(), a, b, one))
    assert kernel(x, layer, []) is None
    assert kernel(x, layer, [(8, torch.arange(9))]) is None  # nothing to add
    # In place: the delta is added into `out` (the engine's layer output), base rows untouched.
    y = torch.randn(9, 6, m, generator=gen).to(dtype)
    for g in (groups, one):
        routing.cache = {}
        acc = y.clone()
        assert kernel(x, layer, g, out=acc) is acc
        assert_close(acc, y.double() + reference_lora(x.double(), a, b, [(s, r) for s, r in g if s != 8]))
    assert kernel(x, layer, [], out=y) is y


def test_page_pool_first_fit_and_compaction_plan():
    pool = PagePool(20)
    assert pool.find(21) is None and pool.find(20) == 0
    pool.runs = {1: (0, 4), 2: (6, 5), 3: (14, 3)}
    assert pool.free == 8
    assert pool.find(2) == 4 and pool.find(3) == 11 and pool.find(4) is None  # runs of 2, 3 and 3 free
    assert pool.compaction() == [(2, 6, 4), (3, 14, 9)]


def test_native_kernel_serves_own_and_folded_slots_in_one_batch():
    """Slots holding an adapter's own WaRA factors (haar and db2, J = 1..3) next to folded slots
    and base rows in one batch, through the engine's native kernel: each row equals x ΔWᵀ with ΔW
    from pywt's inverse transform of its blocks (folded rows: x Aᵀ Bᵀ), in float64."""
    import math

    from references import pywt_delta
    from runtime.native import own_numel, pack_own
    from wara_train.wavelets import WaveletSpec, blocks

    gen = torch.Generator().manual_seed(3)
    n, m = 32, 48
    own_slots = {2: ("haar", 1, 2), 3: ("db2", 2, 3), 4: ("haar", 3, 1), 6: ("db2", 1, 4)}  # wavelet, J, rank
    folded_slots = {1: 3, 5: 5}
    routing = Routing()
    layer = SlotLayer(torch.nn.Linear(n, m), pages=40, routing=routing, kernel=native_lora)
    pool = PagePool(40)
    delta = {}  # slot -> ΔW (m, n), float64
    for s, r in folded_slots.items():
        a, b = torch.randn(r, n, generator=gen), torch.randn(m, r, generator=gen)
        pool.runs[s] = (pool.find(r), r)
        layer.place(s, pool.runs[s][0], a, b)
        delta[s] = b.double() @ a.double()
    for s, (wavelet, levels, r) in own_slots.items():
        factors = {blk.name: (torch.randn(r, n >> blk.level, generator=gen), torch.randn(m >> blk.level, r, generator=gen))
                   for blk in blocks(levels)}
        packed = pack_own(factors, spec=WaveletSpec(wavelet, "periodization", levels), scale=0.5)
        pages = math.ceil(own_numel(m, n, r, levels) / (n + m))
        assert packed.numel() == own_numel(m, n, r, levels) <= pages * (n + m)
        pool.runs[s] = (pool.find(pages), pages)
        layer.place_own(s, pool.runs[s][0], packed, rank=r, levels=levels, wavelet=wavelet)
        delta[s] = pywt_delta(factors, shape=(m, n), wavelet=wavelet, levels=levels, scale=0.5)
    x = torch.randn(10, 5, n, generator=gen)

    def want(row_slots):
        out = torch.zeros(10, 5, m, dtype=torch.float64)
        for i, s in enumerate(row_slots.tolist()):
            if s:
                out[i] = x[i].double() @ delta[s].T
        return out.float()

    for row_slots in (torch.tensor([1, 2, 3, 4, 5, 6, 0, 2, 3, 1]),  # both forms, every wavelet, a base row
                      torch.tensor([3] * 10),  # one own adapter on the whole batch: the fused op alone
                      torch.tensor([2, 0, 0, 2, 0, 6, 6, 0, 2, 0])):  # own slots of one form and base rows
        groups = [(s, (row_slots == s).nonzero().flatten()) for s in sorted(set(row_slots.tolist()) - {0})]
        routing.cache = {}
        assert_close(native_lora(x, layer, groups), want(row_slots))
        y = torch.randn(10, 5, m, generator=gen)
        routing.cache = {}
        acc = y.clone()
        assert native_lora(x, layer, groups, out=acc) is acc
        assert_close(acc, y + want(row_slots))
    xv = torch.randn(1, n, 7, generator=gen).transpose(1, 2)  # a 1x1 conv's (B, HW, C) view of one image
    routing.cache = {}
    assert_close(native_lora(xv, layer, [(3, torch.tensor([0]))]), (xv[0].double() @ delta[3].T).float()[None])
    with pytest.raises(Exception, match="own WaRA factors"):
        grouped_lora(x, layer, [(2, torch.arange(10))])  # a kernel that cannot read own factors says so


@pytest.mark.parametrize("kernel", [grouped_lora, native_lora], ids=["grouped_lora", "native"])
def test_kernels_follow_slots_that_change_between_forwards(kernel):
    """A kernel may keep what it derives from the slots' places (index tables, call plans, the
    pair's factor views) across forwards; a slot re-placed with new factors, moved by compaction
    or dropped must be seen by the next forward, whichever path (one adapter on every row, or a
    mixed batch) ran before."""
    gen = torch.Generator().manual_seed(5)
    n, m = 16, 24
    routing = Routing()
    layer = SlotLayer(torch.nn.Linear(n, m), pages=16, routing=routing, kernel=kernel)
    a = torch.zeros(3, 4, n)
    b = torch.zeros(3, m, 4)
    x = torch.randn(4, 3, n, generator=gen)

    def put(slot, page, r):
        fa, fb = torch.randn(r, n, generator=gen), torch.randn(m, r, generator=gen)
        a[slot].zero_(), b[slot].zero_()
        a[slot, :r], b[slot, :, :r] = fa, fb
        layer.place(slot, page, fa, fb)

    whole = [(1, torch.arange(4))]
    mixed = [(1, torch.tensor([0, 2])), (2, torch.tensor([1]))]

    def check():
        for groups in (whole, mixed):
            routing.cache = {}  # a new forward
            assert_close(kernel(x, layer, groups), reference_lora(x, a, b, groups))

    put(1, 0, 3)
    put(2, 3, 2)
    check()
    put(1, 8, 4)  # the same slot, new factors at another page and rank
    check()
    layer.move(1, 5)  # compaction moves it down
    layer.pool[9 * (n + m):].zero_()  # its old pages past its new run (5-8) no longer hold it
    check()
    layer.drop(2)
    a[2].zero_(), b[2].zero_()
    routing.cache = {}
    assert_close(kernel(x, layer, mixed), reference_lora(x, a, b, [mixed[0]]))


@pytest.mark.parametrize("base_kind", ["linear", "linear_no_bias", "conv1d"])
def test_an_adapted_layer_runs_as_one_native_call(base_kind):
    """Where a batch has slots holding own factors, an adapted Linear or Conv1D runs as a whole on
    the CPU (`runtime.kernels.native_linear`): ``wara::wavelet_linear`` writes bias + ΔW_s x and
    accumulates the base GEMM into it, then folded slots' sgmv adds. The layer's output equals
    x W0ᵀ + b + ΔW_s x (float64), for mixed batches with base rows and folded slots; a batch of
    folded slots alone keeps the unfused path (base, then the kernel) and answers the same. The
    plan is kept between forwards; a replaced weight Parameter is seen (the plan is made again)."""
    import math

    from references import pywt_delta
    from runtime.native import own_numel, pack_own
    from transformers.pytorch_utils import Conv1D
    from wara_train.wavelets import WaveletSpec, blocks

    gen = torch.Generator().manual_seed(9)
    n, m = 32, 48
    torch.manual_seed(9)
    base = {"linear": torch.nn.Linear(n, m), "linear_no_bias": torch.nn.Linear(n, m, bias=False),
            "conv1d": Conv1D(m, n)}[base_kind]
    if base_kind == "conv1d":
        torch.nn.init.normal_(base.weight), torch.nn.init.normal_(base.bias)
    w0 = (base.weight.T if base_kind == "conv1d" else base.weight).double()  # (m, n)
    b0 = torch.zeros(m, dtype=torch.float64) if base.bias is None else base.bias.double()
    routing = Routing()
    layer = SlotLayer(base, pages=24, routing=routing, kernel=native_lora)
    assert layer.linear is not None
    pool = PagePool(24)
    delta = {}
    a, b = torch.randn(3, n, generator=gen), torch.randn(m, 3, generator=gen)
    pool.runs[1] = (pool.find(3), 3)
    layer.place(1, pool.runs[1][0], a, b)
    delta[1] = b.double() @ a.double()
    for s, (wavelet, levels, r) in {2: ("haar", 1, 2), 3: ("db2", 2, 3)}.items():
        factors = {blk.name: (torch.randn(r, n >> blk.level, generator=gen), torch.randn(m >> blk.level, r, generator=gen))
                   for blk in blocks(levels)}
        pages = math.ceil(own_numel(m, n, r, levels) / (n + m))
        pool.runs[s] = (pool.find(pages), pages)
        layer.place_own(s, pool.runs[s][0], pack_own(factors, spec=WaveletSpec(wavelet, "periodization", levels),
                                                     scale=0.5), rank=r, levels=levels, wavelet=wavelet)
        delta[s] = pywt_delta(factors, shape=(m, n), wavelet=wavelet, levels=levels, scale=0.5)
    x = torch.randn(6, 5, n, generator=gen)
    for row_slots, fused in ((torch.tensor([1, 2, 0, 3, 2, 1]), True),  # both forms, two wavelets, a base row
                             (torch.tensor([2] * 6), True),  # one own adapter on every row
                             (torch.tensor([1, 0, 1, 1, 0, 0]), False)):  # folded only: base, then the kernel
        routing.groups = [(s, (row_slots == s).nonzero().flatten()) for s in sorted(set(row_slots.tolist()) - {0})]
        routing.rows, routing.cache = 6, {}
        with torch.no_grad():
            got = layer(x)
        want = x.double() @ w0.T + b0
        for i, s in enumerate(row_slots.tolist()):
            if s:
                want[i] += x[i].double() @ delta[s].T
        assert_close(got, want)
        plans = [v for k, v in layer.memo.items() if k[0] == "linear"]
        assert len(plans) == 1 and (plans[0] is not None) == fused
        layer.memo.clear()
    seen = []  # a hook on the base must see it run: the layer then takes the unfused path
    handle = base.register_forward_hook(lambda *_: seen.append(1))
    routing.groups, routing.cache = [(2, torch.arange(6))], {}
    with torch.no_grad():
        got = layer(x)
    handle.remove()
    assert seen == [1]
    assert_close(got, x.double() @ w0.T + b0 + x.double() @ delta[2].T)
    with torch.no_grad():
        answers = []
        for _ in range(2):  # the second forward reuses the first's plan
            routing.cache = {}
            answers.append(layer(x))
        assert torch.equal(*answers) and [k for k in layer.memo if k[0] == "linear"]
        new_w = torch.randn(base.weight.shape, generator=gen)
        base.weight = torch.nn.Parameter(new_w)  # replaced, not written in place
        routing.cache = {}
        got = layer(x)
    w1 = (new_w.T if base_kind == "conv1d" else new_w).double()
    assert_close(got, x.double() @ w1.T + b0 + x.double() @ delta[2].T)


def _own_factors(gen, r: int, m: int, n: int, levels: int) -> dict:
    from wara_train.wavelets import blocks

    return {blk.name: (torch.randn(r, n >> blk.level, generator=gen), torch.randn(m >> blk.level, r, generator=gen))
            for blk in blocks(levels)}


def test_layers_fed_one_input_are_computed_by_the_first_and_checked_by_the_rest():
    """A leader (the query) computes its followers' outputs (key, value) with its own from one
    transform of x; a follower takes its output only for the very tensor the leader saw,
    unchanged, in the same forward; otherwise it computes its own. The layers' outputs equal
    x W0ᵀ + b + ΔW_s x (float64) in every case, including a follower the adapter skips (rank 0)
    and a narrower value layer; a slot change in a follower is seen by the leader's plan."""
    import math

    from references import pywt_delta
    from runtime.native import own_numel, pack_own
    from wara_train.wavelets import WaveletSpec

    gen = torch.Generator().manual_seed(13)
    torch.manual_seed(13)
    n, widths = 32, {"q": 48, "k": 48, "v": 16}
    routing = Routing()
    layers = {name: SlotLayer(torch.nn.Linear(n, m), pages=40, routing=routing, kernel=native_lora)
              for name, m in widths.items()}
    q, k, v = layers["q"], layers["k"], layers["v"]
    q.shared, k.leader, v.leader = [k, v], q, q
    spec = WaveletSpec("haar", "periodization", 2)
    delta = {}

    def put(layer, slot, r, page):
        m = layer.m
        factors = _own_factors(gen, r, m, n, 2)
        assert math.ceil(own_numel(m, n, r, 2) / (n + m)) <= 12
        layer.place_own(slot, page, pack_own(factors, spec=spec, scale=0.5), rank=r, levels=2, wavelet="haar")
        delta[(layer.m, id(layer), slot)] = pywt_delta(factors, shape=(m, n), wavelet="haar", levels=2, scale=0.5)

    for slot, page in ((1, 0), (2, 12)):
        put(q, slot, 2, page), put(v, slot, 3, page)
        k.place(slot, page, None, None) if slot == 2 else put(k, slot, 1, page)  # slot 2 skips the key
    row_slots = torch.tensor([1, 0, 2, 1])
    x = torch.randn(4, 5, n, generator=gen)

    def want(layer, xs):
        out = xs.double() @ layer.base.weight.double().T + layer.base.bias.double()
        for i, s in enumerate(row_slots.tolist()):
            d = delta.get((layer.m, id(layer), s))
            if d is not None:
                out[i] += xs[i].double() @ d.T
        return out

    calls = []
    real = q.linear

    def spy(xs, layer):  # which layers' outputs a call computed: its own, and those it left for followers
        y = real(xs, layer)
        if y is not None:
            calls.append([layers_by_id[id(layer)]] + [layers_by_id[id(f)] for f in layer.shared if f in routing.cache])
        return y

    layers_by_id = {id(layer): name for name, layer in layers.items()}
    for layer in layers.values():
        layer.linear = spy

    def forward(xq, xk, xv, touch=None):
        routing.groups = [(s, (row_slots == s).nonzero().flatten()) for s in (1, 2)]
        routing.rows, routing.cache = 4, {}
        calls.clear()
        with torch.no_grad():
            yq = q(xq)
            if touch is not None:
                touch()
            return yq, k(xk), v(xv)

    ys = forward(x, x, x)
    assert calls == [["q", "k", "v"]]  # the followers took theirs
    for layer, y in zip((q, k, v), ys):
        assert_close(y, want(layer, x))
    x2 = x + 1
    ys = forward(x, x2, x)  # the key gets another tensor: it computes its own
    assert calls == [["q", "k", "v"], ["k"]]
    assert_close(ys[1], want(k, x2))
    assert_close(ys[2], want(v, x))
    xc = x.clone()
    ys = forward(xc, xc, xc, touch=lambda: xc.mul_(2))  # changed in place after the leader ran
    assert calls == [["q", "k", "v"], ["k"], ["v"]]
    assert_close(ys[1], want(k, xc))
    assert_close(ys[2], want(v, xc))
    put(v, 1, 4, 24)  # a follower's slot re-placed: the leader's plan is made afresh
    assert not q.memo
    ys = forward(x, x, x)
    assert calls == [["q", "k", "v"]]
    assert_close(ys[2], want(v, x))
    seen = []  # a hook on a follower's base must see it run: no layer of the group computes another's
    handle = k.base.register_forward_hook(lambda *_: seen.append(1))
    ys = forward(x, x, x)
    handle.remove()
    assert calls == [["q"], ["v"]] and seen == [1]  # the key ran its base itself
    for layer, y in zip((q, k, v), ys):
        assert_close(y, want(layer, x))


def test_the_engine_finds_layers_fed_one_input(tmp_path):
    """`TorchEngine` finds, from a sample forward, the query, key and value of each attention
    (fed one tensor) and lets the query compute all three; served answers equal the explicit
    model's."""
    import tiny_models as tm
    from exporter.common import base_for
    from exporter.verify import reference_model
    from runtime.adapters import DeviceTier, prepare
    from runtime.engine import TorchEngine
    from wara_train.synthetic import random_adapter

    source = f"hf:{tm.make_bert_classifier(tmp_path / 'bert')}"
    engine = TorchEngine(source, device="cpu", slot_form="own")
    leaders = {name: [f for f, layer in engine.layers.items() if layer in lead.shared]
               for name, lead in engine.layers.items() if lead.shared}
    assert leaders and all(name.endswith("query") and [f.rsplit(".", 1)[1] for f in fol] == ["key", "value"]
                           for name, fol in leaders.items()), leaders
    assert len(leaders) == 2  # two layers
    adapter = random_adapter(source, tmp_path / "a", rank=2, levels=1, seed=1)
    DeviceTier(engine).write(1, prepare(engine, "a", adapter))
    ids = torch.randint(5, 60, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    got = engine.forward((ids, mask), [1, 0, 1])
    for name in leaders:  # the query ran its key and value with it (no silent fallback)
        plans = [v for key, v in engine.layers[name].memo.items() if key[:2] == ("linear", True)]
        assert len(plans) == 1 and plans[0] is not None
    ref = reference_model(adapter, base_for(adapter))
    with torch.no_grad():
        for row in (0, 2):
            assert_close(got[row]["logits"], ref(ids[row : row + 1], mask[row : row + 1])[0])
    alone = engine.forward((ids[1:2], mask[1:2]), [0])[0]  # the base row answers as it does alone
    assert got[1].keys() == alone.keys()
    for key in alone:
        assert_close(got[1][key], alone[key])
    with torch.inference_mode():  # no version counters: the layers run one by one, still exact
        again = engine.forward((ids, mask), [1, 0, 1])
    for a, b in zip(got, again):
        for key in a:
            assert_close(a[key], b[key])
