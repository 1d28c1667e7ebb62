"""Chat data for causal-LM adapters (``wara train --data chat.jsonl``): lines -> token ids.

A JSONL file, one example per line, in either form:

* ``{"prompt": "...", "completion": "..."}``: plain text; the prompt is tokenized as the
  tokenizer does by default (a BOS token where it adds one), the completion after it without
  special tokens and then the tokenizer's EOS, so the model learns to stop;
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation rendered with the
  tokenizer's chat template; the last message must be the assistant's and is the completion, the
  rest (rendered with the generation prompt) is the prompt.

An example is ``ids`` = prompt then completion tokens; the loss is on the completion only
(`labels`: the prompt and padding are ``IGNORE``). Every bad line is refused by its number, saying
what is wrong with it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import ConfigError

IGNORE = -100  # the label of a position that carries no loss (torch's cross_entropy default)
FORMS = '{"prompt": "...", "completion": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}'


@dataclass(frozen=True)
class ChatLine:
    """One validated line: ``prompt`` / ``completion`` text, or ``messages``."""

    line: int
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict, ...] | None = None


@dataclass(frozen=True)
class ChatExample:
    """One tokenized example: ``ids`` (prompt, then completion); the first ``prompt_len`` carry
    no loss."""

    ids: tuple[int, ...]
    prompt_len: int
    line: int

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.ids[: self.prompt_len]

    @property
    def completion_ids(self) -> tuple[int, ...]:
        return self.ids[self.prompt_len :]

    def labels(self) -> list[int]:
        """Per position: the token itself on the completion, `IGNORE` on the prompt."""
        return [IGNORE] * self.prompt_len + list(self.completion_ids)


def read_chat_jsonl(path: str | os.PathLike) -> list[ChatLine]:
    """Parse and validate every line (blank lines are skipped); the first bad one is a
    `ConfigError` naming ``path:line`` and what is wrong."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--data {path}: cannot read it ({e})") from None
    out = [_parse(f"{path}:{i}", i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    if not out:
        raise ConfigError(f"{path}: no examples (expected JSONL lines of {FORMS})")
    return out


def _parse(where: str, i: int, line: str) -> ChatLine:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object, {FORMS}; got {type(row).__name__}")
    has_pc, has_messages = "prompt" in row or "completion" in row, "messages" in row
    if has_pc and has_messages:
        raise ConfigError(f"{where}: give either prompt/completion or messages, not both")
    if has_messages:
        return ChatLine(i, messages=_messages(where, row["messages"]))
    if not has_pc:
        raise ConfigError(f"{where}: expected {FORMS}; the line has keys {sorted(row)}")
    for key in ("prompt", "completion"):
        if not isinstance(row.get(key), str):
            got = "missing" if key not in row else f"{type(row[key]).__name__} {row[key]!r}"[:80]
            raise ConfigError(f"{where}: {key!r} must be a string, got {got}")
    if not row["completion"].strip():
        raise ConfigError(f"{where}: the completion is empty: there is nothing to learn from the line")
    return ChatLine(i, prompt=row["prompt"], completion=row["completion"])


def _messages(where: str, messages: Any) -> tuple[dict, ...]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ConfigError(f"{where}: messages must be a list of at least two messages (a prompt, then the "
                          "assistant's answer)")
    for k, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ConfigError(f'{where}: message {k} must be {{"role": "...", "content": "..."}} with string values, '
                              f"got {json.dumps(m)[:80]}")
    if messages[-1]["role"] != "assistant":
        raise ConfigError(f"{where}: the last message is the completion and must have role 'assistant', "
                          f"not {messages[-1]['role']!r}")
    if not messages[-1]["content"].strip():
        raise ConfigError(f"{where}: the assistant's message is empty: there is nothing to learn from the line")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


# ------------------------------------------------------------------------------------------
# tokenizing


@dataclass
class TokenizeReport:
    cut: int = 0  # completions cut at max_length
    dropped: list[int] | None = None  # lines whose prompt alone fills max_length

    def describe(self, max_length: int) -> str:
        parts = []
        if self.cut:
            parts.append(f"{self.cut} completion(s) cut at --max-length {max_length}")
        if self.dropped:
            parts.append(f"{len(self.dropped)} line(s) dropped: the prompt alone fills --max-length {max_length} "
                         f"(lines {', '.join(map(str, self.dropped[:8]))}{' ...' if len(self.dropped) > 8 else ''})")
        return "; ".join(parts)


def tokenize(lines: Sequence[ChatLine], tokenizer: Any, *, max_length: int,
             source: str) -> tuple[list[ChatExample], TokenizeReport]:
    """Token ids of every line. An example longer than ``max_length`` keeps its prompt and is
    cut at the end of the completion; one whose prompt leaves no room for a completion token is
    dropped (both counted in the report). ``source`` names the file in errors."""
    if max_length < 2:
        raise ConfigError(f"--max-length must be >= 2 for a language model, got {max_length}")
    report = TokenizeReport(dropped=[])
    out = []
    for row in lines:
        prompt, completion = _ids(row, tokenizer, source)
        if len(prompt) >= max_length or (not prompt and len(completion) < 2):
            report.dropped.append(row.line)
            continue
        if len(prompt) + len(completion) > max_length:
            completion = completion[: max_length - len(prompt)]
            report.cut += 1
        out.append(ChatExample(tuple(prompt + completion), len(prompt), row.line))
    if not out:
        raise ConfigError(f"{source}: no example fits --max-length {max_length} ({report.describe(max_length)})")
    return out, report


def _ids(row: ChatLine, tok: Any, source: str) -> tuple[list[int], list[int]]:
    where = f"{source}:{row.line}"
    if row.messages is None:
        prompt = list(tok(row.prompt)["input_ids"]) if row.prompt else []
        completion = list(tok(row.completion, add_special_tokens=False)["input_ids"])
        if tok.eos_token_id is not None:
            completion.append(int(tok.eos_token_id))
        if not prompt and tok.bos_token_id is not None:
            prompt = [int(tok.bos_token_id)]  # the first completion token needs a position to be predicted from
        return prompt, completion
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"{where}: a messages line needs a chat template, and the base's tokenizer has none "
                          "(tokenizer_config.json / chat_template.jinja): write prompt/completion lines instead")
    try:
        head = tok.apply_chat_template(list(row.messages[:-1]), tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(list(row.messages), tokenize=False)
    except Exception as e:  # a template's own raise_exception (e.g. roles must alternate), or a jinja error
        raise ConfigError(f"{where}: the chat template refuses these messages ({type(e).__name__}: {e})") from None
    if not full.startswith(head):
        raise ConfigError(f"{where}: the chat template renders the conversation so that it does not start with "
                          "its prompt; the completion cannot be told apart")
    # The rendered text carries the template's special tokens (BOS included) itself.
    prompt = list(tok(head, add_special_tokens=False)["input_ids"])
    completion = list(tok(full[len(head):], add_special_tokens=False)["input_ids"])
    return prompt, completion


def split(examples: Sequence[ChatExample], *, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded (train, held-out) split: ``fraction`` of the examples held out, at least one
    each side."""
    import random

    if len(examples) < 2:
        raise ConfigError(f"{len(examples)} example(s): need at least two to hold one out (or give --eval-data)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    k = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:k])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])
