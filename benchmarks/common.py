"""What every benchmark result records: the machine, the versions, the git commit."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import subprocess
import time
from importlib import metadata
from typing import Callable


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """Machine, versions and git commit, read once per process: a benchmark calls it when it
    starts, so a commit made while it runs is not recorded as the one it measured."""
    versions = {}
    for pkg in ("torch", "onnxruntime", "onnx", "grpcio", "peft", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    import torch

    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "cpus_used": len(os.sched_getaffinity(0)),
                    "torch_threads": torch.get_num_threads()},
        "versions": versions,
        "git_commit": git_commit(),
    }


def interleaved(variants: dict[str, Callable[[], object]], *, rounds: int, iters: int, warmup: int = 2,
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Time every variant in turn, ``rounds`` times (A, B, C, A, B, C, ...), so drift on the
    machine hits all alike. Returns each variant's per-round medians in ms."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync()
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            per_round[name].append(statistics.median(times) * 1e3)
    return per_round


def summary(ms: list[float], reference: list[float] | None = None) -> dict:
    """Median and min-max of per-round medians; with ``reference``, the ratio of the medians."""
    out = {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}
    if reference is not None:
        out["ratio"] = statistics.median(ms) / statistics.median(reference)
    return out


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def write_json(path, report: dict) -> None:
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def figure(*args, **kwargs):
    """``plt.subplots`` on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def peft_minilm(n_adapters: int, *, rank: int, device="cpu"):
    """The peer: MiniLM wrapped by peft with ``n_adapters`` random LoRA adapters (a0, a1, ...)
    of rank ``rank`` (alpha 2·rank) on the same layers WaRA adapts; B is random, not zero."""
    import torch
    from peft import LoraConfig, get_peft_model

    from wara_train.bases import build_base, get_base
    from wara_train.model import find_targets

    torch.manual_seed(0)
    base = build_base("minilm", num_labels=5)
    targets = find_targets(base, get_base("minilm").default_targets)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, cfg, adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", cfg)
    return model.to(device).eval()
