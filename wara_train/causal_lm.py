"""WaRA adapters for causal LMs (``text-generation`` bases), trained on chat data.

* `CompletionLoss`: the trainer's objective. Next-token cross-entropy on completion tokens only,
  ``loss = Σ_t CE(logits[t-1], ids[t]) / #completion tokens`` (prompt and padding labelled
  `chat.IGNORE`); a held-out set is scored by that loss and its perplexity ``exp(loss)``.
* `greedy`: greedy continuations through the transformers model's own ``generate``.
* `train_causal_lm`: the flow behind ``wara train --base hf:DIR[@text-generation] --data
  chat.jsonl``: the held-out loss of the untrained adapter (the base plus a zero delta) and of the
  trained one, and a few greedy samples of both, printed and kept in the artifact's ``extra``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import chat
from .artifact import save_adapter
from .config import WaraConfig
from .errors import ConfigError
from .model import adaptable_layers, inject, set_path
from .spec import BaseSpec
from .trainer import TrainOptions, TrainResult, train

# Defaults sized for a ~100M-parameter model on two CPU cores: short sequences, small batches.
LM_DEFAULTS = {"epochs": 2, "lr": 2e-3, "batch_size": 8, "max_length": 256}
HELDOUT_FRACTION = 0.1
SAMPLES = 3  # held-out prompts answered greedily before and after training
SAMPLE_TOKENS = 32


@dataclass
class LMEval:
    loss: float  # mean next-token cross-entropy over the completion tokens (nats)
    perplexity: float  # exp(loss)
    tokens: int  # completion tokens scored
    n: int  # examples


def collate(examples: Sequence[chat.ChatExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``, each (B, longest)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, chat.IGNORE)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels())
    return ids, mask, labels


def completion_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(Σ CE, count)`` of next-token prediction: position t-1's logits against label t, over
    the labels that are not `chat.IGNORE` (float32 math)."""
    shifted = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted,
                            ignore_index=chat.IGNORE, reduction="sum")
    return total, int((shifted != chat.IGNORE).sum())


@dataclass(frozen=True)
class CompletionLoss:
    """The causal-LM objective (module docstring); the model is called as the spec's served
    module, ``model(input_ids, attention_mask) -> logits``."""

    pad_id: int

    def loss(self, model: nn.Module, batch: Sequence[chat.ChatExample]) -> torch.Tensor:
        ids, mask, labels = collate(batch, self.pad_id)
        total, count = completion_nll(model(ids, mask), labels)
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Sequence[chat.ChatExample], *, batch_size: int) -> LMEval:
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(dataset), batch_size):
            ids, mask, labels = collate(dataset[i : i + batch_size], self.pad_id)
            s, n = completion_nll(model(ids, mask), labels)
            total, count = total + float(s), count + n
        model.train(was_training)
        loss = total / max(count, 1)
        return LMEval(loss, math.exp(min(loss, 700.0)), count, len(dataset))


def transformers_model(model: nn.Module, spec: BaseSpec) -> nn.Module:
    """The transformers causal LM inside the spec's served module (what has ``generate``)."""
    if spec.hf is None:
        raise ConfigError(f"base {spec.name!r}: text generation needs a transformers causal LM (an hf: base)")
    return model.get_submodule(spec.hf.prefix) if spec.hf.prefix else model


