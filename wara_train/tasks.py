"""Built-in training tasks: base model + offline data + defaults, and `train_task` which
trains one adapter end to end and writes the artifact; `train_on_base` does the same for any
base and the user's own data. Both run the one flow of `_inject_train_save`, except on bases
whose task has its own flow (`USER_FLOWS`: a causal LM trains on chat data)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data
from .artifact import save_adapter
from .basespec import BaseSpec, resolve_base
from .bases import MiniLMTokenizer, build_base, get_base
from .causal_lm import train_causal_lm
from .config import WaraConfig
from .errors import ConfigError
from .model import adaptable_layers, inject
from .trainer import TrainOptions, TrainResult, train


def _text_collate(max_length: int) -> Callable[[Sequence[str]], dict[str, torch.Tensor]]:
    return MiniLMTokenizer(max_length=max_length)


DIGITS_IMAGE_SIZE = 64


def digits_to_tensor(images: Sequence[Any], *, size: int = DIGITS_IMAGE_SIZE) -> torch.Tensor:
    """8x8 digit images (0..16) -> (B, 3, size, size) float32 in [-1, 1], the Lite models' range."""
    x = torch.stack([torch.as_tensor(i, dtype=torch.float32) for i in images])
    x = (x / 16.0 - 0.5) / 0.5
    x = F.interpolate(x.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous()


@dataclass(frozen=True)
class Task:
    name: str
    base: str
    load: Callable[[], tuple[list[Any], list[int], list[str]]]
    collate: Callable[[], Callable[[Sequence[Any]], Any]]
    epochs: int
    lr: float
    batch_size: int
    description: str
    test_fraction: float = 0.2


TASKS: dict[str, Task] = {
    "minilm-topics": Task(
        "minilm-topics", "minilm", data.chatterbot_topics, lambda: _text_collate(48),
        epochs=4, lr=3e-3, batch_size=32,
        description="chatterbot-corpus English: topic of an utterance (21 topics)",
    ),
    "minilm-langid": Task(
        "minilm-langid", "minilm", data.chatterbot_langid, lambda: _text_collate(48),
        epochs=3, lr=3e-3, batch_size=32,
        description=f"chatterbot-corpus: language of an utterance ({len(data.LANGID_LANGUAGES)} Latin-script languages)",
    ),
    "effnet-digits": Task(
        "effnet-digits", "effnet-lite0", data.digits, lambda: digits_to_tensor,
        epochs=3, lr=3e-3, batch_size=32,
        description="scikit-learn digits (8x8, upscaled to 64x64): which digit",
    ),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}: valid tasks are {', '.join(TASKS)}") from None


def prepare(task: Task, *, seed: int) -> tuple[list, list, list[str]]:
    examples, labels, names = task.load()
    tr, te = data.stratified_split(labels, test_fraction=task.test_fraction, seed=seed)
    return [(examples[i], labels[i]) for i in tr], [(examples[i], labels[i]) for i in te], names


def train_task(
    task_name: str,
    out: str | Path,
    *,
    rank: int = 4,
    alpha: float | None = None,
    wavelet: str = "haar",
    mode: str = "periodization",
    levels: int = 1,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train one adapter for a built-in task and write its artifact to ``out``.

    ``alpha`` defaults to ``2 · rank``. Returns the held-out accuracy before (base + fresh head)
    and after training."""
    task = get_task(task_name)
    recipe = get_base(task.base)
    # Validate every option before the (slow) model load.
    config = WaraConfig(
        rank=rank, alpha=float(alpha if alpha is not None else 2 * rank), wavelet=wavelet, mode=mode,
        levels=levels, target_modules=recipe.default_targets, modules_to_save=(recipe.head,),
    )
    options = TrainOptions(
        epochs=epochs or task.epochs, steps=steps, lr=lr or task.lr,
        batch_size=batch_size or task.batch_size, seed=seed, progress=progress,
    )
    t0 = time.perf_counter()
    train_set, eval_set, names = prepare(task, seed=seed)
    torch.manual_seed(seed)
    model = build_base(task.base, num_labels=len(names))
    return _inject_train_save(
        model, config, seed=seed, t0=t0, log=log,
        describe=lambda n: (f"task {task.name}: {task.description}; {len(train_set)} train / {len(eval_set)} held-out; "
                            f"WaRA {wavelet}/{mode} J={levels} r={rank} on {n} layers"),
        train_set=train_set, eval_set=eval_set, collate=task.collate, options=options,
        out=out, base_model=task.base, base_source=None, labels=names, extra={"task": task.name},
    )


def _inject_train_save(
    model: nn.Module,
    config: WaraConfig,
    *,
    seed: int,
    t0: float,
    log: Callable[[str], None],
    describe: Callable[[int], str],
    train_set: list,
    eval_set: list,
    collate: Callable[[], Callable[[Sequence[Any]], Any]],
    options: TrainOptions,
    out: str | Path,
    base_model: str,
    base_source: str | None,
    labels: Sequence[str],
    extra: dict[str, Any],
) -> TrainResult:
    """The one training flow: inject (seeded), log ``describe(number of adapted layers)``,
    train, save the artifact with ``extra`` plus the run's figures, log the result."""
    inject(model, config, seed=seed)
    log(describe(len(model.wara_config.target_modules)))
    result = train(model, train_set=train_set, eval_set=eval_set, collate=collate(), options=options)
    extra = {**extra, "seed": seed, "steps": result.steps,
             "heldout_accuracy": round(result.after.accuracy, 6), "heldout_macro_f1": round(result.after.macro_f1, 6)}
    save_adapter(model, out, base_model=base_model, base_source=base_source, labels=list(labels), extra=extra)
    log(f"held-out accuracy {result.after.accuracy:.3f} (macro-F1 {result.after.macro_f1:.3f}) "
        f"vs untrained {result.before.accuracy:.3f}; {result.steps} steps in {result.seconds:.1f}s, "
        f"{result.trainable_params:,} trainable parameters; total {time.perf_counter() - t0:.1f}s")
    log(f"adapter written to {out}")
    return result


# ------------------------------------------------------------------------------------------
# any base, the user's own data (wara train --base SOURCE --data PATH)

USER_DEFAULTS = {"epochs": 3, "lr": 3e-3, "batch_size": 16, "max_length": 128}
# Tasks whose adapters are not classifiers: their own data form, objective and report. Each is
# called as train_on_base is, with the resolved spec in place of the source.
USER_FLOWS: dict[str, Callable[..., TrainResult]] = {"text-generation": train_causal_lm}


def load_examples(path: str | Path, spec: BaseSpec, *, labels: Sequence[str] | None = None) -> tuple[list, list[int], list[str]]:
    """``--data``: a JSONL file of texts for text bases, an image folder for image bases."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--data {path}: no such file or directory")
    kind = "image" if p.is_dir() else "text"
    if spec.raw_input is None:
        raise ConfigError(f"base {spec.name!r} declares no preprocessing (raw_input), so it cannot read --data; "
                          "give its spec a text or image preprocessor")
    if kind != spec.raw_input:
        want = "an image folder ROOT/<label>/<file>.png" if spec.raw_input == "image" else "a JSONL file of {text, label} lines"
        raise ConfigError(f"--data {path}: base {spec.name!r} takes {spec.raw_input} input, so --data must be {want}")
    return data.load_image_folder(p, labels=labels) if kind == "image" else data.load_jsonl(p, labels=labels)


def train_on_base(
    source: str,
    data_path: str | Path,
    out: str | Path,
    *,
    eval_data: str | Path | None = None,
    base_name: str | None = None,
    rank: int = 4,
    alpha: float | None = None,
    wavelet: str = "haar",
    mode: str = "periodization",
    levels: int = 1,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    max_length: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train one adapter on any base (a built-in name, hf:PATH[@TASK], py:module:function) from
    the user's data, and write its artifact. The base's own head is trained on when the data's
    labels are exactly its labels; otherwise a fresh head. Without ``eval_data`` a seeded 20%
    stratified split is held out. A base whose task is in `USER_FLOWS` goes to that flow."""
    spec = resolve_base(source, name=base_name)
    if spec.task in USER_FLOWS:
        return USER_FLOWS[spec.task](
            spec, data_path, out, eval_data=eval_data, rank=rank, alpha=alpha, wavelet=wavelet, mode=mode,
            levels=levels, epochs=epochs, steps=steps, lr=lr, batch_size=batch_size, seed=seed, max_length=max_length,
            progress=progress, log=log)
    options = TrainOptions(epochs=epochs or USER_DEFAULTS["epochs"], steps=steps, lr=lr or USER_DEFAULTS["lr"],
                           batch_size=batch_size or USER_DEFAULTS["batch_size"], seed=seed, progress=progress)
    config = WaraConfig(rank=rank, alpha=float(alpha if alpha is not None else 2 * rank), wavelet=wavelet, mode=mode,
                        levels=levels)
    max_length = max_length or USER_DEFAULTS["max_length"]
    t0 = time.perf_counter()
    examples, labels, names = load_examples(data_path, spec)
    own_head = spec.labels is not None and sorted(spec.labels) == sorted(names)
    if own_head:  # the base's own classifier: its label order
        order = {n: i for i, n in enumerate(spec.labels)}
        labels = [order[names[y]] for y in labels]
        names = list(spec.labels)
    if eval_data is not None:
        eval_x, eval_y, _ = load_examples(eval_data, spec, labels=names)
        train_set, eval_set = list(zip(examples, labels)), list(zip(eval_x, eval_y))
    else:
        tr, te = data.stratified_split(labels, test_fraction=0.2, seed=seed)
        train_set, eval_set = [(examples[i], labels[i]) for i in tr], [(examples[i], labels[i]) for i in te]
    torch.manual_seed(seed)
    model = spec.build(None if own_head else len(names))
    targets = spec.default_targets or tuple(adaptable_layers(model, levels=levels, exclude=(spec.head,)))
    return _inject_train_save(
        model, config.replace(target_modules=targets, modules_to_save=(spec.head,)), seed=seed, t0=t0, log=log,
        describe=lambda n: (f"base {spec.name} ({spec.description or spec.source}); {len(train_set)} train / "
                            f"{len(eval_set)} held-out, {len(names)} labels ({'its own head' if own_head else 'a new head'}); "
                            f"WaRA {wavelet}/{mode} J={levels} r={rank} on {n} layers"),
        train_set=train_set, eval_set=eval_set, collate=lambda: spec.preprocessor(max_length=max_length),
        options=options, out=out, base_model=spec.name, base_source=spec.source, labels=names,
        extra={"data": Path(data_path).name},
    )
