"""`make bench`: run every benchmark, write benchmarks/results/*.json (+ PNG plots), and
regenerate the "Results" section of docs/benchmarks.md (between its bench:start / bench:end
markers) from those files.

    .venv/bin/python -m benchmarks.run                     # everything (about 1.5 h on 2 cores)
    .venv/bin/python -m benchmarks.run --only latency      # one (repeatable)
    .venv/bin/python -m benchmarks.run --quick             # each once on tiny sizes, to a temp dir
    .venv/bin/python -m benchmarks.run --report            # only regenerate the docs/benchmarks.md section
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path("benchmarks/results")
BENCH_PAGE = Path("docs/benchmarks.md")  # the page whose marked section `render` fills
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# result name -> (module, extra arguments)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "latency": ("benchmarks.latency", []),
    "multitenant": ("benchmarks.multitenant", []),
    "hotswap": ("benchmarks.hotswap", []),
    "load_onnxruntime": ("benchmarks.load", ["--backend", "onnxruntime"]),
    "load_torch": ("benchmarks.load", ["--backend", "torch"]),
    "grpc_overhead_torch": ("benchmarks.grpc_overhead", ["--backend", "torch"]),
    "grpc_overhead_onnxruntime": ("benchmarks.grpc_overhead", ["--backend", "onnxruntime"]),
    "quality": ("benchmarks.quality", []),
    "kernels": ("benchmarks.kernels", []),
    "paired": ("benchmarks.paired", []),
}


def run_all(results: Path, *, quick: bool, only: list[str] | None = None) -> list[Path]:
    results.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (module, extra) in BENCHMARKS.items():
        if only and name not in only:
            continue
        out = results / f"{name}.json"
        print(f"== {name}", flush=True)
        args = extra + ["--out", str(out)] + (["--quick"] if quick else [])
        # One process each: its peak memory, threads and allocator state are its own.
        if subprocess.run([sys.executable, "-m", module, *args]).returncode != 0:
            raise SystemExit(f"benchmark {name} failed")
        written.append(out)
    return written


# ------------------------------------------------------------------------------------------
# docs/benchmarks.md rendering: one function per result file; each returns markdown lines


def _load(results: Path, name: str) -> dict | None:
    f = results / f"{name}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _src(r: dict, name: str) -> str:
    where = "H200" if "cuda" in str(r.get("device", "")) else f"{r['machine']['cpus']}-CPU machine"
    return f"`{name}.json`, {where}, commit {r.get('git_commit', '?')}"


def _ratio(rows: list[dict], **match) -> dict | None:
    hit = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return hit[0] if hit else None


def _control(base: dict) -> str:
    """A latency cell's control: "ok" where every merged form read 0.97-1.03 of the base, else
    "noise" (and how many attempts it took, where more than one); "-" in results without it."""
    if "valid" not in base:
        return "-"
    tries = base.get("attempts", 1)
    return ("ok" if base["valid"] else "noise") + (f" ({tries} tries)" if tries > 1 else "")


def render_latency(r: dict) -> list[str]:
    rows = r["results"]
    peak = r["matmul_peak_gflops"]
    out = [f"**Latency, merged vs unmerged** ({_src(r, 'latency')}). Median of {r.get('rounds', 5)} interleaved rounds; "
           "ratio to base, with the FLOP ratio (the overhead if time followed matmul FLOPs) in brackets. "
           + (f"A cell whose merged / base leaves 0.97-1.03 is run again, up to {r['tries']} attempts; `control` "
              "says whether the kept attempt's merged forms read in range (`noise`: they did not, so its ratios "
              "measured the machine). " if "tries" in r else "")
           + f"Plain-matmul peak measured in the run: PyTorch {peak['torch']:.0f} GFLOP/s"
           + (f", onnxruntime {peak['onnxruntime']:.0f} GFLOP/s." if "onnxruntime" in peak else "."), "",
           "MiniLM (36 adapted linears), WaRA r=4 haar J=1; `folded` = the serving slot path on folded factors "
           "(PyTorch: the GEMM pair) / multi graph (onnxruntime), `fused` = the PyTorch slot path as served by "
           "default (own factors: `wara::wavelet_linear`, the update and the base GEMM in one call, one for a query, key "
           "and value), `explicit` = wavelet ops; peft = LoRA r=8 unmerged over peft's base:", "",
           "| engine | batch x seq | base ms | base GFLOP/s (% peak) | merged | folded | fused | explicit | peft LoRA | control |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for eng in r["engines"]:
        cells = sorted({(x["batch"], x["seq"]) for x in rows if x["workload"] == "minilm" and x["engine"] == eng})
        for b, s in cells:
            base = _ratio(rows, workload="minilm", engine=eng, batch=b, seq=s, form="base")
            if base is None:
                continue
            f = {k: _ratio(rows, workload="minilm", engine=eng, batch=b, seq=s, form=k)
                 for k in ("merged", "folded", "fused", "explicit", "peft_lora")}
            cell = {k: (f"{v['ratio']:.2f} ({v['flop_ratio']:.3f})" if v else "-") for k, v in f.items()}
            out.append(f"| {eng} | {b} x {s} | {base['median_ms']:.1f} | {base['base_gflops']:.0f} "
                       f"({100 * base['fraction_of_matmul_peak']:.0f}%) | {cell['merged']} | {cell['folded']} | "
                       f"{cell['fused']} | {cell['explicit']} | {cell['peft_lora']} | {_control(base)} |")
    syn = [x for x in rows if x["workload"].startswith("synthetic")]
    if syn:
        out += ["", "One synthetic (d, d) layer on batch x seq tokens, WaRA r=4 haar at J = 1, 2, 3 "
                "(ratio to base, FLOP ratio in brackets):", "",
                "| d | engine | batch x seq | base ms | merged | folded J1 | folded J3 | explicit J1 | explicit J2 | explicit J3 | control |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for wl in dict.fromkeys(x["workload"] for x in syn):
            for eng in r["engines"]:
                for b, s in sorted({(x["batch"], x["seq"]) for x in syn if x["workload"] == wl and x["engine"] == eng}):
                    base = _ratio(syn, workload=wl, engine=eng, batch=b, seq=s, form="base")

                    def c(form: str, j: int) -> str:
                        v = _ratio(syn, workload=wl, engine=eng, batch=b, seq=s, form=form, levels=j)
                        return f"{v['ratio']:.2f} ({v['flop_ratio']:.3f})" if v else "-"

                    out.append(f"| {wl.split('=')[1]} | {eng} | {b} x {s} | {base['median_ms']:.2f} | {c('merged', 1)} | "
                               f"{c('folded', 1)} | {c('folded', 3)} | {c('explicit', 1)} | {c('explicit', 2)} | {c('explicit', 3)} | "
                               f"{_control(base)} |")
    return out + [""]


def render_multitenant(r: dict) -> list[str]:
    rows = r["results"]
    methods = list(dict.fromkeys(x["method"] for x in rows))
    out = [f"**Multi-tenant batch** ({_src(r, 'multitenant')}): {r['batch']} requests, MiniLM seq {r['seq']}, spread over "
           f"k adapters; WaRA {r['wara']} vs peft LoRA {r['peft_lora']} (equal parameters). Median ms, "
           "and the ratio to the same method with one adapter:", "",
           "| adapters | " + " | ".join(methods) + " | ours (PyTorch) vs peft mixed |",
           "| --- |" + " --- |" * (len(methods) + 1)]
    for k in sorted({x["adapters"] for x in rows}):
        cells = []
        for m in methods:
            v = _ratio(rows, adapters=k, method=m)
            cells.append(f"{v['median_ms']:.0f} ({v['ratio_to_one_adapter']:.2f}x)")
        ours = _ratio(rows, adapters=k, method="ours_torch")
        out.append(f"| {k} | " + " | ".join(cells) + f" | {ours['speedup_vs_peft_mixed']:.2f}x faster |")
    return out + [""]


def render_hotswap(r: dict) -> list[str]:
    res = r["results"]
    names = {"in_process": "in-process engine", "grpc": "over gRPC", "peft": "peft 0.21 (same base, equivalent LoRA)"}
    out = [f"**Hot-swap** ({_src(r, 'hotswap')}), p50 (min-max) ms over {r['repeats']} repetitions, every step checked:", "",
           "| where | step | p50 ms (min-max) |", "| --- | --- | --- |"]
    for part, steps in res.items():
        for step, v in steps.items():
            out.append(f"| {names.get(part, part)} | {step.replace('_', ' ')} | {v['p50_ms']:.1f} ({v['min_ms']:.1f}-{v['max_ms']:.1f}) |")
    return out + [""]


def render_load(r: dict, name: str) -> list[str]:
    if "starts" not in r:  # a result file of the earlier benchmark
        return []
    small, large = r["starts"]["small"], r["starts"]["large"]
    c, dev = r["cold"], r["device_entry_ms"]
    rounds = {label: [x for x in r["rounds"] if x["server"] == label and not x.get("warmup")] for label in ("small", "large")}

    def p50(label):
        return sorted(x["p50_ms"] for x in rounds[label])[len(rounds[label]) // 2]

    out = [f"**{large['adapters']:,} adapters, {r['backend']} engine** ({_src(r, name)}): generated MiniLM adapters "
           f"({r['adapter']}) in one root, device pool {r['device_budget_mb']:.0f} MB, host tier {r['host_budget_mb']:.0f} MB; "
           f"batch-1 requests over gRPC, one client, Zipf({r['zipf_exponent']}) over the registered names, "
           f"{len(rounds['small'])} rounds of {r['seconds_per_round']:.0f} s (after one warm-up round) alternating "
           f"between a server on the first "
           f"{small['adapters']} and one on all {large['adapters']:,}:", "",
           "| target | measured |", "| --- | --- |",
           f"| RSS per registered adapter <= 1.5 MB | {r['rss_per_registered_mb']:.3f} MB after the traffic "
           + (f"(the index alone: {r['index_alone']['rss_per_adapter_kb']:.1f} KB each; " if "index_alone" in r else "(")
           + "one more in the host tier: "
           f"{r['host_loads']['rss_per_adapter_mb']:.2f} MB RSS for {r['host_loads']['own_bytes_per_adapter_mb']:.2f} MB "
           f"of own factors) |",
           f"| batch-1 p50 at {large['adapters']:,} within 1.10x of {small['adapters']} | {r['p50_ratio']:.3f}x "
           f"({p50('large'):.2f} vs {p50('small'):.2f} ms; per round "
           + ", ".join(f"{x:.2f}" for x in r["p50_ratio_per_round"]) + ") |",
           f"| time to ready with {large['adapters']:,} in the root <= 10 s | {large['ready_s']:.1f} s, of which indexing "
           f"{large['index_s']:.2f} s (the rest is the engine; {small['adapters']} adapters: {small['ready_s']:.1f} s); "
           f"{large['tensors_read_at_start']} adapters read at start |",
           f"| cold first request <= 3x warm | {c['ratio_p50']:.2f}x ({c['cold_p50_ms']:.1f} vs {c['warm_p50_ms']:.1f} ms p50, "
           f"{c['adapters']} adapters; the root -> host read, check and fold takes "
           + (f"{r['host_entry_ms']['p50']:.1f} ms p50" if r["host_entry_ms"]["p50"] is not None else "-") + ") |",
           f"| load -> servable (host -> device) <= 5 ms p50 | {dev['p50']:.2f} ms p50, {dev['p99']:.2f} ms p99 "
           f"({dev['count']} entries) |", "",
           "| server | round | requests | p50 ms | p99 ms | device misses | p50 of hits / of misses ms |",
           "| --- | --- | --- | --- | --- | --- | --- |"]

    def ms(v):
        return f"{v:.1f}" if v is not None else "-"

    for x in r["rounds"]:
        out.append(f"| {x['adapters']} | {x['round']}{' (warm-up)' if x.get('warmup') else ''} | {x['requests']} | "
                   f"{x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['device_misses']} | {ms(x['hit_p50_ms'])} / {ms(x['miss_p50_ms'])} |")
    return out + [""]


def render_rule(r: dict) -> list[str]:
    """The sweep behind the engine's slot-form rule: own / fold time per (wavelet, width, J, r)."""
    cells = {}
    for x in r["results"]:
        cells.setdefault((x["wavelet"], x["width"]), {}).setdefault((x["levels"], x["rank"]), []).append(x)
    cols = sorted({c for row in cells.values() for c in row})
    out = [f"**Slot form** (`kernels_rule.json`, {_src(r, 'kernels_rule').split(', ', 1)[1]}): one adapter, own factors "
           "(`wara::wavelet_lowrank`) / its fold (the GEMM pair) on a (width, width) layer at 64 / 2048 tokens; "
           "**bold**: the rule (`runtime.selection.own_form_wins`) keeps own factors. "
           f"{r['disagreements']} cells where the rule and this run disagree beyond this VM's 10% noise.", "",
           "| wavelet | width | " + " | ".join(f"J={j} r={k}" for j, k in cols) + " |",
           "| --- | --- |" + " --- |" * len(cols)]
    for (wavelet, width), row in sorted(cells.items()):
        texts = []
        for c in cols:
            xs = sorted(row.get(c, []), key=lambda x: x["tokens"])
            t = " / ".join(f"{x['own_over_pair']:.2f}" for x in xs) or "-"
            texts.append(f"**{t}**" if xs and xs[0]["rule_says_own"] else t)
        out.append(f"| {wavelet} | {width} | " + " | ".join(texts) + " |")
    return out + [""]


