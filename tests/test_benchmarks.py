"""Benchmarks are not tests, but each must keep running: a tiny size here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_onnx_forms_benchmark_runs_quick(tmp_path):
    out = tmp_path / "onnx_forms.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.onnx_forms", "--quick", "--base", "effnet-lite0",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {r["form"] for r in report["results"]} == {"base", "merged", "unmerged", "multi"}
    assert all(err <= 1e-4 for err in report["verified_max_abs_error"].values())
    assert all(r["median_ms"] > 0 for r in report["results"])


@pytest.mark.slow
def test_grpc_overhead_benchmark_runs_quick(tmp_path):
    out = tmp_path / "grpc.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.grpc_overhead", "--quick", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())["results"]
    assert r["grpc"]["p50_ms"] > 0 and r["in_process"]["p50_ms"] > 0


def test_readme_section_is_generated_from_the_json(tmp_path):
    from benchmarks.run import END, START, render, update_readme

    results = tmp_path / "results"
    results.mkdir()
    (results / "grpc_overhead_torch.json").write_text(json.dumps({
        "backend": "torch", "requests_each": 10, "git_commit": "abc1234",
        "results": {"grpc": {"p50_ms": 5.0, "p99_ms": 9.0}, "in_process": {"p50_ms": 4.25},
                    "grpc_overhead_p50_ms": 0.75}}))
    readme = tmp_path / "README.md"
    readme.write_text("# X\n\ntext\n")
    update_readme(readme, render(results))
    first = readme.read_text()
    assert START in first and END in first and "| torch | 5.00 | 9.00 | 4.25 | 0.75 | abc1234 |" in first
    update_readme(readme, render(results))  # regenerating replaces the section, never appends
    assert readme.read_text() == first
