"""Multi-tenant throughput: one batch of 32 requests spread over 1, 4, 16 or 32 adapters.

Compared on the same base (``--base SOURCE``, default MiniLM; any spec, e.g. ``hf:DIR[@TASK]``),
seq 64 (or the base's largest), at equal trainable parameters:

- ours: the serving engine's heterogeneous forward (WaRA r=4 haar J=1): PyTorch as served by
  default (``ours_torch``: own factors in the slots, ``wara::wavelet_lowrank``, where the
  slot-form rule picks them), PyTorch on folded slots (``ours_torch_folded``: ``wara::sgmv``),
  and onnxruntime (folded slots as graph inputs);
- peft: LoRA r=8 adapters (the same parameter count) and its mixed-batch inference,
  ``model(..., adapter_names=[...])``;
- a naive loop: one request at a time, switching peft's active adapter before each.

Before timing, each mixed batch is checked row by row: ours against the explicit (wavelet-op)
model of that row's adapter, peft's against its own one-adapter-at-a-time answers.
Reported: the median batch time (and min-max of per-round medians), and each method's time
relative to its own single-adapter batch.

    .venv/bin/python -m benchmarks.multitenant            # 32 adapters, seq 64 (a few minutes)
    .venv/bin/python -m benchmarks.multitenant --quick    # tiny (used by the tests)
    .venv/bin/python -m benchmarks.multitenant --base hf:DIR --device cuda   # another base, on a GPU
    .venv/bin/python -m benchmarks.multitenant --dtype bfloat16   # ours and peft in bfloat16 (onnxruntime: float32)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (DEFAULT_BASE, add_base_option, add_dtype_option, base_info, base_spec, check_atol,
                               environment, figure, interleaved, peft_peer, save_figure, seq_limit, summary, write_json)

RANK = 4  # WaRA r=4 at J=1 has the parameter count of LoRA r=8


def run(spec, *, counts: list[int], batch: int, seq: int, rounds: int, device: torch.device, engines: list[str],
        workdir: Path, log, dtype: str = "float32") -> dict:
    from exporter.common import base_for
    from exporter.onnx_export import model_io
    from runtime.adapters import DeviceTier, prepare
    from runtime.engine import TorchEngine
    from wara_train.artifact import apply_adapter, load_adapter
    from wara_train.model import set_path
    from wara_train.synthetic import random_adapters

    n = max(counts)
    paths = [workdir / f"t{i}" for i in range(n)]
    random_adapters(spec, paths, rank=RANK, seed=0)
    adapters = [load_adapter(p) for p in paths]
    ours = {}
    for eng in engines:
        if eng == "torch":
            e = TorchEngine(spec, device=str(device), dtype=dtype)
        elif eng == "torch_folded":
            e = TorchEngine(spec, device=str(device), slot_form="folded", dtype=dtype)
        else:
            from runtime.ort_engine import OrtEngine

            e = OrtEngine(spec)
        tier = DeviceTier(e)  # one tier per engine: it owns the engine's page allocation
        for i, a in enumerate(adapters):
            tier.write(i + 1, prepare(e, f"t{i}", a))
        ours[eng] = e
    # The peer computes in the dtype ours does (the torch engine's: "auto" resolved).
    low = next((e.dtype for e in ours.values() if e.platform == "wara_pytorch"), torch.float32)
    peft = peft_peer(spec, n, rank=2 * RANK, targets=list(adapters[0].config.target_modules), device=device).to(low)
    inputs = [t.to(device) for t in model_io(spec, batch=batch, seq=seq).sample]
    peer_inputs = [t.to(low) if t.is_floating_point() else t for t in inputs]

    def slots_for(k: int) -> list[int]:
        return [1 + (i % k) for i in range(batch)]

    # --- verification (the largest spread; every row) -------------------------------------------
    with torch.no_grad():
        k = n
        for eng, e in ours.items():
            rows = e.forward(inputs, slots_for(k))
            for s in sorted(set(slots_for(k)))[:4]:  # four adapters against their explicit model
                ref_model = apply_adapter(base_for(adapters[s - 1], spec), adapters[s - 1]).to(device).eval()
                set_path(ref_model, "explicit")
                ref = ref_model(*inputs)
                for i in [i for i, t in enumerate(slots_for(k)) if t == s]:
                    err = float((rows[i]["logits"].to(device) - ref[i]).abs().max())
                    if err > (1e-4 if e.dtype == torch.float32 else check_atol(e.dtype)):
                        raise SystemExit(f"{eng}: row {i} (adapter {s}) differs from its explicit model by {err:.2e}")
        names = [f"a{s - 1}" for s in slots_for(k)]
        mixed = peft(*peer_inputs, adapter_names=names)
        for name in sorted(set(names))[:4]:
            peft.set_adapter(name)
            alone = peft(*peer_inputs)
            rows = [i for i, x in enumerate(names) if x == name]
            err = float((mixed[rows] - alone[rows]).abs().max())
            if err > (1e-4 if low == torch.float32 else check_atol(low)):
                raise SystemExit(f"peft mixed batch differs from adapter {name} alone by {err:.2e}")

    # --- timing --------------------------------------------------------------------------------
    results = []
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    single = [[t[i: i + 1] for t in peer_inputs] for i in range(batch)]

    def naive(k: int) -> None:
        for i, s in enumerate(slots_for(k)):
            peft.set_adapter(f"a{s - 1}")
            peft(*single[i])

    # Every (adapter count, method) in one interleaved run: this VM drifts by 10-25% over a few
    # minutes, so ratios between counts timed in separate runs would measure the drift.
    variants = {}
    for k in counts:
        for eng, e in ours.items():
            variants[(k, f"ours_{eng}")] = lambda e=e, k=k: e.forward(inputs, slots_for(k))
        variants[(k, "peft_mixed")] = lambda k=k: peft(*peer_inputs, adapter_names=[f"a{s - 1}" for s in slots_for(k)])
        variants[(k, "naive_loop")] = lambda k=k: naive(k)
    with torch.no_grad():
        times = interleaved(variants, rounds=rounds, iters=1, warmup=1, sync=sync)
    for k in counts:
        for (kk, method), ms in times.items():
            if kk == k:
                results.append({"adapters": k, "method": method, **summary(ms)})
        log(f"{k:2d} adapters: " + ", ".join(f"{m} {np.median(ms):.1f} ms" for (kk, m), ms in times.items() if kk == k))
    for r in results:
        one = next(x for x in results if x["method"] == r["method"] and x["adapters"] == counts[0])
        r["ratio_to_one_adapter"] = r["median_ms"] / one["median_ms"]
        peer = next(x for x in results if x["method"] == "peft_mixed" and x["adapters"] == r["adapters"])
        r["speedup_vs_peft_mixed"] = peer["median_ms"] / r["median_ms"]
    return {"results": results, "dtype": str(low).removeprefix("torch.")}


def plot(report: dict, path: Path) -> None:
    fig, ax = figure(figsize=(6, 3.8))
    for method in dict.fromkeys(r["method"] for r in report["results"]):
        pts = [r for r in report["results"] if r["method"] == method]
        ax.errorbar([p["adapters"] for p in pts], [p["median_ms"] for p in pts],
                    yerr=[[p["median_ms"] - p["min_ms"] for p in pts], [p["max_ms"] - p["median_ms"] for p in pts]],
                    marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"distinct adapters in a batch of {report['batch']}")
    ax.set_ylabel("batch latency, ms (median)")
    ax.set_title(f"{report.get('base', {}).get('name', 'MiniLM')} seq {report['seq']}, {report['device']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    environment()  # read at the start: the commit and machine this run measures
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (a test that it runs)")
    p.add_argument("--device", default="cpu", help="torch device (onnxruntime runs on cpu only here)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seq", type=int, default=64)
    add_base_option(p)
    add_dtype_option(p)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/multitenant.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    spec = base_spec(args.base)
    notes = []
    engines = ["torch", "torch_folded"]
    if device.type == "cpu" and not args.quick:
        if "onnxruntime" in spec.backends:
            engines.append("onnxruntime")
        else:
            notes.append(f"onnxruntime skipped: base {spec.name!r} is served by {', '.join(spec.backends)} only")
    counts, batch, seq, rounds = ([1, 2], 4, 8, 1) if args.quick else ([1, 4, 16, 32], 32, args.seq, args.rounds)
    limit = seq_limit(spec)
    if limit is not None and seq > limit:
        notes.append(f"seq {seq} -> {limit}: base {spec.name!r} takes at most {limit} positions")
        seq = limit
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = run(spec, counts=counts, batch=batch, seq=seq, rounds=rounds, device=device, engines=engines,
                  workdir=Path(tmp), log=print, dtype=args.dtype)
    report = {"benchmark": "multitenant", **environment(), "device": str(device), "batch": batch, "seq": seq,
              "rounds": rounds, "wara": f"r={RANK} haar J=1", "peft_lora": f"r={2 * RANK}", "quick": args.quick,
              "wall_seconds": time.perf_counter() - t0, **out}
    if args.base != DEFAULT_BASE:  # the default's report keeps its established keys
        report["base"] = base_info(spec)
        report["notes"] = notes
    write_json(args.out, report)
    plot(report, args.out.with_suffix(".png"))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
