"""The server as users run it: a real server on port 0, tritonclient in another process, and
every answer checked against the single-request PyTorch reference of the version it names."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from helpers import assert_close, tol

from exporter.common import base_for
from exporter.verify import reference_model
from runtime.config import ServeConfig
from runtime.kserve import inference_pb2 as pb
from runtime.kserve import inference_pb2_grpc as pb_grpc
from runtime.server import create_server
from wara_train.artifact import load_adapter
from wara_train.bases import MiniLMTokenizer
from wara_train.errors import ConfigError
from wara_train.synthetic import random_adapter

ROOT = Path(__file__).resolve().parent.parent
CLIENT = Path(__file__).parent / "clients" / "triton_client.py"
TOPICS = [f"topic-{c}" for c in "abcdefgh"]
TEXTS = ["what is artificial intelligence", "tell me a joke", "do you like football?", "how are you today",
         "the stock market fell", "who wrote hamlet"]


def test_generated_stubs_are_current():
    proc = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


class Reference:
    """Single-request PyTorch outputs for any adapter version, computed once per (hash, text)."""

    def __init__(self) -> None:
        self.tok = MiniLMTokenizer(max_length=128)
        self.models: dict[str, torch.nn.Module] = {}
        self.cache: dict[tuple[str, str], np.ndarray] = {}
        self.bases: dict[str, torch.nn.Module] = {}

    def add(self, adapter) -> None:
        if adapter.content_hash not in self.models:
            if adapter.base_model not in self.bases:
                self.bases[adapter.base_model] = base_for(adapter)
            self.models[adapter.content_hash] = reference_model(adapter, self.bases[adapter.base_model])

    def logits(self, version: str, text: str) -> np.ndarray:
        key = (version, text)
        if key not in self.cache:
            with torch.no_grad():
                self.cache[key] = self.models[version](**self.tok([text]))[0].numpy()
        return self.cache[key]


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def served(request, tmp_path_factory):
    """One server per engine backend; every test below runs against both."""
    root = tmp_path_factory.mktemp("adapters")
    ref = Reference()
    for k, name in enumerate(TOPICS):
        wavelet, levels = ("db2", 2) if k % 2 else ("haar", 1)
        ref.add(random_adapter("minilm", root / name, wavelet=wavelet, levels=levels, rank=2, seed=10 + k))
    random_adapter("effnet-lite0", root / "digits", rank=2, num_labels=4, seed=3)
    variants = tmp_path_factory.mktemp("variants")
    for v in range(4):  # new contents for the hot-swap test
        ref.add(random_adapter("minilm", variants / str(v), rank=2, seed=100 + v))
    config = ServeConfig(port=0, adapter_root=str(root), preload=True, max_delay_ms=20.0, max_message_mb=4,
                         merged=("topic-h",), backend=request.param)
    server, port = create_server(config)
    service = server.service
    try:
        yield {"port": port, "service": service, "root": root, "variants": variants, "ref": ref,
               "backend": request.param}
    finally:
        server.stop(grace=2.0)


def _client(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLIENT), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _stub(port):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def _assert_matches(ref: Reference, rec: dict) -> None:
    rtol, atol = tol(torch.float32)
    got = np.asarray(rec["logits"][0])
    want = ref.logits(rec["version"], rec["text"])
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{rec['model']} @ {rec['version'][:16]}")


@pytest.mark.slow
def test_tritonclient_smoke_from_another_process(served):
    ref, root = served["ref"], served["root"]
    proc = _client("smoke", served["port"], root / "topic-a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["live"] and out["ready"] and "model_repository" in out["extensions"]
    version = load_adapter(root / "topic-a").content_hash
    assert out["metadata"]["versions"] == [version]
    assert out["metadata"]["inputs"] == ["text", "input_ids", "attention_mask"]
    assert out["metadata"]["outputs"] == ["logits", "labels"]
    assert out["metadata"]["platform"] == {"torch": "wara_pytorch", "onnxruntime": "wara_onnxruntime"}[served["backend"]] + ":minilm"
    texts = ["what is artificial intelligence", "tell me a joke"]
    for i, text in enumerate(texts):
        np.testing.assert_allclose(out["adapter"]["logits"][i], ref.logits(version, text), rtol=1e-4, atol=1e-4)
    assert out["adapter"]["labels"][0].startswith("label")
    assert np.allclose(np.linalg.norm(out["base"]["embeddings"], axis=1), 1.0, atol=1e-5)
    assert len(out["vision"]["logits"][0]) == 4 and len(out["vision"]["labels"]) == 2
    assert ("topic-a", "READY") in [tuple(x) for x in out["index_before"]]
    assert out["ready_after_unload"] is False and out["after_unload"] == "StatusCode.NOT_FOUND"
    assert out["ready_after_load"] is True
    np.testing.assert_allclose(out["by_files"]["logits"], out["adapter"]["logits"], rtol=1e-5, atol=1e-5)
    assert ("sent-by-files", "READY") in [tuple(x) for x in out["index_after"]]


@pytest.mark.slow
def test_sixteen_clients_over_eight_adapters_and_base(served):
    ref, service = served["ref"], served["service"]
    before = service.batchers["minilm"].stats.mixed_batches
    models = TOPICS + ["minilm"]
    plan = {"clients": [{"model": models[k % len(models)], "texts": TEXTS[k % 3:] + TEXTS[: k % 3], "requests": 8}
                        for k in range(16)]}
    plan_file = served["root"].parent / "plan16.json"
    plan_file.write_text(json.dumps(plan))
    proc = _client("load", served["port"], plan_file)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    done = records.pop()
    assert done["done"] and len(records) == 16 * 8
    assert all(r["status"] == "OK" for r in records), [r for r in records if r["status"] != "OK"][:2]
    for r in records:
        if r["model"] == "minilm":
            assert len(r["embeddings"][0]) == 384
        else:
            assert r["version"] == load_adapter(served["root"] / r["model"]).content_hash
            _assert_matches(ref, r)
    stats = service.batchers["minilm"].stats
    assert stats.mixed_batches > before and stats.max_models_in_batch >= 2
    print(f"\n16 clients x 8 requests: {len(records) / done['seconds']:.1f} req/s; "
          f"{stats.batches} batches, mean {np.mean(stats.batch_sizes):.1f} rows, up to {stats.max_models_in_batch} models in one")


@pytest.mark.slow
def test_hot_swap_under_load(served):
    """Reload topic-c with new content 20 times and unload/load topic-d while clients run:
    nothing fails but NOT_FOUND on topic-d while it is unloaded, and every answer matches the
    version the response names."""
    ref, root, variants = served["ref"], served["root"], served["variants"]
    plan = {"clients": [{"model": m, "texts": TEXTS, "requests": 30} for m in ["topic-c", "topic-c", "topic-d", "topic-e"]],
            "max_seconds": 240}
    plan_file = root.parent / "plan_swap.json"
    plan_file.write_text(json.dumps(plan))
    proc = subprocess.Popen([sys.executable, str(CLIENT), "load", str(served["port"]), str(plan_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    channel, stub = _stub(served["port"])
    loaded_versions = set()
    try:
        def files(path):
            return {"config": pb.ModelRepositoryParameter(string_param=(path / "adapter_config.json").read_text()),
                    "file:adapter_model.safetensors": pb.ModelRepositoryParameter(bytes_param=(path / "adapter_model.safetensors").read_bytes())}

        for i in range(20):
            path = variants / str(i % 4)
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="topic-c", parameters=files(path)))
            loaded_versions.add(load_adapter(path).content_hash)
            if i % 5 == 2:
                stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="topic-d"))
                time.sleep(0.2)
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="topic-d"))
            time.sleep(0.05)
    finally:
        out, err = proc.communicate(timeout=600)
        channel.close()
    assert proc.returncode == 0, err[-3000:]
    records = [json.loads(line) for line in out.splitlines()][:-1]
    assert len(records) == 4 * 30
    for r in records:
        if r["status"] != "OK":
            assert r["model"] == "topic-d" and r["status"] == "StatusCode.NOT_FOUND", r
            continue
        _assert_matches(ref, r)  # the answer belongs to the version the response names
    seen = {r["version"] for r in records if r["model"] == "topic-c" and r["status"] == "OK"}
    assert len(seen) >= 2  # requests really ran on several versions
    assert seen <= loaded_versions | {load_adapter(root / "topic-c").content_hash}


@pytest.mark.slow
def test_merged_fast_path_answers_like_the_reference_and_base_stays_pristine(served):
    from runtime.server import decode_outputs

    service, ref = served["service"], served["ref"]
    engine = service.engines["minilm"]
    pristine = {n: layer.base.weight.clone() for n, layer in engine.layers.items()}
    before = service.batchers["minilm"].stats.merged_batches
    version = load_adapter(served["root"] / "topic-h").content_hash
    channel, stub = _stub(served["port"])
    try:
        for text in TEXTS[:3]:  # one request at a time: batches of topic-h alone
            resp = _infer(stub, "topic-h", [("text", "BYTES", [1], ("bytes_contents", [text.encode()]))])
            _assert_matches(ref, {"model": "topic-h", "version": resp.model_version, "text": text,
                                  "logits": decode_outputs(resp)["logits"].tolist()})
            assert resp.model_version == version
    finally:
        channel.close()
    assert service.batchers["minilm"].stats.merged_batches >= before + 3
    assert all(torch.equal(pristine[n], layer.base.weight) for n, layer in engine.layers.items())


def _infer(stub, model, inputs, raw=None, **kw):
    req = pb.ModelInferRequest(model_name=model)
    for name, datatype, shape, contents in inputs:
        t = req.inputs.add(name=name, datatype=datatype, shape=shape)
        if contents is not None:
            getattr(t.contents, contents[0]).extend(contents[1])
    if raw is not None:
        req.raw_input_contents.extend(raw)
    kw.setdefault("timeout", 60)
    return stub.ModelInfer(req, **kw)


@pytest.mark.slow
def test_bad_requests_get_the_right_code_and_the_server_keeps_serving(served):
    channel, stub = _stub(served["port"])
    good = [("text", "BYTES", [1], ("bytes_contents", [b"hello"]))]
    cases = {
        "wrong datatype": ("topic-a", [("text", "FP32", [1], ("fp32_contents", [1.0]))], None, grpc.StatusCode.INVALID_ARGUMENT),
        "wrong shape": ("digits", [("images", "FP32", [1, 3, 8], ("fp32_contents", [0.0] * 24))], None, grpc.StatusCode.INVALID_ARGUMENT),
        "shape/content mismatch": ("topic-a", [("text", "BYTES", [2], ("bytes_contents", [b"x"]))], None, grpc.StatusCode.INVALID_ARGUMENT),
        "missing input": ("topic-a", [("input_ids", "INT64", [1, 3], ("int64_contents", [101, 7592, 102]))], None, grpc.StatusCode.INVALID_ARGUMENT),
        "raw wrong byte length": ("digits", [("images", "FP32", [1, 3, 64, 64], None)], [b"\0" * 100], grpc.StatusCode.INVALID_ARGUMENT),
        "raw BYTES truncated": ("topic-a", [("text", "BYTES", [1], None)], [struct.pack("<I", 50) + b"short"], grpc.StatusCode.INVALID_ARGUMENT),
        "unknown adapter": ("no-such-adapter", good, None, grpc.StatusCode.NOT_FOUND),
        "empty batch": ("topic-a", [("text", "BYTES", [0], ("bytes_contents", []))], None, grpc.StatusCode.INVALID_ARGUMENT),
        "FP16 as typed contents": ("digits", [("images", "FP16", [1], ("fp32_contents", [0.0]))], None, grpc.StatusCode.INVALID_ARGUMENT),
        "INT8 out of range": ("topic-a", [("input_ids", "INT8", [1, 1], ("int_contents", [300]))], None, grpc.StatusCode.INVALID_ARGUMENT),
        "absurd shape": ("topic-a", [("text", "BYTES", [2**40, 2**40], ("bytes_contents", []))], None, grpc.StatusCode.INVALID_ARGUMENT),
        "oversize message": ("digits", [("images", "FP32", [1, 3, 512, 512], None)], [b"\0" * (5 << 20)], grpc.StatusCode.RESOURCE_EXHAUSTED),
    }
    try:
        for label, (model, inputs, raw, code) in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                _infer(stub, model, inputs, raw)
            assert info.value.code() == code, f"{label}: {info.value.code()} {info.value.details()}"
            assert info.value.details(), label
            ok = _infer(stub, "topic-a", good)  # still serving
            assert ok.outputs[0].name == "logits"
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="bad", parameters={
                "config": pb.ModelRepositoryParameter(string_param="{}"),
                "file:adapter_model.safetensors": pb.ModelRepositoryParameter(bytes_param=b"junk")}))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "format" in info.value.details()
        assert "bad" not in [m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models]
        for name in ("..", "../topic-a", "/etc"):  # never a path outside the adapter root
            with pytest.raises(grpc.RpcError) as info:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid adapter name" in info.value.details()
        # A head that does not fit its labels is refused at load, not at the first request.
        src = served["root"] / "topic-a"
        cfg = json.loads((src / "adapter_config.json").read_text())
        cfg["labels"] = ["only-one"]
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mislabelled", parameters={
                "config": pb.ModelRepositoryParameter(string_param=json.dumps(cfg)),
                "file:adapter_model.safetensors": pb.ModelRepositoryParameter(bytes_param=(src / "adapter_model.safetensors").read_bytes())}))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "1 labels for a head of 5" in info.value.details()
        # A deadline that cannot be met is DEADLINE_EXCEEDED, and the server goes on.
        with pytest.raises(grpc.RpcError) as info:
            _infer(stub, "topic-a", good, timeout=0.001)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _infer(stub, "topic-a", good).outputs[0].name == "logits"
    finally:
        channel.close()


@pytest.mark.slow
def test_serve_cli_prints_its_address_and_drains_on_sigterm(tmp_path):
    shutil.copytree(Path(__file__).parent / "clients", tmp_path / "unused")  # any directory works as a root
    proc = subprocess.Popen([sys.executable, "-m", "wara", "serve", "--port", "0", "--adapter-root", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        t0 = time.time()
        while time.time() - t0 < 120 and not line.startswith("serving on"):
            line = proc.stdout.readline()
        assert line.startswith("serving on 127.0.0.1:"), proc.stderr.read()[-2000:]
        port = int(line.strip().rsplit(":", 1)[1])
        channel, stub = _stub(port)
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        channel.close()
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        proc.kill()


@pytest.mark.slow
def test_metrics_count_requests_batches_and_loads(served):
    channel, stub = _stub(served["port"])
    try:
        _infer(stub, "topic-a", [("text", "BYTES", [1], ("bytes_contents", [b"hi"]))])
        with pytest.raises(grpc.RpcError):
            _infer(stub, "nobody", [("text", "BYTES", [1], ("bytes_contents", [b"hi"]))])
    finally:
        channel.close()
    text = served["service"].metrics.text().decode()
    for name in ("wara_requests_total", "wara_request_latency_seconds", "wara_batch_size", "wara_requests_waiting", "wara_requests_running",
                 "wara_adapter_loads_total", "wara_adapter_load_seconds", "wara_adapter_evictions"):
        assert name in text, name
    assert 'outcome="ok"' in text and 'outcome="ModelNotFound"' in text


def test_auto_merge_takes_the_dominant_adapter_to_the_merged_path(tmp_path):
    """In-process: after a window where one adapter dominates, its batches run merged, and
    answers stay those of the reference."""
    from runtime.service import Service

    ref = Reference()
    adapter = random_adapter("minilm", tmp_path / "hot", rank=2, seed=5)
    ref.add(adapter)
    random_adapter("minilm", tmp_path / "cold", rank=2, seed=6)
    service = Service(ServeConfig(port=0, adapter_root=str(tmp_path), bases=("minilm",), max_delay_ms=0.0, backend="torch",
                                  auto_merge_window=10, auto_merge_share=0.9))
    try:
        text = np.array([b"tell me a joke"], dtype=object)
        service.predict("cold", {"text": text})
        for _ in range(12):
            version, out = service.predict("hot", {"text": text})
        deadline = time.time() + 30
        while service.repository.current["hot"].merged is None and time.time() < deadline:
            time.sleep(0.05)
        assert service.repository.current["hot"].merged is not None
        before = service.batchers["minilm"].stats.merged_batches
        version, out = service.predict("hot", {"text": text})
        assert service.batchers["minilm"].stats.merged_batches == before + 1
        _assert_matches(ref, {"model": "hot", "version": version, "text": "tell me a joke", "logits": out["logits"].tolist()})
        assert service.repository.current["cold"].merged is None
    finally:
        service.drain()


@pytest.mark.slow
def test_health_per_model_and_reflection(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = grpc.insecure_channel(f"127.0.0.1:{served['port']}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == serving
        assert health.Check(health_pb2.HealthCheckRequest(service="topic-e")).status == serving
        assert health.Check(health_pb2.HealthCheckRequest(service="minilm")).status == serving
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nobody"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
    finally:
        channel.close()


def test_host_tier_budget_pinning_and_slot_eviction(tmp_path):
    """In-process: a host budget that holds about one adapter, a device pool that holds two,
    three adapters. Evicted adapters are read and folded again on demand and still answer
    exactly; pinned ones stay."""
    from runtime.service import Service

    ref = Reference()
    for k, name in enumerate(["pinned-one", "x", "y"]):
        ref.add(random_adapter("minilm", tmp_path / name, rank=2, seed=20 + k))
    one = Service(ServeConfig(port=0, bases=("minilm",), adapter_root=str(tmp_path), auto_merge=False, backend="torch",
                              preload=True))
    size_mb = one.repository.current["x"].nbytes / (1 << 20)
    pages = one.repository.current["x"].pages * one.engines["minilm"].page_bytes / (1 << 20)
    one.drain()
    service = Service(ServeConfig(port=0, bases=("minilm",), adapter_root=str(tmp_path), device_budget_mb=2.5 * pages,
                                  max_delay_ms=0.0, backend="torch", preload=True,
                                  host_budget_mb=size_mb * 1.5, pinned=("pinned-one",), auto_merge=False))
    try:
        reg = service.repository
        assert reg.current["pinned-one"].adapter is not None  # pinned: never evicted
        assert reg.stats["host_evictions"] >= 1
        text = "tell me a joke"
        for _ in range(2):
            for name in ["x", "y", "pinned-one"]:
                version, out = service.predict(name, {"text": np.array([text.encode()], dtype=object)})
                _assert_matches(ref, {"model": name, "version": version, "text": text, "logits": out["logits"].tolist()})
        assert reg.stats["slot_evictions"] >= 1  # three adapters took turns in a pool that holds two
        assert reg.current["pinned-one"].adapter is not None
    finally:
        service.drain()


def test_own_factor_slots_serve_like_the_explicit_model(tmp_path):
    """slot_form "own": slots hold adapters' own WaRA factors (fewer pages: 2r at J = 1 where the
    fold takes 4r), served by the fused wavelet op in one batch with a folded-equivalent engine's
    answers and the explicit model's; compaction moves own slots like folded ones. The
    onnxruntime engine and the pure kernel always fold; a bad form is refused by name."""
    import math

    from runtime.adapters import DeviceTier, prepare
    from runtime.engine import TorchEngine
    from runtime.kernels import grouped_lora
    from runtime.native import own_numel

    kinds = [dict(rank=4, levels=1), dict(rank=2, levels=2, wavelet="db2"), dict(rank=2, levels=3)]
    adapters = [random_adapter("minilm", tmp_path / f"a{i}", seed=i, **k) for i, k in enumerate(kinds)]
    own = TorchEngine("minilm", device="cpu", slot_form="own")
    tier = DeviceTier(own)
    assert own.slot_form == "own" and "wavelet_lowrank" in own.kernel_name
    enc = MiniLMTokenizer(max_length=16)(["hello there", "what is the weather like today", "a third text", "four"])
    inputs = (enc["input_ids"], enc["attention_mask"])
    refs = [reference_model(a, base_for(a)) for a in adapters]
    prepared = [prepare(own, f"a{i}", a) for i, a in enumerate(adapters)]
    for a, f, k in zip(adapters, prepared, kinds):
        assert f.form == "own" and f.pages < f.rank
        assert f.pages == math.ceil(own_numel(384, 384, k["rank"], k["levels"]) / 768)  # every MiniLM shape alike
    assert [f.pages for f in prepared] == [8, 5, 6] and [f.rank for f in prepared] == [16, 14, 20]

    def check(slots, which):  # row 2 is the base
        got = own.forward(inputs, slots)
        with torch.no_grad():
            for row, k in which.items():
                assert_close(got[row]["logits"], refs[k](*(t[row : row + 1] for t in inputs))[0])
        assert set(got[2]) == {"embeddings"}

    tier.write(9, prepared[0])  # taken first, freed below: its 8 pages open a gap at the front
    for slot, f in enumerate(prepared, start=1):
        tier.write(slot, f)
    check([1, 2, 0, 3], {0: 0, 1: 1, 3: 2})
    check([2, 2, 0, 2], {0: 1, 1: 1, 3: 1})  # one own adapter on every adapted row
    tier.free(9)
    free = tier.pool.pages - tier.pool.used
    big = dataclasses.replace(prepared[0], pages=free)  # needs every free page: compacts first
    tier.write(4, big)
    assert tier.pool.free == 0
    check([4, 3, 0, 1], {0: 0, 1: 2, 3: 0})
    # Serving own slots never folded them; a merged copy folds on demand (from the packed own
    # factors), equal to the artifact's own fold and answering like the explicit model.
    assert not any(f.factors.folded for f in prepared)
    for a, f in zip(adapters[:2], prepared[:2]):
        want = a.folded_all()
        assert sorted(f.factors) == sorted(want)
        for t, (la, lb) in want.items():
            assert_close(f.factors[t][1] @ f.factors[t][0], lb @ la)
    merged = own.build_merged(prepared[1].factors)
    got = own.forward_merged(merged, prepared[1].head, inputs)
    with torch.no_grad():
        assert_close(got[0]["logits"], refs[1](*(t[0:1] for t in inputs))[0])
    assert TorchEngine("minilm", device="cpu", slot_form="own", kernel=grouped_lora).slot_form == "folded"
    assert prepare(TorchEngine("minilm", device="cpu", slot_form="folded"), "a0", adapters[0]).form == "folded"
    with pytest.raises(ConfigError, match="unknown slot_form 'unfolded': valid forms are auto, folded, own"):
        ServeConfig(slot_form="unfolded")


def test_the_bound_check_reads_own_factors_and_folds_only_past_the_bound(tmp_path, monkeypatch):
    """An adapter served from its own factors is checked from them (their bound on max |ΔW|),
    not from a fold: a sound adapter passes without one; one whose delta is past what a layer
    can hold is folded, checked exactly and refused by layer; a non-finite factor is refused
    by layer before any fold. A folded adapter's bound is taken per layer shape, equal to the
    per-layer formula. `prepare` ends with this check: it refuses the same adapters."""
    import importlib

    from runtime.adapters import check_folded, folded_bounds, prepare
    from runtime.engine import TorchEngine
    from wara_train.errors import AdapterError

    prepare_module = importlib.import_module("runtime.adapters.prepare")

    def unchecked(engine, name, adapter):
        """What `prepare` makes before its bound check (the check is what this test calls)."""
        with monkeypatch.context() as m:
            m.setattr(prepare_module, "check_folded", lambda name, folded: None)
            return prepare(engine, name, adapter)

    eng = TorchEngine("minilm", device="cpu", slot_form="own")
    a = random_adapter("minilm", tmp_path / "a", seed=0, rank=4, levels=1)
    sound = unchecked(eng, "sound", a)
    check_folded("sound", sound)
    assert not sound.factors.folded
    assert not prepare(eng, "sound", a).factors.folded
    t = a.config.target_modules[3]
    block = next(iter(a.factors[t]))
    a.factors[t][block][1].mul_(1e8)
    big = unchecked(eng, "big", a)
    with pytest.raises(AdapterError, match=f"adapter 'big': the delta of {t} reaches"):
        check_folded("big", big)
    assert big.factors.folded
    with pytest.raises(AdapterError, match=f"adapter 'big': the delta of {t} reaches"):
        prepare(eng, "big", a)
    a.factors[t][block][1].view(-1)[0] = float("nan")
    broken = unchecked(eng, "nan", a)
    with pytest.raises(AdapterError, match=f"adapter 'nan': the factors of {t} are not finite"):
        check_folded("nan", broken)
    assert not broken.factors.folded
    with pytest.raises(AdapterError, match=f"adapter 'nan': the factors of {t} are not finite"):
        prepare(eng, "nan", a)
    # Folded slots: the per-shape bound equals the per-layer formula and bounds max |B A|.
    folded = TorchEngine("minilm", device="cpu", slot_form="folded")
    sound = unchecked(folded, "sound", random_adapter("minilm", tmp_path / "b", seed=1, rank=4, levels=1))
    bounds = folded_bounds(sound.factors)
    for mod, (la, lb) in sound.factors.items():
        want = float((lb.double().abs().amax(dim=0) * la.double().abs().amax(dim=1)).sum())
        assert bounds[mod] == pytest.approx(want, rel=1e-5) and float((lb.double() @ la.double()).abs().max()) <= want
    check_folded("sound", sound)
    with pytest.raises(AdapterError, match=f"adapter 'nan': the folded factors of {t} are not finite"):
        check_folded("nan", unchecked(folded, "nan", a))
    with pytest.raises(AdapterError, match=f"adapter 'nan': the folded factors of {t} are not finite"):
        prepare(folded, "nan", a)


@pytest.mark.slow
def test_onnxruntime_mixed_batches_bind_resident_stacks_kept_in_step_with_the_pool(tmp_path):
    """The onnxruntime engine keeps one stack per layer input with row s = slot s, written as
    slots are written: a mixed batch binds those arrays as they are (no per-batch copy), and
    every answer equals the PyTorch engine's; a freed slot's row is zeroed and reused, a new slot
    past the rows or a higher rank rebuilds the stacks; a batch whose ranks are far below the
    stacks' rank copies its own adapters instead."""
    from runtime.adapters import DeviceTier, prepare
    from runtime.engine import TorchEngine
    from runtime.ort_engine import OrtEngine

    adapters = [random_adapter("minilm", tmp_path / f"s{k}", rank=r, seed=40 + k) for k, r in enumerate((2, 4, 1, 8))]
    ort = OrtEngine("minilm")
    ref = TorchEngine("minilm", device="cpu", slot_form="folded")
    tiers = {e: DeviceTier(e) for e in (ort, ref)}
    enc = MiniLMTokenizer(max_length=12)(["one text", "another text here", "a base row", "and a fourth"])
    inputs = (enc["input_ids"], enc["attention_mask"])

    def same(slots):
        for got, want in zip(ort.forward(inputs, slots), ref.forward(inputs, slots)):
            assert got.keys() == want.keys()
            for k in got:
                assert_close(got[k], want[k])

    def write(slot, k):
        for e in (ort, ref):
            tiers[e].write(slot, prepare(e, f"s{k}", adapters[k]))

    def stack():
        return next(iter(ort._resident.values()))

    write(1, 0)
    write(2, 1)
    assert ort._resident_rank == 16 and stack().shape[0] == 4  # row 0 is the base's zeros; rows double as they grow
    seen = []
    run = ort.session.run
    ort.session.run = lambda out, feeds: (seen.append(feeds), run(out, feeds))[1]
    same([1, 2, 0, 1])
    assert all(seen[-1][k] is v for k, v in ort._resident.items())  # bound as they are
    write(5, 2)  # a slot past the rows: rebuilt with rows doubled
    assert stack().shape[0] == 8 and ort._resident_rank == 16
    same([5, 2, 0, 1])
    tiers[ort].free(2)
    tiers[ref].free(2)
    assert not any(v[2].any() for v in ort._resident.values())  # a freed row is zeroed
    write(2, 3)  # rank 8 folds to 32: the stacks' rank is raised
    assert ort._resident_rank == 32
    same([2, 1, 0, 5])
    same([1, 5, 0, 1])  # ranks 8 and 4 against stacks of 32: this batch copies its own
    assert not any(seen[-1][k] is v for k, v in ort._resident.items())
    assert stack().shape[0] == 8  # a higher rank alone keeps the rows
    ort.pages = 16  # as if the pool were so small that stacks of 16 rows x rank 32 outgrew twice it
    write(9, 0)  # past the rows: a rebuild, which finds them too big
    assert ort._resident == {}  # dropped: every mixed batch copies its own adapters
    same([9, 2, 0, 1])


