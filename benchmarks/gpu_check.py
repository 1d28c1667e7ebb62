"""`make gpu-check`: on a machine with an NVIDIA GPU, run the CUDA tests and the GPU benchmarks
and record the outcome in benchmarks/results/gpu/<device-slug>/gpu_check.json.

    .venv/bin/python -m benchmarks.gpu_check [--budget-s 420] [--base SOURCE]

Steps: the native op library built on this machine (``python -m runtime.native.build --check``:
CMake + Ninja with its CUDA kernels, well under a minute; a native build made elsewhere against
another torch would not load), ``pytest -m cuda -q`` (its tests build their own tiny random
models; tests/test_native.py checks the CUDA and Triton kernels against CPU float64 references),
then each module in
BENCHMARKS with ``--device cuda --base SOURCE --out
benchmarks/results/gpu/<device-slug>/<name>.json`` (in a child process, so the budget can stop
it). No model package is needed: without ``--base``, the base is a random BERT of MiniLM's
shapes written to a temporary directory (`benchmarks.random_base`), so only transformers and
peft must be installed. A step that would start after ``--budget-s`` seconds is recorded as
skipped for time; a benchmark module that does not exist is recorded as missing. The JSON is
rewritten after every step, so a run killed from outside still leaves what it did. Exit codes: 2
at once where torch sees no CUDA device, 1 if a step failed or timed out, else 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from .common import environment

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path("benchmarks/results/gpu")  # relative to ROOT, as the benchmarks' --out
BENCHMARKS: dict[str, str] = {"latency": "benchmarks.latency", "multitenant": "benchmarks.multitenant",
                              "kernels": "benchmarks.kernels"}
NATIVE_BUILD_TIMEOUT_S = 240.0
# Runs a benchmark's main(argv) in a child: python -c CALL MODULE ARGS...
CALL = "import importlib, sys; sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2:]))"
RANDOM_BASE_SHAPE = "minilm"  # the built base has MiniLM's shapes: GPU figures of the same workload
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b")


def slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': lowercase, each run of non-alphanumerics one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def no_cuda_reason() -> str | None:
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device "
                "(no driver, or CUDA_VISIBLE_DEVICES hides it)")
    return None


def device_info() -> dict[str, Any]:
    import torch

    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "float32_matmul_precision": torch.get_float32_matmul_precision()}


def onnxruntime_info() -> dict[str, Any]:
    """Which onnxruntime build is there and whether it can run on CUDA (either is fine here)."""
    info: dict[str, Any] = {}
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        import onnxruntime as ort

        info["providers"] = ort.get_available_providers()
    except Exception as e:  # not installed, or a GPU build whose libraries fail to load
        info["error"] = f"{type(e).__name__}: {e}"
    info["cuda_provider"] = "CUDAExecutionProvider" in info.get("providers", [])
    return info


def run_step(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run a child in the repo root (its own process group, killed whole at the timeout), echo
    its output, and return status, exit code, wall time and the output's tail."""
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
            code: int | None = proc.returncode
            status = "passed" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, code, status = proc.communicate()[0], None, "timeout"
        except BaseException:  # Ctrl-C: take the child's whole group down too
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    print(out, end="" if out.endswith("\n") or not out else "\n", flush=True)
    return {"status": status, "returncode": code, "wall_s": round(time.perf_counter() - t0, 2),
            "output_tail": out[-3000:]}


def pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's closing line ('3 passed, 1 skipped, 120 deselected in 9.1s')."""
    for line in reversed(output.splitlines()):
        found = COUNT.findall(line)
        if found and " in " in line:
            return {("errors" if k.startswith("error") else k): int(n) for n, k in found}
    return {}


