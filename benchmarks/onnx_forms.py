"""onnxruntime latency of the exported forms: base, merged, unmerged (explicit WaRA ops), multi.

Each form is exported from one adapter, verified against the PyTorch unmerged model (max abs
error <= 1e-4) before anything is timed, then timed interleaved (base, merged, unmerged, multi,
base, ...) so drift on the machine hits every form alike. Reports the median and min-max of the
per-round medians and the ratio of each median to the base's.

    .venv/bin/python -m benchmarks.onnx_forms                 # MiniLM, batch 1 and 32, seq 64
    .venv/bin/python -m benchmarks.onnx_forms --quick         # tiny run (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment

FORMS = ("base", "merged", "unmerged", "multi")


def run(*, base_model: str, rank: int, wavelet: str, levels: int, batches: list[int], seq: int,
        rounds: int, iters: int, workdir: Path) -> dict:
    from exporter.common import base_for
    from exporter.onnx_export import INDEX_INPUT, export_onnx, model_io
    from exporter.verify import ort_session, pack_slots, verify_onnx
    from wara_train.synthetic import random_adapter

    adapter = random_adapter(base_model, workdir / "adapter", wavelet=wavelet, levels=levels, rank=rank)
    base = base_for(adapter)
    cache: dict = {}
    sessions = {}
    errors = {}
    for form in FORMS:
        path = export_onnx(adapter, base, form, workdir / f"{form}.onnx", log=lambda s: None, _cache=cache)
        res = verify_onnx(str(path), [adapter], base, io=model_io(base_model, batch=2, seq=seq),
                          rows=[0, 0] if form == "multi" else None)
        if not res.ok:
            raise SystemExit(f"{form} disagrees with PyTorch before timing: {res}")
        errors[form] = res.max_abs
        sessions[form] = ort_session(str(path))
    results = []
    for batch in batches:
        io = model_io(base_model, batch=batch, seq=seq)
        feeds = {}
        for form, sess in sessions.items():
            f = {n: t.numpy() for n, t in zip(io.input_names, io.sample)}
            if form == "multi":
                f.update(pack_slots([i.name for i in sess.get_inputs()], [adapter], base))
                f[INDEX_INPUT] = np.ones(batch, dtype=np.int64)
            feeds[form] = f
            for _ in range(3):
                sess.run(None, f)  # warm-up
        per_round: dict[str, list[float]] = {f: [] for f in FORMS}
        for _ in range(rounds):
            for form in FORMS:
                times = []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    sessions[form].run(None, feeds[form])
                    times.append(time.perf_counter() - t0)
                per_round[form].append(statistics.median(times) * 1e3)
        base_ms = statistics.median(per_round["base"])
        for form in FORMS:
            ms = per_round[form]
            results.append({"batch": batch, "seq": seq, "form": form, "median_ms": statistics.median(ms),
                            "min_ms": min(ms), "max_ms": max(ms), "ratio_to_base": statistics.median(ms) / base_ms})
    return {
        "benchmark": "onnx_forms",
        **environment(),
        "config": {"base_model": base_model, "rank": rank, "wavelet": wavelet, "levels": levels,
                   "rounds": rounds, "iters_per_round": iters, "provider": "CPUExecutionProvider"},
        "verified_max_abs_error": errors,
        "results": results,
    }


def table(report: dict) -> str:
    lines = ["| batch | seq | form | median ms (min-max) | / base |", "| --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        lines.append(f"| {r['batch']} | {r['seq']} | {r['form']} | {r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | {r['ratio_to_base']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="minilm", choices=("minilm", "effnet-lite0"))
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--wavelet", default="haar")
    p.add_argument("--levels", type=int, default=1)
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 32)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="one tiny round (a test that the benchmark runs)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_forms.json"))
    args = p.parse_args(argv)
    batches = args.batch or [1, 32]
    if args.quick:
        batches, args.seq, args.rounds, args.iters = [1], 8, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        report = run(base_model=args.base, rank=args.rank, wavelet=args.wavelet, levels=args.levels, batches=batches,
                     seq=args.seq, rounds=args.rounds, iters=args.iters, workdir=Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
