"""Lazy loading from the adapter root (issue 12, first part): with ``preload = false`` the server
is ready before any adapter is read; a request for an adapter on disk loads it and is answered,
concurrent first requests load it once, an explicit unload keeps it NOT_FOUND, and
RepositoryIndex says where each adapter is."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch
from helpers import tol

import tiny_models
from exporter.common import base_for
from exporter.verify import reference_model
from runtime.adapters import prepare
from runtime.auth import Tenant
from runtime.config import ServeConfig
from runtime.errors import Overloaded
from runtime.kserve import inference_pb2 as pb
from runtime.kserve import inference_pb2_grpc as pb_grpc
from runtime.server import create_server
from runtime.wire import decode_outputs
from wara_train.artifact import load_adapter
from wara_train.basespec import resolve_base
from wara_train.synthetic import random_adapter

C = grpc.StatusCode
TEXT = "the movie was really good"
NAMES = [f"a{i}" for i in range(10)]


@pytest.fixture(scope="module")
def served(tmp_path_factory, live_servers):
    tmp = tmp_path_factory.mktemp("lazy")
    bert = tiny_models.make_bert_classifier(tmp / "bert")
    spec = resolve_base(f"hf:{bert}", name="b")
    root = tmp / "adapters"
    for k, name in enumerate(NAMES):
        random_adapter(spec, root / name, rank=2 + 2 * (k % 2), seed=50 + k)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"")
    config = ServeConfig(bases=(f"b=hf:{bert}",), backend="torch", port=0, adapter_root=str(root), preload=False,
                         max_delay_ms=20.0, auto_merge=False)
    server, port, channel = live_servers.start(config)
    return {"service": server.service, "stub": pb_grpc.GRPCInferenceServiceStub(channel), "root": root, "bert": bert}


def request(name: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=name)
    req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(TEXT.encode())
    return req


def reference(served, name: str) -> np.ndarray:
    from transformers import AutoTokenizer

    adapter = load_adapter(served["root"] / name)
    model = reference_model(adapter, base_for(adapter))
    enc = AutoTokenizer.from_pretrained(served["bert"])([TEXT], return_tensors="pt")
    with torch.no_grad():
        return model(enc["input_ids"], enc["attention_mask"])[0].numpy()


def states(served) -> dict[str, tuple[str, str]]:
    return {m.name: (m.state, m.reason) for m in served["stub"].RepositoryIndex(pb.RepositoryIndexRequest()).models}


def test_ready_before_any_adapter_is_read(served):
    service = served["service"]
    assert service.ready and not service.repository.current
    index = states(served)
    assert all(index[n][0] == "UNAVAILABLE" and index[n][1].startswith("on disk") for n in NAMES)
    assert index["b"] == ("READY", "")


def test_concurrent_first_requests_load_once(served):
    service, stub = served["service"], served["stub"]
    loads = service.repository.stats["loads"]
    results, errors = [], []

    def call():
        try:
            results.append(decode_outputs(stub.ModelInfer(request("a3"), timeout=60))["logits"][0])
        except grpc.RpcError as e:  # pragma: no cover - reported below
            errors.append(e.code())

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 16
    assert service.repository.stats["loads"] == loads + 1
    rtol, atol = tol(torch.float32)
    want = reference(served, "a3")
    for got in results:
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    state, reason = states(served)["a3"]
    assert state == "READY" and (reason.startswith("on device") or reason.startswith("in host"))
    assert states(served)["a4"][0] == "UNAVAILABLE"  # only what was asked for is read


def test_unload_keeps_it_not_found_until_loaded(served):
    stub = served["stub"]
    stub.ModelInfer(request("a5"))
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="a5"))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request("a5"))
    assert info.value.code() == C.NOT_FOUND
    assert states(served)["a5"] == ("UNAVAILABLE", "unloaded")
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="a5"))  # from the root
    np.testing.assert_allclose(decode_outputs(stub.ModelInfer(request("a5")))["logits"][0], reference(served, "a5"),
                               rtol=tol(torch.float32)[0], atol=tol(torch.float32)[1])


def test_broken_adapter_on_disk_fails_its_requests_only(served):
    stub = served["stub"]
    for _ in range(2):  # a failed load is tried again by the next request, and fails the same way
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request("broken"))
        assert info.value.code() == C.INVALID_ARGUMENT and "broken" in info.value.details()
        assert "/" not in info.value.details().split("'broken'")[-1]  # no server path
    assert "broken" not in served["service"].repository.current
    assert stub.ModelInfer(request("a6")).model_name == "a6"


def test_a_tenant_cannot_load_another_tenants_adapter(served):
    service = served["service"]
    other = Tenant("globex", adapters=("g-*",), tokens=("sha256:" + "0" * 64,))
    assert not service.repository.needs_load("a7", other)
    assert service.repository.needs_load("a7")
    assert "a7" not in service.repository.current


def test_lora_requests_info_gauge(served):
    """The gateway gauge names the adapters with running or waiting requests (none when idle)
    and the adapter slots."""
    text = served["service"].metrics.text().decode()
    line = next(l for l in text.splitlines() if l.startswith("wara_lora_requests_info{"))
    engine, device = served["service"].engines["b"], served["service"].repository.device["b"]
    assert device.capacity(8) == engine.pages // 8  # rank-8 adapters the pool holds
    assert f'max_lora="{device.capacity()}"' in line and 'running_lora_adapters=""' in line and 'waiting_lora_adapters=""' in line
    service = served["service"]
    with service.gauges._lock:  # as a queued request for a3 leaves it
        service.gauges._values[(id(service.metrics.waiting), "a3")] = 1
    try:
        assert 'waiting_lora_adapters="a3"' in service.metrics.text().decode()
    finally:
        with service.gauges._lock:
            service.gauges._values[(id(service.metrics.waiting), "a3")] = 0


def test_a_host_budget_smaller_than_one_adapter_is_a_clear_refusal(served, tmp_path):
    """RESOURCE_EXHAUSTED naming the budget, at once (no hang), and nothing changes."""
    from runtime.service import Service

    config = ServeConfig(bases=(f"b=hf:{served['bert']}",), backend="torch", adapter_root=str(served["root"]),
                         preload=False, host_budget_mb=0.001, auto_merge=False)
    service = Service(config)
    try:
        t0 = time.perf_counter()
        with pytest.raises(Overloaded, match="host_budget_mb"):
            service.predict("a1", {"text": np.array([TEXT.encode()], dtype=object)})
        assert time.perf_counter() - t0 < 10 and not service.repository.current
    finally:
        service.drain()


def test_host_tier_keeps_no_copy_of_root_files_and_refolds_from_disk(served, tmp_path):
    """Adapters from the root keep no copy of their files in memory: an adapter evicted from the
    host tier is folded again from disk, and answers as before; one whose files changed on disk
    since it was loaded fails its requests with a message to reload it (never the new content
    under the old version)."""
    import shutil

    from runtime.service import Service

    root = tmp_path / "root"
    for name in ("a1", "a2", "a3"):
        shutil.copytree(served["root"] / name, root / name)
    probe = Service(ServeConfig(bases=(f"b=hf:{served['bert']}",), backend="torch", adapter_root=str(root),
                                auto_merge=False, preload=True))
    one = max(v.nbytes for v in probe.repository.current.values())
    pages = max(v.pages for v in probe.repository.current.values()) * probe.engines["b"].page_bytes
    assert all(callable(v.source) for v in probe.repository.current.values())
    probe.drain()
    config = ServeConfig(bases=(f"b=hf:{served['bert']}",), backend="torch", adapter_root=str(root),
                         device_budget_mb=1.2 * pages / 2**20, host_budget_mb=1.5 * one / 2**20, auto_merge=False)
    service = Service(config)
    x = {"text": np.array([TEXT.encode()], dtype=object)}
    try:
        first = {n: service.predict(n, x)[1]["logits"][0] for n in ("a1", "a2", "a3")}
        assert service.repository.stats["host_evictions"] > 0
        for n in ("a1", "a2", "a3"):  # folded again from disk where evicted; the same answers
            np.testing.assert_allclose(service.predict(n, x)[1]["logits"][0], first[n], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(first["a2"], reference(served, "a2"), rtol=tol(torch.float32)[0],
                                   atol=tol(torch.float32)[1])
        shutil.rmtree(root / "a1")
        shutil.copytree(served["root"] / "a9", root / "a1")  # other content under the same name
        service.predict("a2", x), service.predict("a3", x)  # a1 leaves the host tier and its slot
        assert service.repository.current["a1"].adapter is None  # evicted: its next batch reads the root
        with pytest.raises(Exception, match="changed or vanished under the adapter root"):
            service.predict("a1", x)
        service.load_now("a1")  # an explicit load serves the new content
        np.testing.assert_allclose(service.predict("a1", x)[1]["logits"][0], reference(served, "a9"),
                                   rtol=tol(torch.float32)[0], atol=tol(torch.float32)[1])
    finally:
        service.drain()


def test_tier_metrics(served):
    """Resident counts and bytes per tier, and hits and misses, as the scrape sees them."""
    stub, service = served["stub"], served["service"]
    stub.ModelInfer(request("a8"))
    stub.ModelInfer(request("a8"))
    text = service.metrics.text().decode()

    def value(line_start: str) -> float:
        return float(next(l for l in text.splitlines() if l.startswith(line_start)).split()[-1])

    on_disk = sum(1 for n in NAMES + ["broken"] if n not in service.repository.current)
    assert value('wara_adapters_resident{tier="disk"}') == on_disk
    assert value('wara_adapters_resident{tier="host"}') == len(service.repository.current)
    assert value('wara_adapter_bytes_resident{tier="host"}') == sum(v.nbytes for v in service.repository.current.values()
                                                                   if v.adapter is not None)
    assert value('wara_adapters_resident{tier="device"}') >= 1
    assert value('wara_kernel_info{base="b",kernel="native sgmv') == 1  # the op serves, and says so
    assert value('wara_adapter_tier_lookups_total{result="hit",tier="device"}') >= 1  # a8's second batch
    assert value('wara_adapter_tier_lookups_total{result="miss",tier="device"}') >= 1  # its first
    import os

    from runtime.native import pack_cache_stats

    stats = pack_cache_stats()
    for name in ("entries", "bytes", "capacity_bytes"):  # the CPU op's packed factors, as the op counts them
        assert value(f"wara_pack_cache_{name} ") == stats[name]
    assert value('wara_pack_cache_lookups_total{result="hit"}') == stats["hits"]
    assert value('wara_pack_cache_lookups_total{result="miss"}') == stats["misses"]
    assert stats["capacity_bytes"] == 64 << 20 or "WARA_PACK_CACHE_MB" in os.environ


def test_start_indexes_configs_and_headers_only(served, tmp_path):
    """An adapter whose tensor bytes are garbage (its config and header length intact) is listed
    as on disk at start, so start-up read no tensor; its first request reads them and fails
    with the load's own error, and nothing else changes."""
    import shutil

    from runtime.service import Service

    root = tmp_path / "root"
    shutil.copytree(served["root"] / "a1", root / "good")
    shutil.copytree(served["root"] / "a2", root / "garbled")
    weights = root / "garbled" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = b"\xff" * (len(data) - header)  # NaN patterns where the tensors were
    weights.write_bytes(bytes(data))
    service = Service(ServeConfig(bases=(f"b=hf:{served['bert']}",), backend="torch", adapter_root=str(root),
                                  auto_merge=False))
    try:
        assert service.ready and not service.repository.current and len(service.repository.catalog) == 2
        rows = {r.name: (r.state, r.reason) for r in service.index_rows()}
        assert rows["garbled"][0] == "UNAVAILABLE" and rows["garbled"][1].startswith("on disk (loads on its first")
        x = {"text": np.array([TEXT.encode()], dtype=object)}
        with pytest.raises(Exception, match="garbled.*NaN or Inf"):
            service.predict("garbled", x)
        assert "garbled" not in service.repository.current
        np.testing.assert_allclose(service.predict("good", x)[1]["logits"][0], reference(served, "a1"),
                                   rtol=tol(torch.float32)[0], atol=tol(torch.float32)[1])
    finally:
        service.drain()


