"""Causal-LM bases (``hf:DIR[@text-generation]``): specs, exports the ecosystem loads, training.

For a tiny Llama (grouped-query attention, a chat template), GPT-2 (Conv1D, fused ``c_attn``,
tied lm_head), GPT-NeoX (fused ``query_key_value``) and Phi-3 (fused ``qkv_proj`` and
``gate_up_proj``), each with a random WaRA adapter:

* ``export merge`` -> ``AutoModelForCausalLM.from_pretrained(dir)`` in another process;
* ``export lora`` -> ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR), lora)``
  in another process;

both against the independent reference: the plain model with ``W0 + ΔW`` merged in by pywt in
float64 (`references.merge_into`), logits at float32's tolerance and greedy ``generate`` token
for token. Then ``wara train`` on chat JSONL: the loss falls, prompts carry none, bad lines are
named.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tiny_models
from helpers import assert_close
from references import merge_into
from exporter.common import base_for
from exporter.lora import save_peft_lora
from exporter.merge import save_merged
from wara_train import chat, targets
from wara_train.artifact import WaraAdapter, load_adapter
from wara_train.basespec import BaseSpec, resolve_base
from wara_train.causal_lm import collate, completion_nll
from wara_train.errors import ConfigError
from wara_train.synthetic import random_adapter

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

FAMILIES = tiny_models.CAUSAL_FAMILIES
F32 = torch.float32
NEW_TOKENS = 8
# Which of each family's layers are fused projections, Conv1D or plain Linears (every one adapted).
FUSED = {"llama": (), "gpt2": ("c_attn",), "gpt_neox": ("query_key_value",), "phi3": ("qkv_proj", "gate_up_proj")}

# Runs in a fresh interpreter: nothing of ours is imported, only transformers and peft.
LOADER = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
for job in json.load(open(sys.argv[1])):
    model = AutoModelForCausalLM.from_pretrained(job["model"], local_files_only=True).eval()
    if job["lora"]:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, job["lora"]).eval()
    ids, mask, prompts = (torch.tensor(job[k]) for k in ("ids", "mask", "prompts"))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                max_new_tokens=job["new_tokens"], pad_token_id=job["pad"])
    save_file({"logits": logits.contiguous(), "tokens": tokens.contiguous()}, job["out"])
    print(job["out"], type(model).__name__)
"""


@dataclass
class Case:
    family: str
    model_dir: Path
    spec: BaseSpec
    adapter: WaraAdapter
    adapter_dir: Path


