"""Benchmarks are not tests, but each must keep running: every one runs here once on tiny sizes
(`--quick`, a real subprocess as `make bench` would), its JSON is checked, and the
docs/benchmarks.md section is rendered from those very files (and the committed page from the
committed results)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

QUICK = {  # result name -> command
    "latency": ["benchmarks.latency"],
    "multitenant": ["benchmarks.multitenant"],
    "hotswap": ["benchmarks.hotswap"],
    "load_torch": ["benchmarks.load", "--backend", "torch"],
    "grpc_overhead_torch": ["benchmarks.grpc_overhead", "--backend", "torch"],
    "quality": ["benchmarks.quality"],
    "paired": ["benchmarks.paired"],
}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("results")
    for name, cmd in QUICK.items():
        proc = subprocess.run([sys.executable, "-m", *cmd, "--quick", "--out", str(results / f"{name}.json")],
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
    return results


def _load(results: Path, name: str) -> dict:
    report = json.loads((results / f"{name}.json").read_text())
    assert report["machine"]["cpus"] and report["versions"]["torch"] and report["git_commit"]
    return report


@pytest.mark.slow
def test_latency_verifies_every_form_and_reports_ratios(quick_results):
    r = _load(quick_results, "latency")
    rows = r["results"]
    forms = {(x["workload"].split(" ")[0], x["engine"], x["form"]) for x in rows}
    for eng in ("torch", "onnxruntime"):
        assert {("synthetic", eng, f) for f in ("base", "merged", "folded", "explicit")} <= forms
    assert {("minilm", "torch", f) for f in ("base", "merged", "folded", "fused", "explicit", "peft_lora")} <= forms
    assert {x["levels"] for x in rows if x["form"] == "explicit"} >= {1, 2}
    for x in rows:
        assert 0 < x["min_ms"] <= x["median_ms"] <= x["max_ms"] and x["ratio"] > 0
        assert x["flop_ratio"] >= 1.0
        assert x.get("max_abs_error", 0.0) <= 1e-3
    # More levels -> more wavelet work: the FLOP lower bound must grow with J.
    syn = {x["levels"]: x["flop_ratio"] for x in rows if x["workload"].startswith("synthetic")
           and x["engine"] == "torch" and x["form"] == "explicit"}
    assert syn[2] > syn[1]
    assert 0 < min(x["fraction_of_matmul_peak"] for x in rows if "fraction_of_matmul_peak" in x)
    # Each cell records its merged control (one attempt with --quick: rounds of one call are noise anyway).
    for x in rows:
        assert isinstance(x["valid"], bool)
        if x["form"] == "base":
            assert x["attempts"] == 1 and x["control_ratios"] and min(x["control_ratios"].values()) > 0
    assert r["tries"] == 1 and r["control_range"] == [0.97, 1.03]
    assert (quick_results / "latency.png").stat().st_size > 0


@pytest.mark.slow
def test_multitenant_compares_ours_peft_and_the_naive_loop(quick_results):
    r = _load(quick_results, "multitenant")
    methods = {x["method"] for x in r["results"]}
    assert methods == {"ours_torch", "ours_torch_folded", "peft_mixed", "naive_loop"}
    for x in r["results"]:
        assert x["median_ms"] > 0 and x["speedup_vs_peft_mixed"] > 0
        if x["adapters"] == 1:
            assert x["ratio_to_one_adapter"] == 1.0


@pytest.mark.slow
def test_hotswap_checks_every_step(quick_results):
    report = _load(quick_results, "hotswap")
    measured = {"in_process": {"prepare", "write_slot", "load_to_servable", "build_merged"},
                "grpc": {"load", "first_answer", "load_to_first_answer", "unload", "reload", "reload_first_answer",
                         "reload_to_first_answer"},
                "peft": {"load_adapter", "hotswap_adapter"}}
    assert {group: set(rows) for group, rows in report["results"].items()} == measured
    for rows in report["results"].values():
        assert all(0 < s["min_ms"] <= s["p50_ms"] <= s["max_ms"] for s in rows.values())
    verification = report["verification"]
    assert verification["passed"] and len(verification["max_abs_error"]) == 10
    assert all(err <= verification["atol"] for err in verification["max_abs_error"].values())


@pytest.mark.slow
def test_load_reports_every_target_of_the_ten_thousand_adapter_run(quick_results):
    r = _load(quick_results, "load_torch")
    assert {k: v["adapters"] for k, v in r["starts"].items()} == {"small": 4, "large": 12}
    assert all(v["tensors_read_at_start"] == 0 and v["ready_s"] > v["index_s"] >= 0 for v in r["starts"].values())
    assert [(x["round"], x["server"]) for x in r["rounds"]] == [(k, s) for k in (0, 1, 2) for s in ("small", "large")]
    assert [x["warmup"] for x in r["rounds"]] == [True, True, False, False, False, False]
    assert all(x["requests"] > 0 and x["p50_ms"] <= x["p99_ms"] for x in r["rounds"])
    assert r["cold"]["adapters"] == 3 and r["cold"]["cold_p50_ms"] > 0 and r["p50_ratio"] > 0
    assert r["device_entry_ms"]["count"] >= 3  # at least the cold adapters entered the pool
    assert r["memory"]["resident"]["large"]["device"] >= 1
    assert r["index_alone"]["adapters"] == 12 and 1 <= r["host_loads"]["adapters"] <= 3


@pytest.mark.slow
def test_quality_study_runs_every_method_at_equal_parameters(quick_results):
    r = _load(quick_results, "quality")
    got = {(x["task"], x["method"]) for x in r["results"]}
    adapters = ("wara-haar-j1", "wara-db2-j2", "lora-2r", "lora-r", "head-only")
    assert got == {(t, m) for t in ("minilm-topics", "minilm-langid", "effnet-digits") for m in adapters} | {("effnet-digits", "full")}
    for task in ("minilm-topics", "effnet-digits"):
        p = {x["method"]: x["adapter_params"] for x in r["results"] if x["task"] == task}
        assert p["wara-haar-j1"] == p["lora-2r"] == 2 * p["lora-r"]  # equal budgets, as the study claims
        assert 0.85 <= p["wara-db2-j2"] / p["wara-haar-j1"] <= 1.15
        assert p["head-only"] == 0
    for x in r["results"]:
        assert 0.0 <= x["accuracy_mean"] <= 1.0 and 0.0 <= x["macro_f1_mean"] <= 1.0
        assert x["train_seconds_mean"] > 0 and x["peak_rss_mb"] > 0
    assert (quick_results / "quality.png").stat().st_size > 0


@pytest.mark.slow
def test_paired_reports_served_and_the_merged_control_per_turn(quick_results):
    r = _load(quick_results, "paired")
    assert [row["batch"] for row in r["results"]] == [1, 2]
    for row in r["results"]:
        assert row["turns"] == 6 and row["slot_form"] == "own" and row["max_abs_error_vs_merged"] < 1e-3
        for key in ("served_over_base", "merged_over_base"):
            q = row[key]
            assert 0 < q["min"] <= q["q25"] <= q["median"] <= q["q75"] <= q["max"]
        assert row["valid"] == (0.97 <= row["merged_over_base"]["median"] <= 1.03)


def test_grpc_overhead_runs_quick(quick_results):
    r = _load(quick_results, "grpc_overhead_torch")["results"]
    assert r["grpc"]["p50_ms"] > 0 and r["in_process"]["p50_ms"] > 0


@pytest.mark.slow
def test_benchmarks_page_section_is_generated_from_the_json(quick_results, tmp_path):
    from benchmarks.run import END, START, render, update_page

    page = tmp_path / "benchmarks.md"
    page.write_text("# X\n\ntext\n")
    update_page(page, render(quick_results))
    first = page.read_text()
    assert START in first and END in first
    for heading in ("Against issue 5's and issue 13's targets", "Latency, merged vs unmerged", "Multi-tenant batch", "Hot-swap",
                    "adapters, torch engine", "gRPC overhead", "Quality at equal parameters"):
        assert heading in first, heading
    r = _load(quick_results, "grpc_overhead_torch")["results"]
    assert f"| torch | {r['grpc']['p50_ms']:.2f} |" in first  # the numbers come from the file
    update_page(page, render(quick_results))  # regenerating replaces the section, never appends
    assert page.read_text() == first


def test_committed_benchmarks_page_matches_the_committed_results():
    """docs/benchmarks.md's generated section (between the markers) is exactly what
    `benchmarks.run --report` renders from benchmarks/results/*.json: no table drifts from its
    JSON, and the tables live on that page, not in README."""
    from benchmarks.run import BENCH_PAGE, END, RESULTS, START, render

    root = Path(__file__).resolve().parents[1]
    text = (root / BENCH_PAGE).read_text()
    assert text.count(START) == 1 and text.count(END) == 1
    section = text[text.index(START):text.index(END) + len(END)]
    assert section == render(root / RESULTS)
    assert START not in (root / "README.md").read_text()


def test_wara_bench_names_the_valid_benchmarks():
    proc = subprocess.run([sys.executable, "-m", "wara", "bench", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr and "quality" in proc.stderr


@pytest.mark.slow
def test_latency_and_multitenant_run_on_a_user_base(tmp_path):
    """``--base hf:DIR``: the model workload runs on a tiny random BERT classifier (no model
    package), checked before it is timed, and the JSON names the base."""
    import tiny_models

    bert = tiny_models.make_bert_classifier(tmp_path / "tiny-bert")
    for name in ("latency", "multitenant"):
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--base", f"hf:{bert}", "--out", str(out)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
        report = _load(tmp_path, name)
        assert report["base"]["name"] == "tiny-bert" and report["base"]["task"] == "text-classification"
        assert report["base"]["source"] == f"hf:{bert.resolve()}@text-classification" and report["notes"] == []
        assert out.with_suffix(".png").stat().st_size > 0
    rows = [x for x in _load(tmp_path, "latency")["results"] if not x["workload"].startswith("synthetic")]
    assert {(x["workload"], x["form"]) for x in rows} == {("tiny-bert", f) for f in ("base", "merged", "folded", "fused", "explicit", "peft_lora")}
    for x in rows:
        assert 0 < x["min_ms"] <= x["median_ms"] <= x["max_ms"] and x["flop_ratio"] >= 1.0
        assert x.get("max_abs_error", 0.0) <= 1e-3
    # FLOPs counted from the model: 12 adapted (32x32 / 64x32 / 32x64) linears and 2 attention
    # layers of width 32, at batch 1 x seq 8.
    base = next(x for x in rows if x["form"] == "base")
    linear = 2 * 8 * 2 * (4 * 32 * 32 + 2 * 64 * 32)
    attention = 2 * 2 * (2 * 1 * 8 * 8 * 32)
    assert base["base_gflops"] == pytest.approx((linear + attention) / (base["median_ms"] * 1e6))
    methods = {(x["adapters"], x["method"]) for x in _load(tmp_path, "multitenant")["results"]}
    assert methods == {(k, m) for k in (1, 2) for m in ("ours_torch", "ours_torch_folded", "peft_mixed", "naive_loop")}


def test_random_base_is_a_complete_transformers_model(tmp_path):
    """What `make gpu-check` benchmarks on: a random BERT directory that resolves as an hf: base
    and tokenizes with its own vocabulary."""
    from benchmarks.random_base import write_random_bert
    from wara_train.basespec import resolve_base

    spec = resolve_base(f"hf:{write_random_bert(tmp_path / 'rb', shape='tiny')}")
    assert (spec.name, spec.task, spec.output) == ("rb", "feature-extraction", "embeddings")
    ids, mask = spec.preprocessor(max_length=8)(["w7 w8", "w9"])
    assert ids[0, :4].tolist() == [2, 7, 8, 3] and mask.sum() == 7


def test_gpu_check_exits_2_at_once_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: gpu_check would run")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_interleaved_alternation_shuffles_so_no_variant_always_follows_the_same():
    """Whole-model timing (``alternate``): one call of each variant a turn, each turn's order
    shuffled, so each variant follows each other one (not always the same predecessor's cache
    footprint); every variant gets one median per round."""
    from benchmarks.common import interleaved

    order: list[str] = []
    variants = {name: (lambda name=name: order.append(name)) for name in "abcd"}
    times = interleaved(variants, rounds=3, iters=4, warmup=0, alternate=True)
    assert {k: len(v) for k, v in times.items()} == {k: 3 for k in "abcd"}
    assert sorted(order) == sorted("abcd" * 12)
    before = {(order[i - 1], order[i]) for i in range(1, len(order))}
    assert {(p, n) for p in "abcd" for n in "abcd" if p != n} <= before
    hot: list[str] = []
    interleaved({name: (lambda name=name: hot.append(name)) for name in "ab"}, rounds=2, iters=3, warmup=0)
    assert "".join(hot) == "aaabbbaaabbb"  # hot loops keep their turns


def test_a_cell_whose_merged_control_reads_noise_is_timed_again(monkeypatch):
    """`interleaved_controlled` runs a cell again while a merged form's median / base leaves
    0.97-1.03 (up to ``tries``), keeps the attempt whose control lies nearest 1 and says whether
    it is valid. A fake clock makes each call's duration exact: the control costs 1.10x the base
    in the first attempt, 1.01x from the second; one that always costs 1.20x stays noise."""
    import benchmarks.common as common

    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    calls = {"n": 0}

    def cost(seconds: float):
        def run():
            clock[0] += seconds
        return run

    def drifting():  # 1.10 in the first attempt (its 4 calls), then 1.01
        calls["n"] += 1
        clock[0] += 1.10 if calls["n"] <= 4 else 1.01

    variants = {"base": cost(1.0), "merged": drifting, "form": cost(1.3)}
    times, check = common.interleaved_controlled(variants, base="base", controls=["merged"], tries=3, rounds=2,
                                                 iters=2, warmup=0, alternate=True)
    assert check["valid"] and check["attempts"] == 2
    assert check["control_ratios"]["merged"] == pytest.approx(1.01)
    assert [round(t) for t in times["form"]] == [1300, 1300]  # the kept attempt's per-round medians, ms
    variants["merged"] = cost(1.2)
    _, check = common.interleaved_controlled(variants, base="base", controls=["merged"], tries=3, rounds=2,
                                             iters=2, warmup=0, alternate=True)
    assert not check["valid"] and check["attempts"] == 3 and check["control_ratios"]["merged"] == pytest.approx(1.2)
    _, check = common.interleaved_controlled(variants, base="base", controls=["merged"], tries=1, rounds=1,
                                             iters=1, warmup=0, alternate=True)
    assert check["attempts"] == 1 and not check["valid"]