def test_a_device_budget_smaller_than_one_adapter_is_a_clear_refusal(served):
    """RESOURCE_EXHAUSTED over gRPC, naming device_budget_mb, at once; the server keeps serving."""

    engine = served["service"].engines["b"]
    need = prepare(engine, "a1", load_adapter(served["root"] / "a1")).pages  # rank 4 (a0: rank 2, half as many)
    config = ServeConfig(bases=(f"b=hf:{served['bert']}",), backend="torch", adapter_root=str(served["root"]),
                         device_budget_mb=(need - 1) * engine.page_bytes / 2**20, auto_merge=False, port=0)
    server, port = create_server(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    try:
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request("a1"), timeout=30)
        assert info.value.code() == C.RESOURCE_EXHAUSTED and "device_budget_mb" in info.value.details()
        assert time.perf_counter() - t0 < 10 and "a1" not in server.service.repository.current
        assert stub.ModelInfer(request("a0"), timeout=30).model_name == "a0"  # rank 2: fits
    finally:
        channel.close()
        server.stop(grace=1.0)


@pytest.mark.slow
def test_no_eviction_of_a_held_adapter_under_a_pool_of_two(served, tmp_path):
    """A device pool that holds two adapters, 16 concurrent gRPC clients over 10 adapters: every
    answer is its adapter's, and no adapter is ever evicted while a queued or running request
    holds it (checked at every eviction)."""

    root = tmp_path / "root"
    spec = resolve_base(f"hf:{served['bert']}", name="b")
    names = [f"p{i}" for i in range(10)]
    for k, name in enumerate(names):
        random_adapter(spec, root / name, rank=2, seed=200 + k)
    engine = served["service"].engines["b"]
    pages = prepare(engine, names[0], load_adapter(root / names[0])).pages  # each: all are rank 2 at J = 1
    config = ServeConfig(bases=(f"b=hf:{served['bert']}",), backend="torch", adapter_root=str(root),
                         device_budget_mb=2.5 * pages * engine.page_bytes / 2**20, auto_merge=False, port=0,
                         max_delay_ms=2.0)
    server, port = create_server(config)
    device = server.service.repository.device["b"]
    evicted, held = [], []
    original = device.evict

    def checked(slot):
        v = device.table[slot]
        (held if v.leases else evicted).append(v.name)
        original(slot)

    device.evict = checked
    want = {}
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(served["bert"])([TEXT], return_tensors="pt")
    for name in names:
        adapter = load_adapter(root / name)
        with torch.no_grad():
            want[name] = reference_model(adapter, base_for(adapter))(enc["input_ids"], enc["attention_mask"])[0].numpy()
    errors, answers = [], []

    def client(k: int) -> None:
        rng = np.random.default_rng(k)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(12):
                name = names[int(rng.integers(len(names)))]
                try:
                    got = decode_outputs(stub.ModelInfer(request(name), timeout=60))["logits"][0]
                    answers.append((name, got))
                except grpc.RpcError as e:
                    errors.append((name, e.code(), e.details()))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop(grace=1.0)
    assert not errors, errors[:3]
    assert len(answers) == 16 * 12
    for name, got in answers:
        np.testing.assert_allclose(got, want[name], rtol=tol(torch.float32)[0], atol=tol(torch.float32)[1])
    assert not held, f"evicted while held: {held[:5]}"
    assert len(evicted) >= 10  # ten adapters took turns in a pool of two
    assert device.pool.used <= 20
