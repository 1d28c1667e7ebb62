"""The adapter repository seen through a live server: the one name rule, symlinks inside the
adapter root, readiness of adapters whose files changed, and one unreadable adapter in a mixed
batch (issue 26, defects 1, 2, 4 and 6). Real gRPC clients against a server on port 0."""

from __future__ import annotations

import shutil
import threading

import grpc
import numpy as np
import pytest
import torch
from helpers import tol

import tiny_models
from runtime.adapters.prepare import own_bytes
from runtime.auth import hash_token, new_token
from runtime.config import ServeConfig
from runtime.kserve import inference_pb2 as pb
from runtime.kserve import inference_pb2_grpc as pb_grpc
from runtime.wire import decode_outputs
from wara_train.artifact import load_adapter
from wara_train.basespec import resolve_base
from wara_train.synthetic import random_adapter

C = grpc.StatusCode
TEXT = "the movie was really good"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repository")
    bert = tiny_models.make_bert_classifier(tmp / "bert")
    spec = resolve_base(f"hf:{bert}", name="b")
    root = tmp / "adapters"
    for k, name in enumerate(("acme-a", "acme-b", "globex-secret")):
        random_adapter(spec, root / name, rank=2, seed=70 + k)
    (root / "acme-x").symlink_to(root / "globex-secret", target_is_directory=True)  # inside the root
    (root / "acme-y").symlink_to(root / "acme-b", target_is_directory=True)  # the tenant's own
    tokens = {t: new_token() for t in ("acme", "globex", "ops")}
    tenants = ({"name": "acme", "adapters": ["acme-*"], "tokens": [hash_token(tokens["acme"])]},
               {"name": "globex", "adapters": ["globex-*"], "tokens": [hash_token(tokens["globex"])]},
               {"name": "ops", "admin": True, "tokens": [hash_token(tokens["ops"])]})
    return {"tmp": tmp, "bert": bert, "spec": spec, "root": root, "tokens": tokens, "tenants": tenants}


def auth(world, tenant: str) -> tuple:
    return (("authorization", f"Bearer {world['tokens'][tenant]}"),)


def request(name: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=name)
    req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(TEXT.encode())
    return req


def index(stub, metadata) -> dict[str, tuple[str, str, str]]:
    resp = stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=metadata)
    return {m.name: (m.version, m.state, m.reason) for m in resp.models}


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


@pytest.fixture(scope="module")
def tenant_server(world, live_servers):
    config = ServeConfig(bases=(f"b=hf:{world['bert']}",), backend="torch", adapter_root=str(world["root"]),
                         preload=False, max_delay_ms=1.0, auto_merge=False, tenants=world["tenants"])
    server, port, channel = live_servers.start(config)
    return server, pb_grpc.GRPCInferenceServiceStub(channel)


def test_a_name_ending_in_a_newline_is_no_second_model(world, tenant_server):
    """RepositoryModelLoad("acme-a\\n") is refused, and a tenant's lazy load of it finds nothing:
    the name rule matches the whole name."""
    server, stub = tenant_server
    ops, acme = auth(world, "ops"), auth(world, "acme")
    before = index(stub, ops)
    code, details = code_of(lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="acme-a\n"),
                                                              metadata=ops))
    assert code == C.INVALID_ARGUMENT and "invalid adapter name" in details
    code, _ = code_of(lambda: stub.ModelInfer(request("acme-a\n"), metadata=acme))
    assert code == C.NOT_FOUND
    assert not stub.ModelReady(pb.ModelReadyRequest(name="acme-a\n"), metadata=acme).ready
    assert index(stub, ops) == before
    assert "acme-a\n" not in server.service.repository.current
    assert stub.ModelInfer(request("acme-a"), metadata=acme).model_name == "acme-a"  # the real one still serves


def test_a_symlink_inside_the_root_does_not_hand_a_tenant_another_tenants_weights(world, tenant_server):
    """root/acme-x -> globex-secret: acme gets exactly what it gets for a name that does not
    exist; a symlink to acme's own adapter serves; an admin may load either."""
    server, stub = tenant_server
    acme, ops = auth(world, "acme"), auth(world, "ops")
    missing = code_of(lambda: stub.ModelInfer(request("acme-nope"), metadata=acme))
    refused = code_of(lambda: stub.ModelInfer(request("acme-x"), metadata=acme))
    assert refused[0] == missing[0] == C.NOT_FOUND
    assert refused[1] == missing[1].replace("acme-nope", "acme-x")
    assert not stub.ModelReady(pb.ModelReadyRequest(name="acme-x"), metadata=acme).ready
    assert code_of(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="acme-x"), metadata=acme))[0] == C.NOT_FOUND
    assert "acme-x" not in index(stub, acme) and "acme-x" not in server.service.repository.current
    own = stub.ModelInfer(request("acme-y"), metadata=acme)  # a symlink to its own adapter
    assert own.model_version == load_adapter(world["root"] / "acme-b").content_hash
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="acme-x"), metadata=ops)  # an admin's choice
    assert stub.ModelInfer(request("acme-x"), metadata=ops).model_name == "acme-x"
    assert code_of(lambda: stub.ModelInfer(request("acme-x"), metadata=acme))[0] == C.NOT_FOUND  # still not acme's
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="acme-x"), metadata=ops)


