"""Micro-benchmark of the multi-adapter low-rank kernels on MiniLM-sized layers.

For each layer shape (attention 384x384, FFN up 1536x384 and down 384x1536), token count T,
number of adapters (1, or 32 with T/32 consecutive tokens each: one run per batch row) and
folded rank R (16, 32):

* ``sgmv``: the native op on the folded LoRA of rank R (`runtime.native`);
* ``wavelet_lowrank``: the fused op on the same adapters' own factors, WaRA rank r = R/4 at haar
  J=1 (the same update: its fold has rank 4r = R), half the multiply-adds;
* ``grouped_lora``: today's `runtime.kernels.grouped_lora` on the same folded factors;
* ``sgmv_torch``: the pure-PyTorch twin (what serves when the native build fails).

Every kernel is first checked against the float64 row-by-row oracle (`runtime.native.reference`),
then all are timed interleaved (`benchmarks.common.interleaved`): median and min-max of the
per-round medians. GFLOP/s count the low-rank matmuls only (2 FLOPs per multiply-add:
2·T·R·(m + n) folded, 2·T·r·2(m + n) own); the wavelet transforms are not counted.
The plain-matmul peak (2048² float32) is measured in the same run; torch uses 2 threads.

    .venv/bin/python -m benchmarks.kernels                 # full grid (about 5 min on 2 cores)
    .venv/bin/python -m benchmarks.kernels --quick         # tiny sizes, one round (a test that it runs)
    .venv/bin/python -m benchmarks.kernels --device cuda   # the GPU kernels (Triton, and CUDA if built)
    .venv/bin/python -m benchmarks.kernels --rule          # own factors vs fold: the engine's slot-form rule
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import add_base_option, environment, interleaved, summary, write_json

LAYERS = {"attn": (384, 384), "ffn_up": (1536, 384), "ffn_down": (384, 1536)}  # (m out, n in)
TOKENS = (64, 256, 2048)
ADAPTERS = (1, 32)
FOLDED_RANKS = (16, 32)
WAVELET, LEVELS = "haar", 1


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_peak(device: torch.device, size: int) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    sync, best = _sync(device), float("inf")
    for _ in range(8):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


class _PoolLayer:
    """What `grouped_lora` reads from the engine's SlotLayer: ``m`` and ``factors(slot)``, views of
    the same pool the native op reads (slot 1.. = adapters 0..)."""

    def __init__(self, pool, offsets, rank, m, n):
        from runtime.native.packing import folded_layout, unpack

        self.m = m
        self._views = [unpack(pool, off, rank, folded_layout(m, n))["lora"] for off in offsets]

    def factors(self, slot: int):
        return self._views[slot - 1] if slot >= 1 else None


def grouped_lora_call(x, pool, offsets, rank, m, n, adapters):
    """A call of today's grouped_lora on the same factors and tokens, batch rows of the runs."""
    from runtime.kernels import grouped_lora

    t = x.shape[0]
    rows = adapters if adapters > 1 else max(1, t // 64)
    xb = x.view(rows, t // rows, n)
    out = torch.zeros(rows, t // rows, m, device=x.device)
    if adapters > 1:
        groups = [(s + 1, torch.tensor([s], device=x.device)) for s in range(adapters)]
    else:
        groups = [(1, torch.arange(rows, device=x.device))]
    if "layer" in inspect.signature(grouped_lora).parameters:  # the engine's page pool
        layer = _PoolLayer(pool, offsets, rank, m, n)
        return out, lambda: grouped_lora(xb, layer, groups, out=out)
    a = torch.zeros(adapters + 1, rank, n, device=x.device)  # the padded-slot signature
    b = torch.zeros(adapters + 1, m, rank, device=x.device)
    for s, (fa, fb) in enumerate(_PoolLayer(pool, offsets, rank, m, n)._views):
        a[s + 1], b[s + 1] = fa, fb
    ranks = [0] + [rank] * adapters
    return out, lambda: grouped_lora(xb, a, b, groups, ranks, out=out)


def run_case(m, n, tokens, adapters, folded_rank, *, device, backends, rounds, log) -> list[dict]:
    from runtime import native
    from runtime.native import reference
    from runtime.native.packing import pack_folded, pack_own, stack_slots, wavelet_filters
    from wara_train.delta import fold
    from wara_train.wavelets import WaveletSpec, blocks

    gen = torch.Generator().manual_seed(tokens * 7 + adapters + folded_rank)
    r = folded_rank // 4
    spec = WaveletSpec(WAVELET, "periodization", LEVELS)
    own, folded = [], []
    for _ in range(adapters):
        factors = {b.name: (torch.randn(r, n >> b.level, generator=gen) / n**0.5,
                            torch.randn(m >> b.level, r, generator=gen) / r**0.5) for b in blocks(LEVELS)}
        own.append(pack_own(factors, spec=spec, scale=1.0))
        folded.append(pack_folded(*fold(factors, shape=(m, n), spec=spec, scale=1.0)))
    own_pool, own_off = stack_slots(own)
    lora_pool, lora_off = stack_slots(folded)
    x = torch.randn(tokens, n, generator=gen)
    token_slot = torch.arange(tokens) * adapters // tokens  # runs of tokens / adapters
    want = reference.sgmv_delta_f64(x, lora_pool, token_slot, torch.tensor(lora_off),
                                    torch.full((adapters,), folded_rank), out_features=m)
    scale = want.abs().max().item()
    lo, hi = wavelet_filters(WAVELET)
    dev = lambda t: t.to(device)  # noqa: E731
    xd, ts = dev(x), dev(token_slot)
    lp, lo_off, lr = dev(lora_pool), dev(torch.tensor(lora_off)), dev(torch.full((adapters,), folded_rank))
    op, oo, orr = dev(own_pool), dev(torch.tensor(own_off)), dev(torch.full((adapters,), r))
    variants, flops, errors = {}, {}, {}
    for backend in backends:
        y = torch.zeros(tokens, m, device=device)
        variants[f"sgmv[{backend}]"] = (y, lambda y=y, b=backend: native.sgmv(xd, y, lp, ts, lo_off, lr, backend=b))
        flops[f"sgmv[{backend}]"] = 2 * tokens * folded_rank * (m + n)
        if backend != "torch" or device.type == "cpu":
            y = torch.zeros(tokens, m, device=device)
            variants[f"wavelet_lowrank[{backend}]"] = (y, lambda y=y, b=backend: native.wavelet_lowrank(
                xd, y, op, ts, oo, orr, LEVELS, lo, hi, backend=b))
            flops[f"wavelet_lowrank[{backend}]"] = 2 * tokens * r * 2 * (m + n)
    out, call = grouped_lora_call(xd, lp, lora_off, folded_rank, m, n, adapters)
    variants["grouped_lora"] = (out, call)
    flops["grouped_lora"] = 2 * tokens * folded_rank * (m + n)
    for name, (y, fn) in variants.items():  # correctness first: one call on zeros
        y.zero_()
        fn()
        got = y.reshape(tokens, m).double().cpu()
        errors[name] = (got - want).abs().max().item() / scale
        if errors[name] > 1e-4:
            raise AssertionError(f"{name} on {m}x{n}, T={tokens}, {adapters} adapters: relative error {errors[name]:.2e}")
    sync = _sync(device)
    probe = {}
    for name, (_, fn) in variants.items():
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        probe[name] = time.perf_counter() - t0
    iters = max(1, min(50, int(0.02 / max(1e-6, statistics.median(probe.values())))))
    times = interleaved({k: v[1] for k, v in variants.items()}, rounds=rounds, iters=iters, sync=sync)
    rows = []
    for name, ms in times.items():
        s = summary(ms, times["grouped_lora"])
        row = {"kernel": name, "m": m, "n": n, "tokens": tokens, "adapters": adapters, "folded_rank": folded_rank,
               "wara_rank": r, **s, "gflops": flops[name] / (s["median_ms"] * 1e6),
               "gflops_best": flops[name] / (s["min_ms"] * 1e6), "max_rel_error": errors[name],
               "speedup_vs_grouped_lora": 1.0 / s.pop("ratio")}
        rows.append(row)
        log(f"  {m:5d}x{n:<5d} T={tokens:5d} S={adapters:2d} R={folded_rank:2d}  {name:26s} {s['median_ms']:8.3f} ms "
            f"{row['gflops']:6.1f} GFLOP/s  x{row['speedup_vs_grouped_lora']:.2f} vs grouped_lora")
    return rows


RULE_WIDTHS = (64, 128, 256, 384)
NOISE = 0.10  # run-to-run spread of a ratio on the 2-core VM
RULE_TOKENS = (64, 2048)


def rule_case(wavelet: str, width: int, levels: int, rank: int, tokens: int, *, rounds: int) -> dict:
    """One adapter on ``tokens`` rows of a (width, width) layer: the fused op on its own factors
    against the GEMM pair on its fold (what serves a one-adapter batch of each slot form),
    both checked against the float64 oracle first."""
    from runtime.native import pack_own, reference, wavelet_filters
    from wara_train.delta import fold
    from wara_train.wavelets import WaveletSpec, blocks

    gen = torch.Generator().manual_seed(width + levels + rank)
    m = n = width
    spec = WaveletSpec(wavelet, "periodization", levels)
    factors = {b.name: (torch.randn(rank, n >> b.level, generator=gen), torch.randn(m >> b.level, rank, generator=gen))
               for b in blocks(levels)}
    pool = pack_own(factors, spec=spec, scale=0.5)
    lo, hi = wavelet_filters(wavelet)
    x = torch.randn(tokens, n, generator=gen)
    ts, off, rk = torch.zeros(tokens, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.tensor([rank])
    y_own, y_pair = torch.zeros(tokens, m), torch.zeros(tokens, m)
    want = reference.wavelet_delta_f64(x, pool, ts, off, rk, out_features=m, levels=levels, wavelet=wavelet)
    a, b = fold(factors, shape=(m, n), spec=spec, scale=0.5)  # what a folded slot holds
    big = a.shape[0]
    own = lambda: torch.ops.wara.wavelet_lowrank(x, y_own, pool, ts, off, rk, levels, lo, hi)  # noqa: E731
    pair = lambda: y_pair.addmm_(x @ a.T, b.T)  # noqa: E731
    for name, fn, y in (("own", own, y_own), ("pair", pair, y_pair)):
        y.zero_()
        fn()
        err = (y.double() - want).abs().max().item() / max(1e-12, want.abs().max().item())
        if err > 1e-4:
            raise AssertionError(f"rule {wavelet} J={levels} r={rank} {width}x{width} T={tokens}: {name} relative error {err:.2e}")
    iters = max(1, int(2e7 / (tokens * width * big * 4)))
    times = interleaved({"own": own, "pair": pair}, rounds=rounds, iters=iters, sync=lambda: None)
    ratio = statistics.median(times["own"]) / statistics.median(times["pair"])
    return {"wavelet": wavelet, "width": width, "levels": levels, "rank": rank, "tokens": tokens,
            "own_ms": statistics.median(times["own"]), "pair_ms": statistics.median(times["pair"]), "own_over_pair": ratio}


def run_rule(*, quick: bool, rounds: int, out: Path) -> int:
    """The sweep behind `runtime.selection.own_form_wins`: own / pair for haar and db2, J = 1-3,
    ranks 4 and 8, widths 64-384, 64 and 2048 tokens; says where the rule and this run disagree."""
    from runtime import native
    from runtime.selection import own_form_wins

    if not native.load().native:
        raise SystemExit(f"--rule times the native op, which is not loaded: {native.load().reason}")
    rows, disagree = [], 0
    grid = [("haar", 64, 1, 4, 64)] if quick else [
        (w, width, j, r, t) for w in ("haar", "db2") for width in RULE_WIDTHS for j in (1, 2, 3) for r in (4, 8)
        for t in RULE_TOKENS]
    t0 = time.perf_counter()
    for wavelet, width, levels, rank, tokens in grid:
        row = rule_case(wavelet, width, levels, rank, tokens, rounds=rounds)
        row["rule_says_own"] = own_form_wins(wavelet=wavelet, levels=levels, rank=rank, shapes=[(width, width)])
        rows.append(row)
        print(f"  {wavelet:4s} {width:4d} J={levels} r={rank} T={tokens:5d}: own/pair {row['own_over_pair']:.2f}  "
              f"rule: {'own' if row['rule_says_own'] else 'folded'}", flush=True)
    for key in sorted({(r["wavelet"], r["width"], r["levels"], r["rank"]) for r in rows}):
        cells = [r for r in rows if (r["wavelet"], r["width"], r["levels"], r["rank"]) == key]
        ratios = [r["own_over_pair"] for r in cells]  # within NOISE of 1 is a tie, which own's fewer pages win
        wrong = max(ratios) > 1 + NOISE if cells[0]["rule_says_own"] else max(ratios) < 1 - NOISE
        if wrong:
            disagree += 1
            print(f"  the rule disagrees with this run at {key}: own/pair {[round(r['own_over_pair'], 2) for r in cells]}")
    report = {"benchmark": "kernels_rule", **environment(), "rounds": rounds, "quick": quick,
              "wall_seconds": time.perf_counter() - t0, "disagreements": disagree, "results": rows}
    write_json(out, report)
    print(f"{len(rows)} cells, {disagree} (wavelet, width, J, rank) where the rule and this run disagree -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (a test that it runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch threads on the CPU (default 2)")
    add_base_option(p)  # accepted for `make gpu-check`, which passes it to every benchmark; unused here
    p.add_argument("--rule", action="store_true", help="the sweep behind the engine's slot-form rule instead "
                   "(runtime.selection.own_form_wins; CPU, writes kernels_rule.json)")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/kernels.json "
                   "(kernels_rule.json with --rule)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.rule:
        return run_rule(quick=args.quick, rounds=1 if args.quick else args.rounds,
                        out=args.out or Path("benchmarks/results/kernels_rule.json"))
    args.out = args.out or Path("benchmarks/results/kernels.json")
    environment()  # read at the start: the commit and machine this run measures
    from runtime import native

    st = native.load()
    if device.type == "cpu":
        backends = (["native"] if st.native else []) + ["torch"]
    else:
        backends = (["native"] if st.native and st.cuda else []) + (["triton"] if native.triton_available() else [])
    layers = {"tiny": (48, 32)} if args.quick else LAYERS
    tokens = (64,) if args.quick else (TOKENS if device.type == "cpu" else (64, 2048))  # GPU: within gpu-check's budget
    ranks = (16,) if args.quick else FOLDED_RANKS
    rounds = 1 if args.quick else args.rounds
    t0 = time.perf_counter()
    peak = matmul_peak(device, 256 if args.quick else 2048)
    print(f"matmul peak {peak:.0f} GFLOP/s on {device}; native: {st.describe()}", flush=True)
    rows = []
    for layer, (m, n) in layers.items():
        for t in tokens:
            for a in ADAPTERS:
                for rk in ranks:
                    for row in run_case(m, n, t, a, rk, device=device, backends=backends, rounds=rounds, log=print):
                        row["layer"] = layer
                        row["fraction_of_matmul_peak"] = row["gflops"] / peak
                        rows.append(row)
    machine = "2-core CPU VM" if device.type == "cpu" else torch.cuda.get_device_name(device)
    report = {"benchmark": "kernels", **environment(), "device": str(device), "machine_label": machine,
              "native": {"serving": st.native, "info": st.info, "reason": st.reason}, "backends": backends,
              "matmul_peak_gflops": peak, "rounds": rounds, "quick": args.quick, "wavelet": WAVELET,
              "levels": LEVELS, "wall_seconds": time.perf_counter() - t0, "results": rows}
    write_json(args.out, report)
    print(f"{len(rows)} rows in {report['wall_seconds']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