def prepare_base(source: str | None, tmp: Path) -> dict[str, Any]:
    """The benchmarks' base: ``source`` as given, else a random BERT of MiniLM's shapes built
    into ``tmp`` (no model package needed). Returns the step's record, with ``source`` to pass
    on as ``--base`` when it passed."""
    if source is not None:
        return {"status": "passed", "source": source, "built": False}
    t0 = time.perf_counter()
    try:
        from .random_base import write_random_bert

        path = write_random_bert(tmp / f"random-bert-{RANDOM_BASE_SHAPE}", shape=RANDOM_BASE_SHAPE)
    except Exception as e:  # transformers missing or broken: the benchmarks cannot run, the report says why
        return {"status": "failed", "reason": f"building the random base failed: {type(e).__name__}: {e}",
                "wall_s": round(time.perf_counter() - t0, 2)}
    print(f"== base: random BERT ({RANDOM_BASE_SHAPE} shapes) in {path}", flush=True)
    return {"status": "passed", "source": f"hf:{path}", "built": True, "shape": RANDOM_BASE_SHAPE,
            "description": f"random-initialised BERT of {RANDOM_BASE_SHAPE!r} shapes (benchmarks.random_base)",
            "wall_s": round(time.perf_counter() - t0, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget; later steps are skipped")
    p.add_argument("--base", metavar="SOURCE", default=None,
                   help="base of the benchmarks' model workload (a built-in name, hf:DIR[@TASK], py:module:function; "
                        f"default: a random BERT of MiniLM's shapes, {RANDOM_BASE_SHAPE!r} in benchmarks.random_base)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    reason = no_cuda_reason()
    if reason:
        print(f"gpu-check: no CUDA device: {reason}. Run it on a machine with an NVIDIA GPU and a CUDA build "
              "of torch.", file=sys.stderr)
        return 2
    dev = device_info()
    print(f"gpu-check on {dev['name']} (compute {dev['capability']}, {dev['memory_gib']} GiB; "
          f"torch {dev['torch']}, CUDA {dev['torch_cuda']}), budget {args.budget_s:.0f} s", flush=True)
    out_dir = RESULTS / slug(dev["name"])
    (ROOT / out_dir).mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": dev["name"], "torch_cuda": dev["torch_cuda"], "device_info": dev,
                              "onnxruntime": onnxruntime_info(), **environment(), "budget_s": args.budget_s,
                              "native_build": {"status": "pending"}, "tests": {"status": "pending"}, "benchmarks": {}}

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    def save() -> None:
        report["wall_s"] = round(time.perf_counter() - start, 2)
        (ROOT / out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")

    skipped = {"status": "skipped", "reason": f"out of time (budget {args.budget_s:.0f} s)"}
    print("== python -m runtime.native.build --check", flush=True)
    if left() > 0:  # a failed build is recorded and the CUDA tests then say which kernels it lacks
        report["native_build"] = run_step([sys.executable, "-m", "runtime.native.build", "--check"],
                                          min(left(), NATIVE_BUILD_TIMEOUT_S))
    else:
        report["native_build"] = dict(skipped)
    save()
    print("== pytest -m cuda -q", flush=True)
    if left() > 0:
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "--continue-on-collection-errors"]
        tests = run_step(cmd, left())
        tests["counts"] = pytest_counts(tests["output_tail"])
        if tests["status"] == "passed" and not tests["counts"].get("passed"):
            tests.update(status="failed", reason="no CUDA test passed (all skipped, or none collected)")
        report["tests"] = tests
    else:
        report["tests"] = dict(skipped)
    save()
    with tempfile.TemporaryDirectory(prefix="wara-gpu-base-") as tmp:
        report["base"] = base = prepare_base(args.base, Path(tmp))
        save()
        for name, module in BENCHMARKS.items():
            print(f"== {module} --device cuda --base {base.get('source', '?')}", flush=True)
            if left() <= 0:
                report["benchmarks"][name] = dict(skipped)
            elif importlib.util.find_spec(module) is None:
                report["benchmarks"][name] = {"status": "missing", "reason": f"no module {module} (not written yet?)"}
            elif base["status"] != "passed":
                report["benchmarks"][name] = {"status": "failed", "reason": f"no base to run on: {base['reason']}"}
            else:
                out = out_dir / f"{name}.json"
                step = run_step([sys.executable, "-c", CALL, module, "--device", "cuda", "--base", base["source"],
                                 "--out", str(out)], left())
                report["benchmarks"][name] = {**step, "out": str(out)}
            save()
    steps = {"native build": report["native_build"], "tests": report["tests"], "base": report["base"],
             **{f"bench {k}": v for k, v in report["benchmarks"].items()}}
    report["ok"] = all(s["status"] not in ("failed", "timeout") for s in steps.values())
    save()
    print(f"\n== gpu-check summary ({dev['name']}, {report['wall_s']:.0f} s of {args.budget_s:.0f}):")
    for k, s in steps.items():
        extra = s.get("reason") or ", ".join(f"{n} {c}" for c, n in s.get("counts", {}).items())
        wall = f" in {s['wall_s']:.1f} s" if "wall_s" in s else ""
        print(f"  {k}: {s['status']}{wall}" + (f" ({extra})" if extra else ""))
    ort = report["onnxruntime"]
    print(f"  onnxruntime CUDA provider: {'yes' if ort['cuda_provider'] else 'no'} "
          f"({', '.join(f'{d} {v}' for d, v in ort.items() if d.startswith('onnxruntime')) or 'not installed'})")
    print(f"  written: {out_dir / 'gpu_check.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