def render_kernels(r: dict) -> list[str]:
    """The native ops against today's pure kernel, per layer shape, tokens and adapters."""
    rows = {}
    for x in r["results"]:
        rows.setdefault((x["layer"], x["tokens"], x["adapters"], x["folded_rank"]), {})[x["kernel"]] = x
    out = [f"**Native kernels** (`kernels.json`, {r['machine_label']}, commit {r.get('git_commit', '?')}): one adapted "
           f"layer, float32, matmul peak {r['matmul_peak_gflops']:.0f} GFLOP/s measured in the same run; speedup over "
           "`grouped_lora` (GFLOP/s); the wavelet op computes the same update from the unfolded factors "
           "(half the FLOPs):", "",
           "| layer | tokens | adapters | folded rank | sgmv native | wavelet_lowrank native | grouped_lora GFLOP/s |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for (layer, tokens, adapters, rank), k in sorted(rows.items()):
        if tokens not in (64, 2048) or "sgmv[native]" not in k or "grouped_lora" not in k:
            continue
        s, w, g = k["sgmv[native]"], k.get("wavelet_lowrank[native]"), k["grouped_lora"]
        wtxt = f"{w['speedup_vs_grouped_lora']:.2f}x ({w['gflops']:.0f})" if w else "-"
        out.append(f"| {layer} | {tokens} | {adapters} | {rank} | {s['speedup_vs_grouped_lora']:.2f}x ({s['gflops']:.0f}) | "
                   f"{wtxt} | {g['gflops']:.0f} |")
    return out + [""]


def render_grpc(results: Path) -> list[str]:
    rows = []
    for f in sorted(results.glob("grpc_overhead_*.json")):
        r = json.loads(f.read_text())
        g, p = r["results"]["grpc"], r["results"]["in_process"]
        rows.append(f"| {r['backend']} | {g['p50_ms']:.2f} | {g['p99_ms']:.2f} | {p['p50_ms']:.2f} | "
                    f"{r['results']['grpc_overhead_p50_ms']:.2f} | {r.get('git_commit', '?')} |")
    if not rows:
        return []
    return ["**gRPC overhead**: batch-1 MiniLM request through the server (text in, logits out), "
            f"{r['requests_each']} interleaved requests:", "",
            "| engine | gRPC p50 ms | gRPC p99 ms | in-process p50 ms | gRPC overhead p50 ms | commit |",
            "| --- | --- | --- | --- | --- | --- |", *rows, ""]


def render_quality(r: dict) -> list[str]:
    from benchmarks.quality import render_table

    sched = "; ".join(f"{t}: {s['epochs']} epochs" + (f", {s['max_length']} tokens" if s.get("max_length") else "")
                      for t, s in r["schedule"].items())
    times = [x["train_seconds_mean"] for x in r["results"]]
    return [f"**Quality at equal parameters** ({_src(r, 'quality')}): held-out accuracy, mean ± std over "
            f"{len(r['seeds'])} seeds; params = adapter factors per model (the task head, trained by every method, "
            f"not counted). Schedule: {sched}; lr 3e-3 (full fine-tuning {r['full_lr']:g}). Whole study "
            f"{r['wall_seconds'] / 60:.0f} min; one training run {min(times):.0f}-{max(times):.0f} s.", "",
            render_table(r), ""]


def render_targets(results: Path) -> list[str]:
    """Issue 5's targets next to what the result files say (and the peer measured with them)."""
    lat, mt, hs = _load(results, "latency"), _load(results, "multitenant"), _load(results, "hotswap")
    paired = _load(results, "paired")
    go_t, go_o = _load(results, "grpc_overhead_torch"), _load(results, "grpc_overhead_onnxruntime")
    out = ["**Against issue 5's and issue 13's targets** (figures from the result files below):", "", "| target | ours | peer, same run |", "| --- | --- | --- |"]
    if lat:
        rows = [x for x in lat["results"] if x["workload"] == "minilm" and x["seq"] == 64]

        def rr(eng: str, form: str, b: int) -> str:
            v = _ratio(rows, engine=eng, form=form, batch=b)
            return f"{v['ratio']:.2f}" if v else "-"

        for b, limit in ((32, 1.08), (1, 1.12)):
            out.append(f"| unmerged / base <= {limit} at B={b} (seq 64) | PyTorch {rr('torch', 'folded', b)}, "
                       f"onnxruntime {rr('onnxruntime', 'folded', b)} | peft LoRA {rr('torch', 'peft_lora', b)} |")
        for b, limit in ((32, 1.05), (1, 1.08)):
            out.append(f"| issue 13: served unmerged / base <= {limit} at B={b} (seq 64) | PyTorch fused "
                       f"{rr('torch', 'fused', b)}, folded {rr('torch', 'folded', b)}; onnxruntime "
                       f"{rr('onnxruntime', 'folded', b)} | peft LoRA {rr('torch', 'peft_lora', b)} |")
    if paired:
        for row in paired["results"]:
            sv, mg = row["served_over_base"], row["merged_over_base"]
            out.append(f"| issue 13, paired calls ({_src(paired, 'paired')}): served / base at B={row['batch']} "
                       f"(seq {row['seq']}) | median {sv['median']:.3f} (IQR {sv['q25']:.3f}-{sv['q75']:.3f}) of "
                       f"{row['turns']} turns | control merged / base {mg['median']:.3f}"
                       f"{'' if row['valid'] else ': noise'} |")
    if lat:
        out.append(f"| merged / base = 1.00 within noise (seq 64, B=1 / 32) | PyTorch {rr('torch', 'merged', 1)} / "
                   f"{rr('torch', 'merged', 32)}, onnxruntime {rr('onnxruntime', 'merged', 1)} / {rr('onnxruntime', 'merged', 32)} | |")
    if mt:
        k = max(x["adapters"] for x in mt["results"])
        ours, peft = _ratio(mt["results"], adapters=k, method="ours_torch"), _ratio(mt["results"], adapters=k, method="peft_mixed")
        ort = _ratio(mt["results"], adapters=k, method="ours_onnxruntime")
        out.append(f"| {k} distinct adapters <= 1.10x one adapter | PyTorch {ours['ratio_to_one_adapter']:.2f}x"
                   + (f", onnxruntime {ort['ratio_to_one_adapter']:.2f}x" if ort else "") + f" | peft {peft['ratio_to_one_adapter']:.2f}x |")
        folded = _ratio(mt["results"], adapters=k, method="ours_torch_folded")
        if folded:
            out.append(f"| issue 13: {k} distinct adapters <= 1.05x one adapter | PyTorch fused "
                       f"{ours['ratio_to_one_adapter']:.2f}x, folded (sgmv) {folded['ratio_to_one_adapter']:.2f}x"
                       + (f", onnxruntime {ort['ratio_to_one_adapter']:.2f}x" if ort else "") + " | |")
        out.append(f"| >= 1.3x faster than peft's mixed batch | PyTorch {ours['speedup_vs_peft_mixed']:.2f}x"
                   + (f", onnxruntime {ort['speedup_vs_peft_mixed']:.2f}x" if ort else "") + " | |")
    if hs:
        ip, pf = hs["results"]["in_process"], hs["results"].get("peft", {})
        out.append(f"| load -> servable (prepare + slot write) <= 5 ms p50 | {ip['load_to_servable']['p50_ms']:.1f} ms | "
                   + (f"peft load_adapter {pf['load_adapter']['p50_ms']:.1f} ms, hotswap_adapter {pf['hotswap_adapter']['p50_ms']:.1f} ms" if pf else "") + " |")
        g = hs["results"].get("grpc")
        if g:
            out.append(f"| first answer within one forward of that | gRPC load {g['load']['p50_ms']:.1f} ms, "
                       f"then first answer {g['first_answer']['p50_ms']:.1f} ms | |")
    if go_t and go_o:
        eager = go_t["results"]["in_process"]["p50_ms"]
        served = go_o["results"]["grpc"]["p50_ms"]
        out.append(f"| served batch-1 latency <= 0.75x torch eager | onnxruntime over gRPC {served:.1f} ms = "
                   f"{served / eager:.2f}x PyTorch eager in-process ({eager:.1f} ms) | |")
    for r in (go_t, go_o):
        if r:
            out.append(f"| gRPC p50 overhead < 1 ms (batch-1 MiniLM) | {r['backend']}: {r['results']['grpc_overhead_p50_ms']:.2f} ms | |")
    return out + [""]


def render(results: Path) -> str:
    """The docs/benchmarks.md section, from whatever result files exist."""
    lines = [START, "", "Generated by `make bench` from `benchmarks/results/*.json` (plots: the `.png` next to each).", ""]
    lines += render_targets(results)
    for name, fn in (("latency", render_latency), ("multitenant", render_multitenant), ("hotswap", render_hotswap)):
        r = _load(results, name)
        if r:
            lines += fn(r)
    for name in ("load_onnxruntime", "load_torch"):
        r = _load(results, name)
        if r:
            lines += render_load(r, name)
    lines += render_grpc(results)
    k = _load(results, "kernels")
    if k:
        lines += render_kernels(k)
    rule = _load(results, "kernels_rule")
    if rule:
        lines += render_rule(rule)
    q = _load(results, "quality")
    if q:
        lines += render_quality(q)
    lines.append(END)
    return "\n".join(lines)


def update_page(page: Path, section: str) -> None:
    """Replace the text between the markers in `page` with `section` (appended under a
    "## Benchmarks" heading where the page has no markers yet)."""
    text = page.read_text()
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n## Benchmarks\n\n" + section + "\n"
    page.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes into a temporary directory; docs/benchmarks.md untouched")
    p.add_argument("--report", action="store_true", help="only regenerate docs/benchmarks.md from existing results")
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS), help="run just these")
    args = p.parse_args(argv)
    if args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            run_all(Path(tmp), quick=True, only=args.only)
            print(render(Path(tmp)))
        return 0
    if not args.report:
        run_all(RESULTS, quick=False, only=args.only)
    update_page(BENCH_PAGE, render(RESULTS))
    print(f"{BENCH_PAGE} benchmark section regenerated from {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
