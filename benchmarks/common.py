"""What every benchmark result records: the machine, the versions, the git commit."""

from __future__ import annotations

import functools
import os
import platform
import random
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
                sync: Callable[[], None] = lambda: None, alternate: bool = False) -> dict[str, list[float]]:
    """Time every variant in turn, ``rounds`` times (A, B, C, A, B, C, ...), so drift on the
    machine hits all alike; a turn is ``iters`` calls of one variant (a hot loop, for kernels),
    or with ``alternate`` one call, ``iters`` turns a round (whole models: a slow second on this
    VM then falls on every variant, not on one variant's whole turn; each turn's order is
    shuffled (seeded), so no variant always follows the same one and inherits its cache
    footprint: in a fixed order the base always followed the last form). Returns each
    variant's per-round medians in ms."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync()
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    calls, turns = (1, iters) if alternate else (iters, 1)
    order, rng = list(variants), random.Random(0)
    for _ in range(rounds):
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(turns):
            if alternate:
                rng.shuffle(order)
            for name in order:
                fn = variants[name]
                for _ in range(calls):
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    times[name].append(time.perf_counter() - t0)
        for name in variants:
            per_round[name].append(statistics.median(times[name]) * 1e3)
    return per_round


CONTROL_RANGE = (0.97, 1.03)  # a merged form does the base's own work: a median ratio outside this is noise


def interleaved_controlled(variants: dict[str, Callable[[], object]], *, base: str, controls: list[str],
                           tries: int = 3, **kwargs) -> tuple[dict[str, list[float]], dict]:
    """`interleaved`, run again (up to ``tries`` attempts) while a control variant (a merged
    form, which does the base's own work) reads a median ratio to ``base`` outside
    `CONTROL_RANGE`: such a run measured the machine, not the forms. Keeps the attempt whose
    worst control lies nearest 1. Returns (times, check): check has ``valid`` (the kept
    attempt's controls all in range), ``attempts`` and ``control_ratios``."""
    best = None
    for attempt in range(1, max(1, tries) + 1):
        times = interleaved(variants, **kwargs)
        ratios = {c: statistics.median(times[c]) / statistics.median(times[base]) for c in controls}
        worst = max((abs(r - 1.0) for r in ratios.values()), default=0.0)
        valid = all(CONTROL_RANGE[0] <= r <= CONTROL_RANGE[1] for r in ratios.values())
        if best is None or worst < best[0]:
            best = (worst, times, {"valid": valid, "control_ratios": ratios})
        if valid:
            break
    _, times, check = best
    return times, {**check, "attempts": attempt}


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


DEFAULT_BASE = "minilm"


def add_base_option(parser) -> None:
    """``--base SOURCE``: the base the model workload runs on (a built-in name, hf:DIR[@TASK] or
    py:module:function)."""
    parser.add_argument("--base", default=DEFAULT_BASE, metavar="SOURCE",
                        help=f"base of the model workload: a built-in name, hf:DIR[@TASK] or py:module:function "
                             f"(default {DEFAULT_BASE})")


def add_dtype_option(parser) -> None:
    """``--dtype``: what the serving engines a benchmark builds compute in (`runtime.selection.engine_dtype`)."""
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"),
                        help="what the serving engines compute in (default float32; auto: bfloat16 where the "
                             "device has units for it)")


# The largest |difference| a benchmark's correctness check allows between two forms of one model
# (logits or embeddings of order 1), per the dtype the served forms compute in: bfloat16 keeps
# about 3 significant digits, rounded again at every layer.
CHECK_ATOL = {"float32": 1e-3, "bfloat16": 1e-1}


def check_atol(dtype) -> float:
    """`CHECK_ATOL` of a torch dtype or its name."""
    return CHECK_ATOL[str(dtype).removeprefix("torch.")]


def base_spec(source: str):
    """The `BaseSpec` of a base source (built-ins from their cached registry entry)."""
    from wara_train.bases import BUILTINS, get_base
    from wara_train.basespec import resolve_base

    return get_base(source) if source in BUILTINS else resolve_base(source)


def base_info(spec) -> dict:
    """What a result records about a base that is not the default."""
    return {"name": spec.name, "source": spec.source, "task": spec.task, "description": spec.description}


def seq_limit(spec) -> int | None:
    """The most sequence positions the base takes (its 2-D inputs' bound; None: no bound)."""
    bounds = [t.max_dims[1] for t in spec.inputs if len(t.shape) == 2 and t.max_dims and t.max_dims[1]]
    return min(bounds) if bounds else None


def plain_base(spec, *, num_labels: int = 5, seed: int = 0):
    """A fresh base with a seeded ``num_labels``-way head: the same model every call."""
    import torch

    torch.manual_seed(seed)
    return spec.build(num_labels)


def peft_peer(spec, n_adapters: int, *, rank: int, targets: list[str], device="cpu"):
    """The peer: the base (`plain_base`) wrapped by peft with ``n_adapters`` random LoRA adapters
    (a0, a1, ...) of rank ``rank`` (alpha 2·rank) on ``targets``, the layers WaRA adapts; B is
    random, not zero. Called positionally with the spec's inputs, like the base."""
    from peft import LoraConfig, get_peft_model

    base = plain_base(spec)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, cfg, adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", cfg)
    return model.to(device).eval()
