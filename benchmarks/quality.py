"""Quality study: WaRA versus LoRA at equal trainable parameters, on the three offline tasks.

Methods (every one trains the same fresh task head, with the same data split, order, schedule
and learning rate for a given seed):

- ``wara-haar-j1``  WaRA rank r, haar, J=1: 2r(m+n) factors per (m, n) layer
- ``wara-db2-j2``   WaRA db2, J=2, with the rank whose count is closest to that budget
- ``lora-2r``       peft LoRA rank 2r: 2r(m+n), the same count as ``wara-haar-j1``
- ``lora-r``        peft LoRA rank r: half the budget
- ``head-only``     only the task head is trained
- ``full``          every weight trained (EfficientNet only: it is the one that fits the time)

Each (task, method) runs in a fresh process so its peak resident memory is its own.

    .venv/bin/python -m benchmarks.quality             # the study (about 45 min on 2 cores)
    .venv/bin/python -m benchmarks.quality --quick     # a tiny configuration (used by the tests)
    wara bench quality ...                             # the same
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.common import environment, figure, save_figure

RANK = 4  # r: the WaRA rank of the reference method
METHODS = ("wara-haar-j1", "wara-db2-j2", "lora-2r", "lora-r", "head-only", "full")
# "full" fine-tunes all of MiniLM's 22M weights too slowly for the time box; EfficientNet-Lite0 fits.
FULL_TASKS = ("effnet-digits",)
FULL_LR = 3e-4  # full fine-tuning diverges at the adapters' 3e-3; the one schedule change


@dataclass(frozen=True)
class Schedule:
    """What the study trains with, per task (the same for every method)."""

    epochs: int
    max_length: int | None = None  # text tasks: tokens per example
    train_limit: int | None = None  # use only the first N training examples (quick runs)
    eval_limit: int | None = None
    steps: int | None = None


# Chosen so the whole study (6 methods x 3 tasks x 3 seeds) fits in 60 minutes on 2 cores.
FULL_SCHEDULE = {
    "minilm-topics": Schedule(epochs=3, max_length=32),
    "minilm-langid": Schedule(epochs=2, max_length=32),
    "effnet-digits": Schedule(epochs=3),
}
QUICK_SCHEDULE = {
    "minilm-topics": Schedule(epochs=1, max_length=16, train_limit=48, eval_limit=48, steps=2),
    "minilm-langid": Schedule(epochs=1, max_length=16, train_limit=48, eval_limit=48, steps=2),
    "effnet-digits": Schedule(epochs=1, train_limit=48, eval_limit=48, steps=2),
}


def db2_rank_for_budget(dims: list[tuple[int, int]], rank: int = RANK) -> int:
    """The WaRA db2 J=2 rank whose total factor count is closest to WaRA J=1 rank ``rank``."""
    from wara_train.config import wara_param_count

    budget = sum(wara_param_count(m, n, rank=rank, levels=1) for m, n in dims)
    return min(range(1, 4 * rank), key=lambda r: abs(sum(wara_param_count(m, n, rank=r, levels=2) for m, n in dims) - budget))


def build(method: str, task_name: str, num_labels: int, seed: int):
    """The base model of ``task_name`` prepared for ``method``; returns (model, description)."""
    import torch

    from wara_train.bases import build_base, get_base
    from wara_train.config import WaraConfig
    from wara_train.model import base_weights, find_targets, inject
    from wara_train.tasks import get_task

    task = get_task(task_name)
    recipe = get_base(task.base)
    torch.manual_seed(seed)
    model = build_base(task.base, num_labels=num_labels)
    targets = find_targets(model, recipe.default_targets)
    head = model.get_submodule(recipe.head)
    if method.startswith("wara-"):
        if method == "wara-haar-j1":
            wavelet, levels, rank = "haar", 1, RANK
        else:
            dims = [tuple(w.shape) for w in base_weights(model, targets).values()]
            wavelet, levels, rank = "db2", 2, db2_rank_for_budget(dims)
        cfg = WaraConfig(rank=rank, alpha=2.0 * rank, wavelet=wavelet, levels=levels,
                         target_modules=tuple(targets), modules_to_save=(recipe.head,))
        inject(model, cfg, seed=seed)
        return model, f"WaRA {wavelet} J={levels} r={rank}, alpha=2r"
    for p in model.parameters():
        p.requires_grad_(method == "full")
    if method.startswith("lora-"):
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as e:
            raise SystemExit(f"the LoRA methods need peft: pip install 'wara-serve[bench]' ({e})") from None
        rank = 2 * RANK if method == "lora-2r" else RANK
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets), model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        desc = f"peft LoRA r={rank}, alpha=2r"
    else:
        desc = {"head-only": "task head only", "full": f"all weights, lr {FULL_LR:g}"}[method]
    for p in head.parameters():
        p.requires_grad_(True)
    return model, desc


def run_group(task_name: str, method: str, seeds: list[int], schedule: Schedule) -> dict:
    """Train ``method`` on ``task_name`` once per seed (in this process); one result dict."""
    from wara_train.bases import MiniLMTokenizer, get_base
    from wara_train.tasks import get_task, prepare
    from wara_train.trainer import TrainOptions, train

    task = get_task(task_name)
    head_name = get_base(task.base).head
    collate = MiniLMTokenizer(max_length=schedule.max_length) if schedule.max_length else task.collate()
    runs = []
    for seed in seeds:
        train_set, eval_set, names = prepare(task, seed=seed)
        train_set, eval_set = train_set[: schedule.train_limit], eval_set[: schedule.eval_limit]
        model, desc = build(method, task_name, len(names), seed)
        head_params = sum(p.numel() for p in model.get_submodule(head_name).parameters())
        options = TrainOptions(epochs=schedule.epochs, steps=schedule.steps, batch_size=task.batch_size,
                               lr=FULL_LR if method == "full" else task.lr, seed=seed, progress=False)
        result = train(model, train_set=train_set, eval_set=eval_set, collate=collate, options=options)
        runs.append({"seed": seed, "accuracy": result.after.accuracy, "macro_f1": result.after.macro_f1,
                     "train_seconds": result.seconds, "steps": result.steps, "final_loss": result.history[-1],
                     "trainable_params": result.trainable_params,
                     "adapter_params": result.trainable_params - head_params})
        print(f"  {task_name:14s} {method:13s} seed {seed}: accuracy {result.after.accuracy:.3f} "
              f"macro-F1 {result.after.macro_f1:.3f} ({result.seconds:.0f} s)", flush=True)
    acc = [r["accuracy"] for r in runs]
    f1 = [r["macro_f1"] for r in runs]
    return {
        "task": task_name, "method": method, "description": desc, "runs": runs,
        "accuracy_mean": statistics.mean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "macro_f1_mean": statistics.mean(f1), "macro_f1_std": statistics.stdev(f1) if len(f1) > 1 else 0.0,
        "adapter_params": runs[0]["adapter_params"], "trainable_params": runs[0]["trainable_params"],
        "train_seconds_mean": statistics.mean(r["train_seconds"] for r in runs),
        # Linux reports ru_maxrss in KiB: the peak of this whole process (model, data, training).
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_size": len(train_set), "eval_size": len(eval_set),
    }


def study(tasks: list[str], methods: list[str], seeds: list[int], schedules: dict[str, Schedule], *, isolate: bool) -> list[dict]:
    groups = [(t, m) for t in tasks for m in methods if m != "full" or t in FULL_TASKS]
    results = []
    for task_name, method in groups:
        if isolate:  # a fresh process per group: its peak memory is its own
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                results.append(pool.submit(run_group, task_name, method, seeds, schedules[task_name]).result())
        else:
            results.append(run_group(task_name, method, seeds, schedules[task_name]))
    return results


def plot(report: dict, path: Path) -> None:
    rows = report["results"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = figure(figsize=(9, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs, ys, es = [], [], []
        for j, task in enumerate(tasks):
            hit = [r for r in rows if r["task"] == task and r["method"] == method]
            if hit:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(hit[0]["accuracy_mean"] * 100)
                es.append(hit[0]["accuracy_std"] * 100)
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=method)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("held-out accuracy, % (mean ± std over seeds)")
    ax.set_title(f"WaRA vs LoRA at equal parameters ({len(report['seeds'])} seeds, {report['machine']['cpus']}-CPU machine)")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from wara_train.tasks import TASKS

    p = argparse.ArgumentParser(prog="wara bench quality", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny data and 2 steps per run, in one process (a test)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per (task, method) (default 3; 1 with --quick)")
    p.add_argument("--task", action="append", choices=sorted(TASKS), help="only these tasks (repeatable)")
    p.add_argument("--method", action="append", choices=METHODS, help="only these methods (repeatable)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    args = p.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds must be >= 1")
    tasks = args.task or list(FULL_SCHEDULE)
    methods = args.method or list(METHODS)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    schedules = QUICK_SCHEDULE if args.quick else FULL_SCHEDULE
    env = environment()  # the commit the study starts from (it runs for up to an hour)
    t0 = time.perf_counter()
    results = study(tasks, methods, seeds, schedules, isolate=not args.quick)
    report = {
        "benchmark": "quality", **env, "rank": RANK, "seeds": seeds, "quick": args.quick,
        "schedule": {t: asdict(schedules[t]) for t in tasks}, "full_lr": FULL_LR,
        "isolated_processes": not args.quick, "wall_seconds": time.perf_counter() - t0, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(render_table(report))
    print(f"{len(results)} groups in {report['wall_seconds'] / 60:.1f} min -> {args.out} and {args.out.with_suffix('.png')}")
    return 0


def render_table(report: dict[str, Any]) -> str:
    """method x task: accuracy (and macro-F1 on topics) mean ± std, adapter parameters."""
    rows = report["results"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = "| method | " + " | ".join(f"{t} acc % | params" for t in tasks) + " |"
    lines = [head, "| --- |" + " --- | --- |" * len(tasks)]
    for m in methods:
        cells = []
        for t in tasks:
            hit = [r for r in rows if r["task"] == t and r["method"] == m]
            if not hit:
                cells += ["-", "-"]
                continue
            r = hit[0]
            cell = f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f}"
            if t == "minilm-topics":
                cell += f" (F1 {100 * r['macro_f1_mean']:.1f} ± {100 * r['macro_f1_std']:.1f})"
            cells += [cell, f"{r['adapter_params']:,}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