def _inputs(spec: BaseSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits inputs (3 x 12, one row right-padded) and two 6-token prompts to continue."""
    ids, mask = spec.sample(3, 12)
    mask = mask.clone()
    mask[1, 8:] = 0
    return ids, mask, spec.sample(2, 6)[0]


def _pad_id(case: Case) -> int:
    return int(transformers.AutoConfig.from_pretrained(case.model_dir).eos_token_id)


def _run_hf(model, ids, mask, prompts, pad: int) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                max_new_tokens=NEW_TOKENS, pad_token_id=pad)
    return {"logits": logits, "tokens": tokens}


def _plain(case: Case):
    return transformers.AutoModelForCausalLM.from_pretrained(case.model_dir, local_files_only=True).eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every family's adapter, exported both ways and run in one other process: the family ->
    the case, the reference, the plain base's answers and each export's."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("causal")
    out: dict[str, dict] = {}
    jobs = []
    for family in FAMILIES:
        model_dir = tiny_models.make_causal_lm(root / family, family)
        spec = resolve_base(f"hf:{model_dir}")
        adapter = random_adapter(spec, root / f"{family}-adapter", wavelet="db2", levels=2, rank=2, seed=1)
        case = Case(family, model_dir, spec, adapter, root / f"{family}-adapter")
        base = base_for(adapter, spec)
        merged = save_merged(base, [(adapter, 1.0)], root / f"{family}-merged", spec=spec)
        lora = save_peft_lora(adapter, root / f"{family}-lora", spec=spec, base=base)
        ids, mask, prompts = _inputs(spec)
        pad = _pad_id(case)
        reference = _run_hf(merge_into(_plain(case), adapter, prefix="model."), ids, mask, prompts, pad)
        out[family] = {"case": case, "reference": reference, "plain": _run_hf(_plain(case), ids, mask, prompts, pad),
                       "merged_dir": merged, "lora_dir": lora}
        for kind, model, peft_dir in (("merged", merged, None), ("lora", model_dir, lora)):
            jobs.append({"model": str(model), "lora": str(peft_dir) if peft_dir else None, "ids": ids.tolist(),
                         "mask": mask.tolist(), "prompts": prompts.tolist(), "pad": pad, "new_tokens": NEW_TOKENS,
                         "out": str(root / f"{family}-{kind}.safetensors")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, "-c", LOADER, str(root / "jobs.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    classes = dict(line.split() for line in proc.stdout.splitlines())
    for family in FAMILIES:
        for kind in ("merged", "lora"):
            f = str(root / f"{family}-{kind}.safetensors")
            out[family][kind] = load_file(f)
            out[family][f"{kind}_class"] = classes[f]
    return out


# ------------------------------------------------------------------------------------------
# the spec


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_is_read_off_the_directory(runs, family):
    case = runs[family]["case"]
    spec = case.spec
    assert spec.source == f"hf:{case.model_dir.resolve()}@text-generation" and spec.task == "text-generation"
    assert resolve_base(spec.source).source == spec.source  # an explicit @text-generation resolves alike
    assert (spec.head, spec.output, spec.task_head, spec.labels) == ("model.lm_head", "logits", False, None)
    assert spec.input_names == ("input_ids", "attention_mask") and spec.inputs[0].max_dims == (None, 64)
    assert spec.hf.auto_class == "AutoModelForCausalLM" and spec.hf.prefix == "model"
    assert spec.default_targets == targets.TARGETS_BY_MODEL_TYPE[family]
    # Every default target is adapted, fused projections and Conv1D included; the adapter has no head.
    names = case.adapter.config.target_modules
    for suffix in spec.default_targets:
        assert sum(n.endswith("." + suffix) for n in names) >= 2, suffix  # one per layer at least
    assert all(any(n.endswith("." + f) for n in names) for f in FUSED[family])
    assert case.adapter.saved_modules == {} and case.adapter.labels is None
    with pytest.raises(ConfigError, match="takes no 4-way task head"):
        spec.build(4)


# ------------------------------------------------------------------------------------------
# exports, loaded by transformers and peft in another process


@pytest.mark.parametrize("kind", ["merged", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_matches_the_pywt_merged_reference(runs, family, kind):
    run = runs[family]
    want, got = run["reference"], run[kind]
    assert_close(got["logits"], want["logits"], dtype=F32, msg=f"{family} {kind} logits")
    assert torch.equal(got["tokens"], want["tokens"]), (got["tokens"], want["tokens"])
    assert (run["plain"]["logits"] - want["logits"]).abs().max() > 1e-2  # the adapter matters,
    assert not torch.equal(run["plain"]["tokens"], want["tokens"])  # to what it generates too
    own = json.loads((run["case"].model_dir / "config.json").read_text())["architectures"][0]
    assert run[f"{kind}_class"] == ("PeftModelForCausalLM" if kind == "lora" else own)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_directory_is_a_whole_causal_lm(runs, family):
    run = runs[family]
    out, case = run["merged_dir"], run["case"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == json.loads((case.model_dir / "config.json").read_text())["architectures"]
    assert "id2label" not in config or len(config["id2label"]) <= 2  # no vocabulary-sized label table
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok("hello world")["input_ids"] == [tok.convert_tokens_to_ids(t) for t in ("hello", "Ġworld")]
    if family == "llama":  # the chat template comes along
        chat_text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert chat_text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((out / "wara_merged.json").read_text())["task"] == "text-generation"


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_config_uses_standard_module_names(runs, family):
    cfg = json.loads((runs[family]["lora_dir"] / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["modules_to_save"] is None
    assert cfg["fan_in_fan_out"] == (family == "gpt2")  # GPT-2's Conv1D stores W as (in, out)
    mods = {n for n, _ in _plain(runs[family]["case"]).named_modules()}
    assert cfg["target_modules"] and all(t in mods for t in cfg["target_modules"])  # transformers' own names


# ------------------------------------------------------------------------------------------
# training on chat data


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return tiny_models.make_causal_lm(root / "llama", "llama"), tiny_models.write_chat_jsonl(root / "chat.jsonl")


def test_prompt_tokens_carry_no_loss(llama):
    model_dir, data = llama
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    examples, report = chat.tokenize(chat.read_chat_jsonl(data)[:2], tok, max_length=64, source="chat.jsonl")
    plain, conv = examples  # line 1: prompt/completion, line 2: messages
    assert not report.cut and not report.dropped
    assert tok.decode(plain.prompt_ids).startswith("say ") and tok.decode(plain.prompt_ids).endswith(":")
    assert tok.decode(plain.completion_ids).endswith("<|im_end|>")  # the eos, so the model learns to stop
    assert tok.decode(conv.prompt_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(conv.completion_ids).endswith("<|im_end|>\n")
    ids, mask, labels = collate(examples, pad_id=0)
    for row, e in enumerate(examples):
        assert labels[row, : e.prompt_len].eq(chat.IGNORE).all() and labels[row, len(e.ids):].eq(chat.IGNORE).all()
        assert labels[row, e.prompt_len : len(e.ids)].tolist() == list(e.completion_ids)
        assert mask[row].sum() == len(e.ids)
    # Only the positions that predict completion tokens get a gradient.
    logits = torch.randn(*ids.shape, len(tok), requires_grad=True)
    total, count = completion_nll(logits, labels)
    assert count == sum(len(e.completion_ids) for e in examples)
    total.backward()
    touched = logits.grad.abs().sum(-1) > 0
    for row, e in enumerate(examples):
        assert touched[row].nonzero().flatten().tolist() == list(range(e.prompt_len - 1, len(e.ids) - 1))


def test_wara_train_on_chat_lowers_the_completion_loss(llama, tmp_path):
    model_dir, data = llama
    out = tmp_path / "adapter"
    proc = subprocess.run([sys.executable, "-m", "wara", "train", "--base", f"hf:{model_dir}", "--data", str(data),
                           "--out", str(out), "--steps", "12", "--batch-size", "4", "--lr", "1e-2", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "held-out completion loss" in proc.stdout and "sample 1: prompt" in proc.stdout, proc.stdout
    cfg = json.loads((out / "adapter_config.json").read_text())
    extra = cfg["extra"]
    assert extra["heldout_loss"] < extra["base_heldout_loss"] and extra["steps"] == 12, extra
    assert extra["heldout_perplexity"] < extra["base_heldout_perplexity"]
    assert len(extra["samples"]) >= 1 and {"prompt", "base", "adapter"} <= set(extra["samples"][0])
    assert cfg["base_source"] == f"hf:{model_dir.resolve()}@text-generation" and cfg["modules_to_save"] == []
    names = load_adapter(out).config.target_modules
    assert sorted({n.rsplit(".", 1)[1] for n in names}) == sorted(targets.TARGETS_BY_MODEL_TYPE["llama"])
    assert len(names) == 2 * len(targets.TARGETS_BY_MODEL_TYPE["llama"])  # every projection of both layers
    # The trained adapter, merged by the CLI (its base found from the recorded source), loads as a causal LM.
    proc = subprocess.run([sys.executable, "-m", "wara", "export", "merge", "--adapter", str(out),
                           "--out", str(tmp_path / "merged")], capture_output=True, text=True)
    assert proc.returncode == 0 and "AutoModelForCausalLM directory" in proc.stdout, proc.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "merged")).chat_template


@pytest.mark.parametrize("line,match", [
    ("not json", r"chat\.jsonl:3: not JSON"),
    ('["a list"]', r"chat\.jsonl:3: expected a JSON object"),
    ('{"text": "hi", "label": 1}', r"chat\.jsonl:3: expected .*prompt.*messages.*keys \['label', 'text'\]"),
    ('{"prompt": "hi"}', r"chat\.jsonl:3: 'completion' must be a string, got missing"),
    ('{"prompt": "hi", "completion": 42}', r"chat\.jsonl:3: 'completion' must be a string, got int 42"),
    ('{"prompt": "hi", "completion": "  "}', r"chat\.jsonl:3: the completion is empty"),
    ('{"prompt": "a", "completion": "b", "messages": []}', r"chat\.jsonl:3: give either prompt/completion or messages"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"chat\.jsonl:3: messages must be a list of at least two"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}',
     r"chat\.jsonl:3: the last message .* must have role 'assistant', not 'user'"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', r"chat\.jsonl:3: message 0 must be"),
])
def test_a_bad_line_is_named(llama, tmp_path, line, match):
    from wara_train.tasks import train_on_base

    model_dir, data = llama
    bad = tmp_path / "chat.jsonl"
    bad.write_text("\n".join(data.read_text().splitlines()[:2] + [line]) + "\n")
    with pytest.raises(ConfigError, match=match):
        train_on_base(f"hf:{model_dir}", bad, tmp_path / "out", steps=1, progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_messages_need_a_chat_template(runs, tmp_path):
    from wara_train.tasks import train_on_base

    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n'
                   '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(ConfigError, match=r"chat\.jsonl:2: a messages line needs a chat template"):
        train_on_base(f"hf:{runs['gpt2']['case'].model_dir}", bad, tmp_path / "out", steps=1, progress=False)


def test_the_server_refuses_a_text_generation_base_by_name(llama):
    """Serving generation is not built yet: a causal-LM base is a clear start-up refusal, never
    a one-shot model that answers with vocabulary logits."""
    from runtime.config import ServeConfig
    from runtime.service import Service

    with pytest.raises(ConfigError, match="base 'lm' is a text-generation model"):
        Service(ServeConfig(bases=(f"lm=hf:{llama[0]}",), backend="torch"))