@torch.no_grad()
def greedy(model: nn.Module, spec: BaseSpec, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           pad_id: int) -> list[list[int]]:
    """The new token ids of a greedy ``generate`` for each prompt, one at a time (no padding),
    at most up to the model's context. WaRA layers run merged (built once, exactly ``W0`` for a
    zero delta)."""
    lm = transformers_model(model, spec)
    set_path(model, "merged")
    dims = spec.inputs[0].max_dims
    context = dims[-1] if dims and dims[-1] else None
    out = []
    for p in prompts:
        room = max_new_tokens if context is None else min(max_new_tokens, context - len(p))
        if room < 1:
            out.append([])
            continue
        ids = torch.tensor([list(p)], dtype=torch.long)
        gen = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=room, pad_token_id=pad_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def train_causal_lm(
    spec: BaseSpec,
    data_path: str | Path,
    out: str | Path,
    *,
    eval_data: str | Path | None = None,
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
    samples: int = SAMPLES,
    sample_tokens: int = SAMPLE_TOKENS,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train one adapter on a causal-LM base from a chat JSONL file (`wara_train.chat`) and
    write its artifact to ``out``. Without ``eval_data`` a seeded 10% of the lines is held out.
    The artifact's ``extra`` keeps the held-out loss and perplexity of the untrained and the
    trained adapter and the greedy samples."""
    bs = batch_size or LM_DEFAULTS["batch_size"]
    options = TrainOptions(epochs=epochs or LM_DEFAULTS["epochs"], steps=steps, lr=lr or LM_DEFAULTS["lr"],
                           batch_size=bs, eval_batch_size=bs, seed=seed, progress=progress)
    config = WaraConfig(rank=rank, alpha=float(alpha if alpha is not None else 2 * rank), wavelet=wavelet, mode=mode,
                        levels=levels)
    t0 = time.perf_counter()
    pre = spec.preprocessor(max_length=max_length or LM_DEFAULTS["max_length"]) if spec.preprocessor else None
    tokenizer = getattr(pre, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(f"base {spec.name!r} has no tokenizer to read chat data with")
    max_length = int(pre.max_length)  # clamped to the model's positions
    examples, report = chat.tokenize(chat.read_chat_jsonl(data_path), tokenizer, max_length=max_length,
                                     source=str(data_path))
    if eval_data is not None:
        held, held_report = chat.tokenize(chat.read_chat_jsonl(eval_data), tokenizer, max_length=max_length,
                                          source=str(eval_data))
        train_set, eval_set = examples, held
        if held_report.describe(max_length):
            log(f"{eval_data}: {held_report.describe(max_length)}")
    else:
        train_set, eval_set = chat.split(examples, fraction=HELDOUT_FRACTION, seed=seed)
    if report.describe(max_length):
        log(f"{data_path}: {report.describe(max_length)}")
    torch.manual_seed(seed)
    model = spec.build(None)
    targets = spec.default_targets or tuple(adaptable_layers(model, levels=levels, exclude=(spec.head,)))
    inject(model, config.replace(target_modules=targets), seed=seed)
    log(f"base {spec.name} ({spec.description or spec.source}); {len(train_set)} train / {len(eval_set)} held-out "
        f"examples, loss on completion tokens; WaRA {wavelet}/{mode} J={levels} r={rank} on "
        f"{len(model.wara_config.target_modules)} layers")
    pad_id = int(tokenizer.pad_token_id)
    prompts = [e.prompt_ids for e in eval_set[:samples]]
    before = greedy(model, spec, prompts, max_new_tokens=sample_tokens, pad_id=pad_id)
    result = train(model, train_set=train_set, eval_set=eval_set, options=options, objective=CompletionLoss(pad_id))
    after = greedy(model, spec, prompts, max_new_tokens=sample_tokens, pad_id=pad_id)

    def text(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    shown = [{"prompt": _short(text(p)), "reference": _short(text(e.completion_ids)), "base": text(b), "adapter": text(a)}
             for p, e, b, a in zip(prompts, eval_set, before, after)]
    b, a = result.before, result.after
    extra: dict[str, Any] = {
        "task": spec.task, "data": Path(data_path).name, "seed": seed, "steps": result.steps,
        "max_length": max_length, "heldout_loss": round(a.loss, 6), "heldout_perplexity": round(a.perplexity, 4),
        "base_heldout_loss": round(b.loss, 6), "base_heldout_perplexity": round(b.perplexity, 4),
        "heldout_tokens": a.tokens, "samples": shown,
    }
    save_adapter(model, out, base_model=spec.name, base_source=spec.source, labels=None, extra=extra)
    log(f"held-out completion loss {a.loss:.4f} (perplexity {a.perplexity:.2f}) vs untrained {b.loss:.4f} "
        f"(perplexity {b.perplexity:.2f}) over {a.tokens} tokens of {a.n} examples; {result.steps} steps in "
        f"{result.seconds:.1f}s, {result.trainable_params:,} trainable parameters; total {time.perf_counter() - t0:.1f}s")
    for i, s in enumerate(shown, 1):
        log(f"sample {i}: prompt {s['prompt']!r}\n  base:    {_short(s['base'])!r}\n  adapter: {_short(s['adapter'])!r}")
    log(f"adapter written to {out}")
    return result