@pytest.fixture
def tight(world, tmp_path, live_servers):
    """A server whose host tier and device pool each hold about one adapter of four, over a
    root of copies (the test may change them)."""
    root = tmp_path / "root"
    for k in range(4):
        random_adapter(world["spec"], root / f"t{k}", rank=2, seed=90 + k)
    one = own_bytes(load_adapter(root / "t0"))
    config = ServeConfig(bases=(f"b=hf:{world['bert']}",), backend="torch", adapter_root=str(root), preload=False,
                         max_delay_ms=150.0, auto_merge=False, host_budget_mb=1.5 * one / 2**20)
    probe_server, _, _ = live_servers.start(config)
    engine = probe_server.service.engines["b"]
    pages = 1.5 * 4 * engine.page_bytes  # rank 2 at J = 1: 8 pages an adapter; room for one and a half
    config = ServeConfig(bases=config.bases, backend="torch", adapter_root=str(root), preload=False,
                         max_delay_ms=150.0, auto_merge=False, host_budget_mb=1.5 * one / 2**20,
                         device_budget_mb=2 * pages / 2**20)
    server, _, channel = live_servers.start(config)
    return server, pb_grpc.GRPCInferenceServiceStub(channel), root


def evict_t0(stub) -> None:
    """t0 leaves the host tier and its slot: the others' requests need the room."""
    for name in ("t1", "t2", "t3", "t1"):
        stub.ModelInfer(request(name), timeout=60)


@pytest.mark.parametrize("change", ["replaced", "vanished"])
def test_readiness_tells_the_truth_when_an_adapters_files_change(world, tight, change):
    server, stub, root = tight
    version = stub.ModelInfer(request("t0"), timeout=60).model_version
    evict_t0(stub)
    assert server.service.repository.current["t0"].adapter is None and server.service.repository.current["t0"].slot is None
    shutil.rmtree(root / "t0")
    if change == "replaced":
        random_adapter(world["spec"], root / "t0", rank=2, seed=999)
    assert not stub.ModelReady(pb.ModelReadyRequest(name="t0")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="t0", version=version)).ready
    assert index(stub, ())["t0"][1] == "UNAVAILABLE"
    code, details = code_of(lambda: stub.ModelInfer(request("t0"), timeout=60))
    assert code == C.FAILED_PRECONDITION and "load it again" in details
    assert code_of(lambda: stub.ModelInfer(request("t0"), timeout=60))[0] == C.FAILED_PRECONDITION  # still
    state = index(stub, ())["t0"]
    assert state[1] == "UNAVAILABLE" and "changed or vanished" in state[2]
    assert stub.ModelInfer(request("t1"), timeout=60).model_name == "t1"  # the server keeps serving
    if change == "replaced":  # an admin's load serves the new content, and it is ready again
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="t0"))
        assert stub.ModelReady(pb.ModelReadyRequest(name="t0")).ready
        assert stub.ModelInfer(request("t0"), timeout=60).model_version == load_adapter(root / "t0").content_hash


def test_an_unreadable_adapter_fails_only_its_own_requests_in_a_mixed_batch(world, tight):
    server, stub, root = tight
    stub.ModelInfer(request("t0"), timeout=60)
    evict_t0(stub)
    shutil.rmtree(root / "t0")  # t0 can no longer be read back; nothing has noticed yet
    batches = server.service.batchers["b"].stats
    mixed_before = batches.mixed_batches
    results: dict[str, list] = {"t0": [], "t1": [], "b": []}

    def call(name: str) -> None:
        try:
            out = decode_outputs(stub.ModelInfer(request(name), timeout=60))
            results[name].append(out["logits"][0])
        except grpc.RpcError as e:
            results[name].append(e.code())

    threads = [threading.Thread(target=call, args=(n,)) for n in ("t1", "t0", "b", "t1", "t0", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["t0"] == [C.FAILED_PRECONDITION] * 2
    assert all(isinstance(r, np.ndarray) for r in results["t1"] + results["b"]), results
    assert batches.mixed_batches > mixed_before  # they were batched together
    alone = server.service.predict("t1", {"text": np.array([TEXT.encode()], dtype=object)})[1]["logits"][0]
    for got in results["t1"]:  # the batch's other rows got their own adapter's answer
        np.testing.assert_allclose(got, alone, rtol=tol(torch.float32)[0], atol=tol(torch.float32)[1])
