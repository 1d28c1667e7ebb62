"""Latency of merged versus unmerged WaRA: base, merged, unmerged-folded, unmerged-explicit.

Two workloads, each in PyTorch (eager) and onnxruntime:

- ``synthetic``: one (d, d) linear layer, d in {1024, 4096}, WaRA r=4 haar at J = 1, 2, 3; the
  layer applied to batch x seq tokens. Every form is first checked against a float64
  ``x (W0 + ΔW)ᵀ``.
- the base model (``--base SOURCE``, default ``minilm``: the whole MiniLM, 36 adapted linears;
  any spec, e.g. ``hf:DIR[@TASK]``), WaRA r=4 haar J=1 on its default layers, rows labelled with
  the base's name. PyTorch: the serving engine's base rows, its slot path on folded factors
  (unmerged-folded: the GEMM pair), its slot path as served by default (``fused``: own factors
  where `runtime.selection.own_form_wins` picks them, run by `runtime.kernels.native_linear`), its merged path,
  the injected model's explicit path, and peft's LoRA r=8 on the same layers.
  onnxruntime (where the base supports it): the exporter's base, merged, multi
  (unmerged-folded, slot inputs) and unmerged (explicit wavelet ops) graphs. All checked against
  each other before timing. Sequence lengths past the base's position table are skipped (the
  JSON's ``notes`` say so).

onnxruntime sessions run without spinning worker threads, as the server runs them: with
several sessions timed in turn, one session's spinning pool otherwise steals the cores from the
next (B=1 merged/base swung between 0.67 and 1.18 in such a run).

Forms are timed interleaved one call at a time (base, merged, folded, explicit, base, ...; a
round is a few such turns): median and min-max of the per-round medians, and each median's ratio to base.
A cell whose merged form(s) read a median / base outside 0.97-1.03 (they do the base's work: the
run measured the machine) is timed again, up to ``--tries`` attempts; the attempt nearest 1 is
kept and the base row records ``valid``, ``attempts`` and ``control_ratios``. Next to each ratio: the FLOP ratio (what
the overhead would be if time followed matmul FLOPs) and the base's achieved GFLOP/s as a
fraction of a plain matmul's measured in the same run. A model's FLOPs are counted from the model:
2·m·n per token for each adapted (m, n) layer (tokens counted by forward hooks), plus attention's
Q Kᵀ and softmax·V where a transformers config gives its depth and width (`benchmarks.flops`).

    .venv/bin/python -m benchmarks.latency            # full grid, 7 rounds (about 14 min on 2 cores)
    .venv/bin/python -m benchmarks.latency --quick    # tiny sizes (used by the tests)
    .venv/bin/python -m benchmarks.latency --model-only --batches 1,32 --seqs 64 --rounds 21 \
        --out benchmarks/results/latency_seq64.json   # the issue-13 cells alone, more rounds
    .venv/bin/python -m benchmarks.latency --base hf:DIR --device cuda   # another base, on a GPU
    .venv/bin/python -m benchmarks.latency --model-only --dtype bfloat16   # the engines and peft in bfloat16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (CONTROL_RANGE, DEFAULT_BASE, add_base_option, add_dtype_option, base_info, base_spec,
                               check_atol, environment, figure, interleaved_controlled, peft_peer, plain_base,
                               save_figure, seq_limit, summary, write_json)
from benchmarks.flops import (adapter_flops, attention_dims, layer_tokens, model_base_flops, ort_matmul_gflops,
                              synchronize, torch_matmul_gflops)

RANK = 4
FORMS = ("base", "merged", "folded", "explicit")


# ------------------------------------------------------------------------------------------
# synthetic layers


def synthetic_layers(d: int, levels: list[int], seed: int) -> dict:
    """One seeded (d, d) base layer and, per J, a WaRA wrapper of it with random factors."""
    from wara_train.config import WaraConfig
    from wara_train.layer import WaraLinear
    from wara_train.synthetic import randomize_factors

    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(d, d, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, d, generator=gen) / d**0.5)
    out = {}
    for j in levels:
        cfg = WaraConfig(rank=RANK, alpha=2.0 * RANK, wavelet="haar", levels=j, target_modules=("x",))
        out[j] = WaraLinear(base, cfg).eval()
        randomize_factors(out[j], seed + j, std=1.0 / d**0.5)
    return out


def _ort_synthetic(layer, form: str, path: Path):
    """A one-layer graph: y = x W0ᵀ (+ the adapter in ``form``)."""
    import onnx
    from onnx import TensorProto, helper

    from exporter.onnx_ops import DOMAIN, DOMAIN_VERSION, OPSET, GraphBuilder, explicit_delta, wara_functions
    from exporter.verify import ort_session

    d = layer.base.weight.shape[0]
    g = GraphBuilder(prefix="syn")
    with torch.no_grad():
        w = layer._merged_weight() if form == "merged" else layer.base.weight
        y = g.node("MatMul", ["x", g.tensor("Wt", w.T.contiguous())], "base")
        if form == "folded":
            la, lb = layer.folded()
            z = g.node("MatMul", ["x", g.tensor("At", la.T.contiguous())], "z")
            y = g.node("Add", [y, g.node("MatMul", [z, g.tensor("Bt", lb.T.contiguous())], "u")], "y")
        elif form == "explicit":
            delta = explicit_delta(g, "x", layer.factors(), shape=(d, d), spec=layer.spec, scale=layer.config.scale, layer="syn")
            y = g.node("Add", [y, delta], "y")
    g.node("Identity", [y], "out", out="y_out")
    graph = helper.make_graph(g.nodes, "synthetic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", d])],
                              [helper.make_tensor_value_info("y_out", TensorProto.FLOAT, ["T", d])],
                              initializer=list(g.initializers.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                              functions=wara_functions() if form == "explicit" else [])
    onnx.save(model, path)
    return ort_session(str(path), spinning=False)


def run_synthetic(*, widths: list[int], batches: list[int], seqs: list[int], levels: list[int], rounds: int, max_iters: int,
                  device: torch.device, engines: list[str], workdir: Path, log, tries: int = 3) -> list[dict]:
    rows = []
    for d in widths:
        layers = synthetic_layers(d, levels, seed=d)
        ort_forms = {}
        if "onnxruntime" in engines:  # built on CPU before anything moves to the device
            ort_forms[("base", 0)] = _ort_synthetic(layers[levels[0]], "base", workdir / f"syn{d}_base.onnx")
            for j, layer in layers.items():
                for form in ("merged", "folded", "explicit"):
                    ort_forms[(form, j)] = _ort_synthetic(layer, form, workdir / f"syn{d}_{form}{j}.onnx")
        base = layers[levels[0]].base.to(device)
        torch_forms: dict[tuple[str, int], object] = {}
        for j, layer in layers.items():
            layer.to(device)
            with torch.no_grad():
                merged = layer._merged_weight().clone()
                la, lb = (t.contiguous() for t in layer.folded())
            torch_forms[("merged", j)] = lambda x, w=merged: x @ w.T
            torch_forms[("folded", j)] = lambda x, la=la, lb=lb: torch.addmm(x @ base.weight.T, x @ la.T, lb.T)
            layer.set_path("explicit")
            torch_forms[("explicit", j)] = layer
        for batch in batches:
            for seq in seqs:
                x = torch.randn(batch * seq, d, generator=torch.Generator().manual_seed(1)).to(device)
                with torch.no_grad():
                    refs = {j: x.double() @ (layer.base.weight.double() + layer.delta_weight().double()).T
                            for j, layer in layers.items()}
                for engine in engines:
                    if engine == "torch":
                        variants = {"base:0": lambda: base(x)}
                        fns = torch_forms
                        call = lambda f: (lambda: f(x))  # noqa: E731
                    else:
                        xn = x.cpu().numpy()
                        fns = {k: s for k, s in ort_forms.items() if k[0] != "base"}
                        variants = {"base:0": lambda s=ort_forms[("base", 0)]: s.run(None, {"x": xn})}
                        call = lambda s: (lambda: s.run(None, {"x": xn}))  # noqa: E731
                    errors = {}
                    with torch.no_grad():
                        for (form, j), f in fns.items():
                            out = torch.as_tensor(call(f)()[0] if engine == "onnxruntime" else call(f)())
                            errors[f"{form}:J{j}"] = float((out.double().to(device) - refs[j]).abs().max())
                            variants[f"{form}:{j}"] = call(f)
                    worst = max(errors.values())
                    scale = float(refs[levels[0]].abs().max())
                    if worst > 1e-4 * max(1.0, scale):
                        raise SystemExit(f"synthetic d={d} {engine}: a form disagrees with float64 by {worst:.2e}: {errors}")
                    iters = max(1, min(max_iters, int(2e8 / (2 * batch * seq * d * d) + 1)))
                    with torch.no_grad():
                        times, check = interleaved_controlled(
                            variants, base="base:0", controls=[k for k in variants if k.startswith("merged:")],
                            tries=tries, rounds=rounds, iters=iters, sync=lambda: synchronize(device), alternate=True)
                    base_ms = times.pop("base:0")
                    base_flops = 2 * batch * seq * d * d
                    rows.append({"workload": f"synthetic d={d}", "engine": engine, "batch": batch, "seq": seq,
                                 "form": "base", "levels": None, **summary(base_ms, base_ms), "flop_ratio": 1.0,
                                 "base_gflops": base_flops / (np.median(base_ms) * 1e6), **_control(check)})
                    for key, ms in times.items():
                        form, j = key.split(":")
                        j = int(j)
                        extra = adapter_flops(d, d, rank=RANK, levels=j, taps=2, form=form) * batch * seq
                        rows.append({"workload": f"synthetic d={d}", "engine": engine, "batch": batch, "seq": seq,
                                     "form": form, "levels": j, **summary(ms, base_ms),
                                     "flop_ratio": (base_flops + extra) / base_flops, "max_abs_error": errors[f"{form}:J{j}"],
                                     "valid": check["valid"]})
                    log(f"synthetic d={d} {engine} B={batch} seq={seq}: base {np.median(base_ms):.2f} ms; "
                        + ", ".join(f"{r['form']} J{r['levels']} {r['ratio']:.2f}x" for r in rows[-len(times):]))
    return rows


# ------------------------------------------------------------------------------------------
# a whole base model


def _control(check: dict) -> dict:
    """A cell's base-row record of its control: valid, attempts, the merged forms' ratios."""
    return {"valid": check["valid"], "attempts": check["attempts"],
            "control_ratios": {k.split(":")[-1]: v for k, v in check["control_ratios"].items()}}


def seq_grid(spec, seqs: list[int]) -> tuple[list[int], list[str]]:
    """The sequence lengths the base takes out of ``seqs`` (at most its inputs' largest seq
    axis; one value when its inputs do not depend on seq, as an image model's), and why any
    were dropped."""
    limit = seq_limit(spec)
    notes = []
    if limit is not None and max(seqs) > limit:
        kept = [s for s in seqs if s <= limit] or [limit]
        notes.append(f"seq {', '.join(str(s) for s in seqs if s not in kept)} skipped: base {spec.name!r} "
                     f"takes at most {limit} positions")
        seqs = kept
    if len(seqs) > 1 and [t.shape for t in spec.sample(1, seqs[0])] == [t.shape for t in spec.sample(1, seqs[-1])]:
        notes.append(f"one seq only: base {spec.name!r}'s inputs do not depend on seq")
        seqs = seqs[:1]
    return seqs, notes


def run_model(spec, *, batches: list[int], seqs: list[int], rounds: int, max_iters: int, device: torch.device,
              engines: list[str], workdir: Path, log, tries: int = 3, dtype: str = "float32") -> list[dict]:
    """The whole base ``spec`` with one random WaRA adapter on its default layers (r=4 haar J=1),
    every form checked against the explicit model (float32) before timing; rows labelled with its
    name. The serving engines and peft compute in ``dtype``."""
    from exporter.common import base_for
    from exporter.onnx_export import INDEX_INPUT, export_onnx, model_io
    from exporter.verify import ort_session, pack_slots
    from runtime.adapters import DeviceTier, prepare
    from runtime.engine import TorchEngine
    from wara_train.artifact import apply_adapter
    from wara_train.layer import layer_shape
    from wara_train.model import set_path
    from wara_train.synthetic import random_adapter

    adapter = random_adapter(spec, workdir / "adapter", rank=RANK, seed=0)
    targets = list(adapter.config.target_modules)
    engine = TorchEngine(spec, device=str(device), slot_form="folded", dtype=dtype)
    folded = prepare(engine, "adapter", adapter)
    DeviceTier(engine).write(1, folded)
    # The served default (slot_form auto): own factors and the fused wavelet op where the rule
    # picks them (MiniLM haar J=1 does), else the same folded path.
    served = TorchEngine(spec, device=str(device), dtype=dtype)
    DeviceTier(served).write(1, prepare(served, "adapter", adapter))
    merged = engine.build_merged(folded.factors)
    explicit = apply_adapter(base_for(adapter, spec), adapter).to(device).eval()
    set_path(explicit, "explicit")
    low = engine.dtype
    peft = peft_peer(spec, 1, rank=2 * RANK, targets=targets, device=device).to(low)
    # peft's base: the same model without peft (its disable_adapter() context walks every
    # module on each call, which would make the base look slower than the adapted model).
    peft_base = plain_base(spec).to(device, low).eval()
    shapes = {t: layer_shape(engine.layers[t].base) for t in targets}
    attention = attention_dims(peft_base)
    sessions = {}
    if "onnxruntime" in engines:
        base = base_for(adapter, spec)
        cache: dict = {}
        for form, name in (("base", "base"), ("merged", "merged"), ("folded", "multi"), ("explicit", "unmerged")):
            path = export_onnx(adapter, base, name, workdir / f"{name}.onnx", spec=spec, log=lambda s: None, _cache=cache)
            sessions[form] = ort_session(str(path), spinning=False)
    rows = []
    for batch in batches:
        for seq in seqs:
            io = model_io(spec, batch=batch, seq=seq)
            inputs = [t.to(device) for t in io.sample]
            peer_inputs = [t.to(low) if t.is_floating_point() else t for t in inputs]
            tokens = layer_tokens(peft_base, targets, peer_inputs)
            for eng in engines:
                if eng == "torch":
                    variants = {
                        "base": lambda: engine.forward(inputs, [0] * batch),
                        "merged": lambda: engine.forward_merged(merged, folded.head, inputs),
                        "folded": lambda: engine.forward(inputs, [1] * batch),
                        "fused": lambda: served.forward(inputs, [1] * batch),
                        "explicit": lambda: explicit(*inputs),
                        "peft_base": lambda: peft_base(*peer_inputs),
                        "peft_lora": lambda: peft(*peer_inputs),
                    }
                    with torch.no_grad():
                        outs = {f: variants[f]() for f in ("merged", "folded", "fused")}
                        outs = {f: torch.stack([r["logits"] for r in o]) for f, o in outs.items()}
                        outs["explicit"] = variants["explicit"]().cpu()
                        with peft.disable_adapter():  # the peer's base is peft's own base
                            if not torch.allclose(peft(*peer_inputs), peft_base(*peer_inputs), atol=1e-5):
                                raise SystemExit("peft's base differs from the plain model")
                else:
                    feeds = {}
                    for form, sess in sessions.items():
                        f = {n: t.numpy() for n, t in zip(io.input_names, io.sample)}
                        if form == "folded":
                            f.update(pack_slots([i.name for i in sess.get_inputs()], [adapter], base))
                            f[INDEX_INPUT] = np.ones(batch, dtype=np.int64)
                        feeds[form] = f
                    variants = {form: (lambda s=sess, f=feeds[form]: s.run(None, f)) for form, sess in sessions.items()}
                    outs = {form: torch.as_tensor(variants[form]()[0]) for form in ("merged", "folded", "explicit")}
                ref = outs["explicit"]
                errors = {f: float((o - ref).abs().max()) for f, o in outs.items()}
                if max(errors.values()) > (check_atol(low) if eng == "torch" else 1e-3):
                    raise SystemExit(f"{spec.name} {eng} B={batch} seq={seq}: forms disagree: {errors}")
                base_flops = model_base_flops(shapes, tokens, batch=batch, attention=attention)
                iters = max(1, min(max_iters, int(3e9 / base_flops) + 1))
                with torch.no_grad():
                    times, check = interleaved_controlled(variants, base="base", controls=["merged"], tries=tries,
                                                          rounds=rounds, iters=iters, sync=lambda: synchronize(device),
                                                          alternate=True)
                if "peft_lora" in times:  # the peer: peft's unmerged LoRA r=8 over its own base
                    lora = sum(2 * 2 * RANK * (m + n) * tokens[t] for t, (m, n) in shapes.items())
                    rows.append({"workload": spec.name, "engine": "torch", "batch": batch, "seq": seq, "form": "peft_lora",
                                 "levels": None, **summary(times["peft_lora"], times["peft_base"]),
                                 "flop_ratio": (base_flops + lora) / base_flops, "peft_base_ms": summary(times["peft_base"])["median_ms"],
                                 "valid": check["valid"]})
                for form in FORMS + (("fused",) if "fused" in times else ()):
                    flop_form = "explicit" if form == "fused" and served.layers[targets[0]].own else form
                    extra = sum(adapter_flops(m, n, rank=RANK, levels=1, taps=2, form=flop_form) * tokens[t]
                                for t, (m, n) in shapes.items())
                    row = {"workload": spec.name, "engine": eng, "batch": batch, "seq": seq, "form": form, "levels": 1,
                           **summary(times[form], times["base"]), "flop_ratio": (base_flops + extra) / base_flops}
                    if form == "base":
                        row["base_gflops"] = base_flops / (np.median(times["base"]) * 1e6)
                        row.update(_control(check))
                    else:
                        row["valid"] = check["valid"]
                        row["max_abs_error"] = errors.get(form, 0.0)
                    rows.append(row)
                log(f"{spec.name} {eng} B={batch} seq={seq}: base {np.median(times['base']):.2f} ms; "
                    + ", ".join(f"{r['form']} {r['ratio']:.2f}x" for r in rows[-4:]))
    return rows


def plot(report: dict, path: Path) -> None:
    rows = [r for r in report["results"] if r["form"] != "base" and r["levels"] in (None, 1)]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = figure(1, len(workloads), figsize=(4.2 * len(workloads), 3.8), squeeze=False, sharey=True)
    for ax, wl in zip(axes[0], workloads):
        for (eng, form), style in zip([(e, f) for e in report["engines"] for f in FORMS[1:]], ["o-", "s-", "^-", "o--", "s--", "^--"]):
            pts = [r for r in rows if r["workload"] == wl and r["engine"] == eng and r["form"] == form]
            if pts:
                ax.plot(range(len(pts)), [p["ratio"] for p in pts], style, label=f"{eng} {form}", ms=4)
                ax.set_xticks(range(len(pts)), [f"{p['batch']}x{p['seq']}" for p in pts], rotation=45, fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{wl} (J=1)", fontsize=9)
        ax.set_xlabel("batch x seq", fontsize=8)
    axes[0][0].set_ylabel("latency / base (median)")
    axes[0][0].set_yscale("log")
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    environment()  # read at the start: the commit and machine this run measures
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (a test that it runs)")
    p.add_argument("--device", default="cpu", help="torch device (onnxruntime runs only on cpu here)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tries", type=int, default=3,
                   help="attempts per cell while a merged form's median / base leaves 0.97-1.03 (noise; default 3)")
    p.add_argument("--model-only", action="store_true", help="skip the synthetic layers (the whole model only)")
    p.add_argument("--batches", type=_ints, help="the model's batch sizes, comma-separated (default 1,8,32)")
    p.add_argument("--seqs", type=_ints, help="the model's sequence lengths, comma-separated (default 16,64,128)")
    add_base_option(p)
    add_dtype_option(p)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    spec = base_spec(args.base)
    engines = ["torch"] + (["onnxruntime"] if device.type == "cpu" else [])
    # --quick skips the model's onnxruntime exports (a minute of work for MiniLM; the exporter's
    # tests check them).
    model_engines = [e for e in (engines[:1] if args.quick else engines) if e == "torch" or e in spec.backends]
    if args.quick:
        grid = dict(widths=[64], batches=[2], seqs=[4], levels=[1, 2], model_batches=[1], model_seqs=[8], rounds=1, max_iters=1,
                    tries=1)
    else:
        grid = dict(widths=[] if args.model_only else [1024, 4096], batches=[1, 8, 32], seqs=[16, 128],
                    levels=[1, 2, 3], model_batches=args.batches or [1, 8, 32], model_seqs=args.seqs or [16, 64, 128],
                    rounds=args.rounds, max_iters=10, tries=args.tries)
    model_seqs, notes = seq_grid(spec, grid["model_seqs"])
    if len(model_engines) < len(engines) and not args.quick:
        notes.append(f"onnxruntime skipped: base {spec.name!r} is served by {', '.join(spec.backends)} only")
    from runtime.selection import resolve_dtype

    dtype = str(resolve_dtype(args.dtype, backend="torch", device=device)).removeprefix("torch.")
    if dtype != "float32" and "onnxruntime" in model_engines:
        model_engines.remove("onnxruntime")
        notes.append(f"onnxruntime skipped: it computes in float32 only, the engines here in {dtype}")
    t0 = time.perf_counter()
    peak = {"torch": torch_matmul_gflops(device, 256 if args.quick else 2048)}
    if "onnxruntime" in engines:
        peak["onnxruntime"] = ort_matmul_gflops(256 if args.quick else 2048)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_synthetic(widths=grid["widths"], batches=grid["batches"], seqs=grid["seqs"], levels=grid["levels"],
                             rounds=grid["rounds"], max_iters=grid["max_iters"], device=device, engines=engines, workdir=Path(tmp), log=print,
                             tries=grid["tries"])
        rows += run_model(spec, batches=grid["model_batches"], seqs=model_seqs, rounds=grid["rounds"], max_iters=grid["max_iters"],
                          device=device, engines=model_engines, workdir=Path(tmp), log=print, tries=grid["tries"],
                          dtype=dtype)
    for r in rows:
        if "base_gflops" in r:
            r["fraction_of_matmul_peak"] = r["base_gflops"] / peak[r["engine"]]
    report = {"benchmark": "latency", **environment(), "device": str(device), "engines": engines, "rank": RANK,
              "wavelet": "haar", "dtype": dtype, "rounds": grid["rounds"], "tries": grid["tries"],
              "control_range": list(CONTROL_RANGE), "matmul_peak_gflops": peak, "quick": args.quick,
              "wall_seconds": time.perf_counter() - t0, "results": rows}
    if args.base != DEFAULT_BASE:  # the default's report keeps its established keys
        report["base"] = base_info(spec)
        report["notes"] = notes
    write_json(args.out, report)
    plot(report, args.out.with_suffix(".png"))
    print(f"{len(rows)} rows in {report['wall_seconds']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
