"""Served unmerged / base in paired single calls: issue 13's ratio measured so that the VM's
drift cancels within each pair.

The serving engine's base rows, its served path (the default slot form: own factors through
`runtime.kernels.native_linear` where the rule picks them) and its merged model, one call each
in a shuffled order per turn (seeded), many turns in one process; each turn gives the ratios
served / base and merged / base of calls made within a few tens of milliseconds of each other,
and the report is their median and quartiles. `benchmarks.latency` takes medians of rounds
instead, so a slow second that falls on some forms of a round and not others moves its ratio;
here it moves one pair. merged / base is the control: its median must lie within 0.97-1.03,
else the run is marked noise (``valid`` false). Outputs are checked against each other before
timing. WaRA r=4 haar J=1 on the base's default layers, as `benchmarks.latency`.

    .venv/bin/python -m benchmarks.paired                     # MiniLM seq 64, B=1 (200 turns), B=32 (40)
    .venv/bin/python -m benchmarks.paired --quick             # tiny (used by the tests)
    .venv/bin/python -m benchmarks.paired --base hf:DIR       # another base
    .venv/bin/python -m benchmarks.paired --dtype bfloat16    # the engine in bfloat16
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import add_base_option, add_dtype_option, base_info, base_spec, check_atol, environment, write_json

RANK = 4


def quartiles(values: list[float]) -> dict:
    v = sorted(values)
    return {"median": v[len(v) // 2], "q25": v[len(v) // 4], "q75": v[(3 * len(v)) // 4], "min": v[0], "max": v[-1]}


def measure(spec, *, batch: int, seq: int, turns: int, workdir: Path, dtype: str = "float32") -> dict:
    from exporter.onnx_export import model_io
    from runtime.adapters import DeviceTier, prepare
    from runtime.engine import TorchEngine
    from wara_train.synthetic import random_adapter

    adapter = random_adapter(spec, workdir / "adapter", rank=RANK, seed=0)
    engine = TorchEngine(spec, device="cpu", dtype=dtype)
    prepared = prepare(engine, "adapter", adapter)
    DeviceTier(engine).write(1, prepared)
    merged = engine.build_merged(prepared.factors)
    inputs = list(model_io(spec, batch=batch, seq=seq).sample)
    variants = {"base": lambda: engine.forward(inputs, [0] * batch),
                "served": lambda: engine.forward(inputs, [1] * batch),
                "merged": lambda: engine.forward_merged(merged, prepared.head, inputs)}
    with torch.no_grad():
        outs = {k: torch.stack([next(iter(r.values())) for r in f()]) for k, f in variants.items()}
        err = float((outs["served"] - outs["merged"]).abs().max())
        if err > check_atol(engine.dtype):
            raise SystemExit(f"{spec.name} B={batch}: served and merged disagree by {err:.2e}")
        for f in variants.values():
            f()
        order, rng = list(variants), random.Random(0)
        ratios: dict[str, list[float]] = {"served": [], "merged": []}
        for _ in range(turns):
            rng.shuffle(order)
            took = {}
            for name in order:
                t0 = time.perf_counter()
                variants[name]()
                took[name] = time.perf_counter() - t0
            for name in ratios:
                ratios[name].append(took[name] / took["base"])
    served, control = quartiles(ratios["served"]), quartiles(ratios["merged"])
    return {"batch": batch, "seq": seq, "turns": turns, "served_over_base": served, "merged_over_base": control,
            "valid": 0.97 <= control["median"] <= 1.03, "max_abs_error_vs_merged": err,
            "slot_form": "own" if any(1 in layer.own for layer in engine.layers.values()) else "folded",
            "dtype": str(engine.dtype).removeprefix("torch.")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_base_option(p)
    add_dtype_option(p)
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--turns", type=int, default=200, help="turns at B=1; a batch of B takes max(40, turns / B)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a test that it runs)")
    p.add_argument("--out", default="benchmarks/results/paired.json")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if any(b < 1 for b in batches) or args.seq < 1 or args.turns < 1:
        p.error("--batches, --seq and --turns must be positive")
    if args.quick:
        batches, args.seq, args.turns = [1, 2], 8, 6
    spec = base_spec(args.base)
    env = environment()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in batches:
            row = measure(spec, batch=b, seq=args.seq, turns=max(40, args.turns // b) if not args.quick else args.turns,
                          workdir=Path(tmp) / f"b{b}", dtype=args.dtype)
            rows.append(row)
            s, m = row["served_over_base"], row["merged_over_base"]
            print(f"{spec.name} B={b} seq={args.seq}: served/base {s['median']:.3f} (IQR {s['q25']:.3f}-{s['q75']:.3f}), "
                  f"merged/base {m['median']:.3f}{'' if row['valid'] else ' (noise: rerun)'}", flush=True)
    write_json(args.out, {"benchmark": "paired", **env, "base": base_info(spec), "rank": RANK, "wavelet": "haar J=1",
                          "quick": args.quick, "wall_seconds": time.perf_counter() - started, "results": rows})
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
