"""The dtype a base computes in (float32, bfloat16, auto), end to end: where it is read (TOML,
``wara serve --dtype``), how ``auto`` decides (faked CPUs), what the engine builds in it (its
weights, page pools, float32 heads and outputs, merged copies summed in float32 and cast once),
and a real server in bfloat16 against the same server in float32 and the float64 pywt oracle,
on tiny random transformers bases (`tiny_models`)."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import torch
from helpers import assert_close

import tiny_models as tm
from references import merge_into
from runtime.config import BaseEntry, ServeConfig
from runtime.selection import cpu_flags, engine_backend, engine_dtype
from wara_train.basespec import resolve_base
from wara_train.errors import ConfigError
from wara_train.synthetic import random_adapter

BF16 = torch.bfloat16
KINDS = [dict(wavelet="haar", levels=1, rank=2), dict(wavelet="db2", levels=2, rank=2), dict(wavelet="haar", levels=1, rank=3)]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tm.make_bert_classifier(tmp_path_factory.mktemp("bert") / "model")


def specs(bert) -> dict:
    return {"cls": resolve_base(f"hf:{bert}@text-classification", name="cls"),
            "emb": resolve_base(f"hf:{bert}@feature-extraction", name="emb")}


def headless_adapter(spec, out, *, seed: int):
    """A random WaRA adapter without a task head (its rows answer embeddings, as the base's)."""
    from wara_train.artifact import load_adapter, save_adapter
    from wara_train.config import WaraConfig
    from wara_train.model import inject, wara_layers
    from wara_train.synthetic import randomize_factors

    model = spec.build(None)
    inject(model, WaraConfig(rank=2, alpha=4.0, target_modules=spec.default_targets), seed=seed)
    for i, layer in enumerate(wara_layers(model).values()):
        randomize_factors(layer, seed * 1000 + i, std=0.1)
    save_adapter(model, out, base_model=spec.name, base_source=spec.source)
    return load_adapter(out)


def oracle(spec, adapter, ids, mask) -> torch.Tensor:
    """What a row answers in float64: ``W0 + ΔW(pywt)`` in a fresh float64 model, with the
    adapter's head (the base's own without an adapter)."""
    head = adapter.saved_modules.get(spec.head) if adapter is not None else None
    model = spec.build(int(head["weight"].shape[0]) if head else None).double()
    if adapter is not None:
        merge_into(model, adapter)
        for name, params in adapter.saved_modules.items():
            model.get_submodule(name).load_state_dict(params)
    with torch.no_grad():
        return model.eval()(ids, mask)


# --- where the dtype is read, and how auto decides ------------------------------------------

def test_dtype_from_toml_per_base_and_the_flag(tmp_path):
    from runtime.cli import config_from_args
    from wara.cli import build_parser

    toml = tmp_path / "serve.toml"
    toml.write_text('[serve]\nport = 0\ndtype = "auto"\n[[serve.base]]\nsource = "minilm"\ndtype = "bfloat16"\n'
                    '[[serve.base]]\nname = "e"\nsource = "effnet-lite0"\n')
    config = ServeConfig.from_toml(toml)
    assert config.bases == (BaseEntry("minilm", "minilm", dtype="bfloat16"), BaseEntry("e", "effnet-lite0"))
    assert (config.dtype, config.dtype_for("minilm"), config.dtype_for("e")) == ("auto", "bfloat16", "auto")
    assert ServeConfig().dtype == "float32"  # the default, until measured otherwise (README)
    # The flag is the default for every base; a base's own table wins.
    flagged = config_from_args(build_parser().parse_args(["serve", "--config", str(toml), "--dtype", "float32"]))
    assert (flagged.dtype_for("minilm"), flagged.dtype_for("e")) == ("bfloat16", "float32")
    assert config_from_args(build_parser().parse_args(["serve", "--config", str(toml)])).dtype == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--dtype", "float16"])
    for bad, message in [(dict(dtype="float16"), "unknown dtype 'float16': valid values are float32, bfloat16, auto"),
                         (dict(bases=({"source": "minilm", "dtype": "fp8"},)),
                          "unknown dtype of base 'minilm' 'fp8': valid values are float32, bfloat16, auto"),
                         (dict(bases=({"source": "minilm", "precision": "fp8"},)), "takes 'name', 'task' and 'dtype'")]:
        with pytest.raises(ConfigError, match=message):
            ServeConfig(**bad)


def test_auto_is_bfloat16_only_where_the_device_has_units_for_it(tmp_path):
    """A plain fake /proc/cpuinfo (no torch capabilities): without amx_bf16 or avx512_bf16 auto
    is float32; with either, bfloat16 on the PyTorch engine and still float32 on onnxruntime."""
    def cpu(flags: str, capabilities: dict | None = None) -> frozenset:
        path = tmp_path / "cpuinfo"
        path.write_text("".join(f"processor\t: {i}\nflags\t\t: fpu sse2 avx2 {flags}\n\n" for i in range(2)))
        return cpu_flags(str(path), capabilities=capabilities or {})

    plain = cpu("avx512f avx512_vnni")
    assert {"avx2", "avx512f"} <= plain and not {"amx_bf16", "avx512_bf16"} & plain
    for flags in (cpu("avx512f amx_tile amx_bf16"), cpu("avx512f avx512_bf16"), cpu("avx512f", {"amx_bf16": True})):
        assert engine_dtype("auto", backend="torch", device="cpu", cpu_flags=flags, cuda_bf16=False) == BF16
        assert engine_dtype("auto", backend="onnxruntime", device="cpu", cpu_flags=flags, cuda_bf16=False) == torch.float32
    assert engine_dtype("auto", backend="torch", device="cpu", cpu_flags=plain, cuda_bf16=False) == torch.float32
    assert engine_dtype("auto", backend="torch", device="cpu", cpu_flags=cpu("avx512f", {"avx512_bf16": False}),
                        cuda_bf16=False) == torch.float32
    assert cpu_flags(str(tmp_path / "none"), capabilities={}) == frozenset()  # no /proc: nothing claimed
    for cuda_bf16, want in ((True, BF16), (False, torch.float32)):
        assert engine_dtype("auto", backend="torch", device="cuda", cpu_flags=frozenset(), cuda_bf16=cuda_bf16) == want
    for name, want in (("float32", torch.float32), ("bfloat16", BF16)):  # explicit: whatever the machine
        assert engine_dtype(name, backend="torch", device="cpu", cpu_flags=plain, cuda_bf16=False) == want
    with pytest.raises(ConfigError, match="onnxruntime engine computes in float32 only, not bfloat16"):
        engine_dtype("bfloat16", backend="onnxruntime", device="cpu", cpu_flags=plain, cuda_bf16=False)
    with pytest.raises(ConfigError, match="valid values are float32, bfloat16, auto"):
        engine_dtype("half", backend="torch", device="cpu", cpu_flags=plain, cuda_bf16=False)


def test_onnxruntime_is_left_out_for_bfloat16_and_refused_when_named(bert):
    from runtime.service import make_engine

    spec = specs(bert)["cls"]
    assert spec.backends[0] == "onnxruntime"
    assert engine_backend(ServeConfig(), spec, dtype="auto") == "onnxruntime"  # auto: float32 there
    assert engine_backend(ServeConfig(), spec, dtype="bfloat16") == "torch"
    named = ServeConfig(backend="onnxruntime", bases=(BaseEntry("cls", f"hf:{bert}@text-classification", dtype="bfloat16"),))
    with pytest.raises(ConfigError, match="base 'cls': the onnxruntime engine computes in float32 only"):
        make_engine(named, spec)


# --- the engine in bfloat16 ------------------------------------------------------------------

def test_a_bfloat16_engine_its_slots_heads_fingerprints_and_merged_copies(bert, tmp_path):
    """Weights and pools in bfloat16 (half the page bytes), heads in float32, adapters of a
    float32 base bind (hashed as built), prepare casts once, a mixed batch matches the float64
    oracle, and a merged copy is ``cast(float32(W0) + B A)``, not a bfloat16 sum."""
    from runtime.adapters import DeviceTier, prepare
    from runtime.engine import TorchEngine

    spec = specs(bert)["cls"]
    f32 = TorchEngine(spec, device="cpu", slot_form="folded")
    bf = TorchEngine(spec, device="cpu", slot_form="folded", dtype="bfloat16")
    assert bf.dtype == BF16 and bf.page_bytes * 2 == f32.page_bytes
    assert all(layer.pool.dtype == BF16 and layer.base.weight.dtype == BF16 for layer in bf.layers.values())
    assert bf.base_head.weight.dtype == torch.float32
    some = tuple(bf.targets[1:3])  # a target set not hashed at start: from a fresh float32 build
    assert bf.fingerprint(some) == f32.fingerprint(some) and bf.fingerprint(tuple(bf.targets)) == f32.fingerprint(tuple(f32.targets))
    adapters = [random_adapter(spec, tmp_path / f"a{i}", seed=i, **k) for i, k in enumerate(KINDS)]
    tier = DeviceTier(bf)
    prepared = [prepare(bf, f"a{i}", a) for i, a in enumerate(adapters)]
    for slot, folded in enumerate(prepared, start=1):
        assert {t.dtype for pair in folded.factors.values() for t in pair} == {BF16}
        assert folded.head[0].dtype == torch.float32
        tier.write(slot, folded)
    ids = torch.randint(5, 60, (4, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    rows = bf.forward([ids, mask], [1, 0, 2, 3])
    for row, adapter in zip(range(4), [adapters[0], None, adapters[1], adapters[2]]):
        got = rows[row]["logits"]
        assert got.dtype == torch.float32
        assert_close(got, oracle(spec, adapter, ids[row:row + 1], mask[row:row + 1])[0], dtype=BF16)

    merged = bf.build_merged(prepared[0].factors)
    naive_differs = False
    for name, layer in bf.layers.items():
        a, b = prepared[0].factors[name]
        w0, delta = layer.base.weight, b.float() @ a.float()
        got = merged.get_submodule(name).weight
        assert got.dtype == BF16 and torch.equal(got, (w0.float() + delta).to(BF16)), name
        naive_differs |= not torch.equal(got, w0 + delta.to(BF16))  # what summing in bfloat16 gives
    assert naive_differs
    via_merged = bf.forward_merged(merged, prepared[0].head, [ids, mask])
    assert_close(via_merged[0]["logits"], oracle(spec, adapters[0], ids[:1], mask[:1])[0], dtype=BF16)


# --- served: bfloat16 against float32 and the float64 oracle ---------------------------------

def _request(name: str, ids: torch.Tensor, mask: torch.Tensor):
    from runtime.kserve import inference_pb2 as pb

    req = pb.ModelInferRequest(model_name=name)
    for label, t in (("input_ids", ids), ("attention_mask", mask)):
        req.inputs.add(name=label, datatype="INT64", shape=list(t.shape)).contents.int64_contents.extend(t.flatten().tolist())
    return req


def _serve_all(live_servers, config, models: list[str], ids, mask) -> tuple[dict, object]:
    """Every model's answer to the same rows, sent at once (one mixed batch per base)."""
    from runtime.kserve import inference_pb2 as pb
    from runtime.kserve import inference_pb2_grpc as pb_grpc
    from runtime.wire import decode_outputs

    server, _, channel = live_servers.start(config)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(lambda m: stub.ModelInfer(_request(m, ids, mask), timeout=60), models))
    platform = stub.ModelMetadata(pb.ModelMetadataRequest(name="cls"), timeout=10).platform
    return {m: decode_outputs(a) for m, a in zip(models, answers)}, (server.service, platform)


def test_served_bfloat16_matches_float32_and_the_float64_oracle(bert, tmp_path, live_servers):
    """A classifier base and an embedding base of one tiny BERT, three adapters each (own factors:
    the fused native op, haar and db2), every model asked the same rows at once: bfloat16
    embeddings have cosine >= 0.999 to float32's on every row, classifier rows agree on top-1,
    and every row is within bfloat16's tolerance of the float64 oracle (float32's within its own)."""
    sp = specs(bert)
    root = tmp_path / "adapters"
    adapters = {f"c{i}": random_adapter(sp["cls"], root / f"c{i}", seed=i, **k) for i, k in enumerate(KINDS)}
    adapters.update({f"e{i}": headless_adapter(sp["emb"], root / f"e{i}", seed=10 + i) for i in range(3)})
    models = ["cls", "c0", "c1", "c2", "emb", "e0", "e1", "e2"]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 0, 0  # a padded row
    bases = (BaseEntry("cls", f"hf:{bert}@text-classification"), BaseEntry("emb", f"hf:{bert}@feature-extraction"))
    common = dict(port=0, adapter_root=str(root), preload=True, bases=bases, slot_form="own", max_delay_ms=200.0,
                  auto_merge=False)
    full, (_, platform32) = _serve_all(live_servers, ServeConfig(backend="torch", **common), models, ids, mask)
    # backend auto: onnxruntime (float32 only) is left out for a bfloat16 base
    half, (service, platform16) = _serve_all(live_servers, ServeConfig(dtype="bfloat16", **common), models, ids, mask)
    assert platform32 == platform16 == "wara_pytorch:cls"
    assert {e.dtype for e in service.engines.values()} == {BF16}
    assert service.batchers["cls"].stats.mixed_batches >= 1 and service.batchers["emb"].stats.mixed_batches >= 1
    assert all(service.repository.current[n].slot is not None for n in adapters)
    for m in models:
        base = "emb" if m.startswith("e") else "cls"
        key = "embeddings" if base == "emb" else "logits"
        got16, got32 = np.array(half[m][key]), np.array(full[m][key])  # writable copies
        assert got16.dtype == got32.dtype == np.float32
        want = oracle(sp[base], adapters.get(m), ids, mask)
        assert_close(got16, want, dtype=BF16, msg=f"{m} bfloat16 vs the float64 oracle")
        assert_close(got32, want, dtype=torch.float32, msg=f"{m} float32 vs the float64 oracle")
        if key == "embeddings":
            cos = (got16 * got32).sum(-1) / (np.linalg.norm(got16, axis=-1) * np.linalg.norm(got32, axis=-1))
            assert cos.min() >= 0.999, (m, cos)
        else:
            assert (got16.argmax(-1) == got32.argmax(-1)).all(), (m, got16, got32)