@pytest.mark.slow
def test_rank_aware_slots_serve_mixed_ranks_in_one_batch(tmp_path):
    """Ranks 2, 4, 8 and 16 (folded: 8, 16, 32 and 64 pages) share one batch with a base row,
    in both engines (PyTorch with the native op and with the pure kernel; onnxruntime), each row equal to its adapter's explicit model. Then a freed run at the
    front and the free tail are too small apart for a 16-page adapter but enough together: the
    pool compacts (moving resident adapters) and every answer stays exact."""
    from runtime.adapters import DeviceTier, NoRoom, prepare
    from runtime.engine import TorchEngine
    from runtime.ort_engine import OrtEngine

    adapters = [random_adapter("minilm", tmp_path / f"r{r}", rank=r, seed=r) for r in (2, 4, 8, 16)]
    page = TorchEngine("minilm", device="cpu", device_budget_mb=1).page_bytes
    budget = 130 * page / 2**20  # 130 pages: the four take 120
    from runtime.kernels import grouped_lora

    engines = [TorchEngine("minilm", device_budget_mb=budget, device="cpu", slot_form="folded"),  # the native sgmv op
               TorchEngine("minilm", device_budget_mb=budget, device="cpu", kernel=grouped_lora),
               OrtEngine("minilm", device_budget_mb=budget)]
    assert engines[0].kernel_name.startswith("native sgmv")
    enc = MiniLMTokenizer(max_length=16)(["hello there", "what is the weather like today", "a third text", "four", "five"])
    inputs = (enc["input_ids"], enc["attention_mask"])
    refs = [reference_model(a, base_for(a)) for a in adapters]

    def check(engine, rows):  # rows: (slot, adapter index) for rows 0, 1, 3, 4; row 2 is the base
        slots = [rows[0][0], rows[1][0], 0, rows[2][0], rows[3][0]]
        got = engine.forward(inputs, slots)
        with torch.no_grad():
            for row, (_, k) in zip((0, 1, 3, 4), rows):
                assert_close(got[row]["logits"], refs[k](*(t[row : row + 1] for t in inputs))[0])
        assert set(got[2]) == {"embeddings"}  # the base row answers as the base

    for e in engines:
        assert e.pages == 130
        tier = DeviceTier(e)
        folded = [prepare(e, f"r{r}", a) for r, a in zip((2, 4, 8, 16), adapters)]
        assert [f.rank for f in folded] == [8, 16, 32, 64]
        for slot, f in enumerate(folded, start=1):
            tier.write(slot, f)
        assert tier.pool.runs == {1: (0, 8), 2: (8, 16), 3: (24, 32), 4: (56, 64)}
        check(e, [(1, 0), (2, 1), (3, 2), (4, 3)])
        tier.free(1)  # free: 8 pages at the front, 10 at the end
        tier.write(5, folded[1])  # 16 pages: only after compaction
        assert tier.pool.runs == {2: (0, 16), 3: (16, 32), 4: (48, 64), 5: (112, 16)}
        check(e, [(5, 1), (2, 1), (3, 2), (4, 3)])
        with pytest.raises(NoRoom, match="2 free pages"):
            tier.write(6, folded[2])  # 32 pages: the pool has 2 left
        check(e, [(4, 3), (3, 2), (2, 1), (5, 1)])  # a refused write changed nothing
