"""Base sources and specs: default targets per family, source parsing and its errors, factory
bases, and the specs `hf_spec` reads off the tiny BERT, ViT and GPT-2 directories."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch.nn as nn

import tiny_models
from wara_train import targets
from wara_train.basespec import RESOLVERS, TASKS, parse_source, resolve_base
from wara_train.errors import ConfigError

# ------------------------------------------------------------------------------------------
# default targets per architecture family


def _tree(*names: str) -> nn.Module:
    """A module whose every dotted name is a small Linear (intermediate modules as needed)."""
    root = nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(4, 4))
    return root


VIT_OLD = [f"vit.encoder.layer.{i}.{n}" for i in range(2) for n in (
    "attention.attention.query", "attention.attention.key", "attention.attention.value",
    "attention.output.dense", "intermediate.dense", "output.dense")]
VIT_V5 = [f"vit.encoder.layer.{i}.{n}" for i in range(2) for n in (
    "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")]


def test_default_targets_pick_the_first_name_set_that_fits():
    old, v5 = targets.candidates("vit")
    assert targets.default_targets(_tree(*VIT_OLD), "vit") == old
    assert targets.default_targets(_tree(*VIT_V5), "vit") == v5  # transformers 5 names
    assert targets.default_targets(_tree(*VIT_OLD, *VIT_V5), "vit") == old  # both fit: the first wins
    assert targets.default_targets(_tree(*[n for n in VIT_V5 if not n.endswith("fc2")]), "vit") is None  # no set fits


def test_default_targets_are_none_for_unknown_families():
    model = _tree("h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc")
    assert targets.default_targets(model, "gpt2") == ("c_attn", "c_proj", "c_fc")
    assert targets.default_targets(model, "my-own-architecture") is None
    assert targets.default_targets(model, None) is None
    assert targets.candidates("my-own-architecture") == []


# ------------------------------------------------------------------------------------------
# sources and their errors


def test_parse_source_kinds():
    assert parse_source("minilm") == ("builtin", "minilm", None)
    assert parse_source("hf:/models/bert@text-classification") == ("hf", "/models/bert", "text-classification")
    assert parse_source("hf:rel/dir") == ("hf", "rel/dir", None)
    assert parse_source("py:pkg.mod:make") == ("py", "pkg.mod:make", None)
    assert set(RESOLVERS) == {"builtin", "hf", "py"}


@pytest.mark.parametrize("source,match", [
    ("", "a base source must be"),
    ("hf:", "hf: needs a model directory"),
    ("hf:/models/bert@summarization", "unknown task 'summarization'.*feature-extraction, text-classification"),
    ("py:nocolon", "a factory base is py:package.module:function"),
    ("py:a:b:c", "a factory base is py:package.module:function"),
    ("py::make", "a factory base is py:package.module:function"),
    ("py:mod:", "a factory base is py:package.module:function"),
])
def test_parse_source_errors(source, match):
    with pytest.raises(ConfigError, match=match):
        parse_source(source)


def test_resolve_base_errors():
    with pytest.raises(ConfigError, match="unknown base 'nope'.*minilm, effnet-lite0.*hf:PATH"):
        resolve_base("nope")
    with pytest.raises(ConfigError, match="built-in base 'minilm' has a fixed task"):
        resolve_base("minilm", task="text-classification")
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        resolve_base("hf:/models/bert", task="nope")
    with pytest.raises(ConfigError, match="has its own task"):
        resolve_base("py:custom_base:tiny_vision_base", task="image-classification")


def test_hf_directory_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_base(f"hf:{tmp_path / 'missing'}")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        resolve_base(f"hf:{tmp_path / 'file'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_base(f"hf:{empty}")
    (empty / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="no weights.*save_pretrained"):
        resolve_base(f"hf:{empty}@feature-extraction")


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """Factory modules a user might write, with the bugs users write."""
    (tmp_path / "wara_test_factories.py").write_text(textwrap.dedent("""
        def boom():
            raise RuntimeError("kaput")

        def not_a_pair():
            return 42

        not_callable = 3
    """))
    (tmp_path / "wara_test_broken_module.py").write_text("raise ValueError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("wara_test_factories", "wara_test_broken_module"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("source,match", [
    ("py:wara_test_factories:boom", r"'py:wara_test_factories:boom': the factory boom\(\) raised RuntimeError: kaput"),
    ("py:wara_test_factories:not_a_pair", "must return \\(model, BaseSpec\\), got int"),
    ("py:wara_test_factories:not_callable", "has no function 'not_callable'"),
    ("py:wara_test_factories:missing", "has no function 'missing'"),
    ("py:wara_test_no_such_module:make", "cannot import 'wara_test_no_such_module'"),
    ("py:wara_test_broken_module:make", "'py:wara_test_broken_module:make': importing .* raised ValueError: broken at import"),
])
def test_factory_errors_name_the_source(user_modules, source, match):
    with pytest.raises(ConfigError, match=match):
        resolve_base(source)


def test_factory_base_records_its_source():
    spec = resolve_base("py:custom_base:tiny_vision_base", name="mine")
    assert (spec.name, spec.source, spec.head) == ("mine", "py:custom_base:tiny_vision_base", "head")
    assert spec.build(None) is not spec.build(None)  # every build is a fresh copy


# ------------------------------------------------------------------------------------------
# hf_spec of the tiny transformers models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-bases")
    return {"bert": tiny_models.make_bert_classifier(root / "bert"),
            "vit": tiny_models.make_vit_classifier(root / "vit"),
            "gpt2": tiny_models.make_gpt2(root / "gpt2")}


def test_hf_spec_of_a_bert_classifier(tiny):
    from wara_train.hf import hf_spec

    spec = hf_spec(tiny["bert"])  # the task is read off config.architectures
    path = str(Path(tiny["bert"]).resolve())
    assert spec.source == f"hf:{path}@text-classification" and spec.name == "bert"
    assert (spec.task, spec.head, spec.output, spec.raw_input) == ("text-classification", "model.classifier", "logits", "text")
    assert spec.labels == ("negative", "positive", "neutral")
    assert spec.input_names == ("input_ids", "attention_mask")
    assert spec.default_targets == targets.TARGETS_BY_MODEL_TYPE["bert"]
    assert spec.hf.prefix == "model" and spec.hf.head_in_model and spec.hf.path == path

    embed = hf_spec(tiny["bert"], task="feature-extraction")
    assert embed.source == f"hf:{path}@feature-extraction"
    assert (embed.head, embed.output, embed.labels, embed.hf.prefix) == ("classifier", "embeddings", None, "bert")


def test_hf_spec_of_a_vit_classifier(tiny):
    from wara_train.hf import hf_spec

    spec = hf_spec(tiny["vit"])
    assert spec.source == f"hf:{Path(tiny['vit']).resolve()}@image-classification"
    assert (spec.head, spec.output, spec.raw_input) == ("model.classifier", "logits", "image")
    assert spec.labels == ("red", "green", "blue")
    assert spec.input_names == ("images",) and spec.inputs[0].shape == (-1, 3, 32, 32)
    assert spec.default_targets in targets.candidates("vit")  # whichever names this transformers uses
    assert spec.hf.arg_names == ("pixel_values",)


def test_hf_spec_of_a_gpt2_model(tiny):
    from wara_train.hf import hf_spec

    spec = hf_spec(tiny["gpt2"])  # GPT2Model: a bare model is a feature extractor
    assert spec.source == f"hf:{Path(tiny['gpt2']).resolve()}@feature-extraction"
    assert (spec.task, spec.head, spec.output, spec.labels) == ("feature-extraction", "classifier", "embeddings", None)
    assert spec.input_names == ("input_ids", "attention_mask")
    assert spec.default_targets == ("c_attn", "c_proj", "c_fc") and spec.hf.prefix == "transformer"


def test_hf_source_is_absolute_whatever_the_user_typed(tiny, tmp_path, monkeypatch):
    """An adapter records its base's source; it must resolve from any working directory."""
    bert = Path(tiny["bert"])
    monkeypatch.chdir(bert.parent)
    spec = resolve_base(f"hf:{bert.name}@feature-extraction", name="mine")
    expected = f"hf:{bert.resolve()}@feature-extraction"
    assert spec.source == expected and spec.name == "mine"
    assert resolve_base("hf:./bert").source == f"hf:{bert.resolve()}@text-classification"
    monkeypatch.chdir(tmp_path)
    assert not os.path.exists(bert.name)
    again = resolve_base(spec.source)
    assert again.source == expected and again.hf.path == spec.hf.path


def test_every_task_has_a_spec_builder():
    from wara_train.hf import AUTO_CLASSES, SPEC_BUILDERS

    assert set(SPEC_BUILDERS) == set(AUTO_CLASSES) == set(TASKS)
