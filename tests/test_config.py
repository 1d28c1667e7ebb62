"""WaraConfig validation: every bad value is refused with the valid values listed."""

from __future__ import annotations

import pytest

from wara_train.config import WaraConfig
from wara_train.errors import ConfigError


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"rank": 2.5}, "rank must be an integer >= 1"),
        ({"alpha": -1}, "alpha must be a finite number > 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
        ({"wavelet": "bior1.3"}, "unknown wavelet 'bior1.3'.*haar, db, sym, coif"),
        ({"wavelet": "db99"}, "unknown wavelet 'db99'"),
        ({"mode": "periodic"}, "valid modes are periodization, boundary"),
        ({"levels": 0}, "levels must be an integer >= 1"),
        ({"factorization": "full"}, "valid values are subband"),
        ({"dtype": "int8"}, "valid values are float32, float16, bfloat16, float64"),
        ({"target_modules": [""]}, "target_modules must be a list of module names"),
    ],
)
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        WaraConfig(**kwargs)


def test_round_trip_through_dict_and_defaults():
    cfg = WaraConfig(rank=8, alpha=16, wavelet="sym4", mode="boundary", levels=2, target_modules=["q", "v"])
    assert cfg.target_modules == ("q", "v") and cfg.scale == 2.0
    assert WaraConfig.from_dict(cfg.to_dict()) == cfg
    regex = WaraConfig(target_modules=r"layer\.\d+\.query")
    assert WaraConfig.from_dict(regex.to_dict()) == regex
    d = WaraConfig().to_dict()
    assert d["wavelet"] == "haar" and d["mode"] == "periodization" and d["factorization"] == "subband"


def test_auto_backend_follows_the_spec_on_cpu_and_is_torch_on_cuda():
    from runtime.config import ServeConfig
    from runtime.selection import engine_backend
    from wara_train.bases import get_base

    auto = ServeConfig(port=0)
    minilm, effnet = get_base("minilm"), get_base("effnet-lite0")
    assert auto.backend == "auto"
    assert engine_backend(auto, minilm) == "onnxruntime"  # the 'cpu' extra is installed in the test venv
    assert engine_backend(auto, effnet) == "torch"  # any image size
    assert engine_backend(auto.replace(device="cuda"), minilm) == "torch"
    for explicit in ("torch", "onnxruntime"):
        assert engine_backend(auto.replace(backend=explicit), effnet) == explicit


def test_served_bases_from_flags_and_toml(tmp_path):
    from runtime.config import BaseEntry, ServeConfig

    assert BaseEntry.parse("mine=hf:/models/bert@text-classification") == BaseEntry("mine", "hf:/models/bert@text-classification")
    assert BaseEntry.parse("minilm") == BaseEntry("minilm", "minilm")
    (tmp_path / "serve.toml").write_text(
        '[serve]\nport = 0\n[[serve.base]]\nname = "a"\nsource = "hf:/x"\ntask = "feature-extraction"\n'
        '[[serve.base]]\nsource = "minilm"\n')
    config = ServeConfig.from_toml(tmp_path / "serve.toml")
    assert config.bases == (BaseEntry("a", "hf:/x", "feature-extraction"), BaseEntry("minilm", "minilm"))
    for bad, message in [("a=hf:/x@translation", "unknown task 'translation'.*feature-extraction"),
                         ("a b=minilm", "base name 'a b'"), ("a=py:nocolon", "py:package.module:function")]:
        with pytest.raises(ConfigError, match=message):
            ServeConfig(bases=(bad,))
    with pytest.raises(ConfigError, match="unique"):
        ServeConfig(bases=("minilm", "minilm"))
