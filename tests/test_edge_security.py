"""Security at the gRPC edge, against a real server on 127.0.0.1 port 0: refusal logs carry no
metadata value and stay bounded in volume; a call without a valid credential is refused before
its body is read (no parsing, no memory kept), while a call only a client certificate can
identify still reaches its handler; and an open /metrics port is warned of."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from certs import Authority

import runtime.server
import tiny_models
from runtime.auth import Authenticator, RefusalLog, Tenant, Unauthenticated, hash_token, metadata_keys, new_token
from runtime.config import ServeConfig
from runtime.kserve import inference_pb2 as pb
from runtime.kserve import inference_pb2_grpc as pb_grpc
from runtime.server import create_server
from wara_train.basespec import resolve_base
from wara_train.synthetic import random_adapter

C = grpc.StatusCode
ROOT = Path(__file__).resolve().parent.parent
TEXT = b"the movie was really good"
SECRET = new_token()  # a real tenant's token, sent under keys the server does not read it from
WRONG_KEYS = ("x-api-key", "token", "api-key", "x-auth-token", "authorization-token")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edge")
    bert = tiny_models.make_bert_classifier(tmp / "bert")
    spec = resolve_base(f"hf:{bert}", name="b")
    root = tmp / "adapters"
    random_adapter(spec, root / "acme-a", rank=2, seed=3)
    ca = Authority(tmp / "pki")
    return {"bert": bert, "root": root, "ca": ca, "server_cert": ca.server(),
            "acme_cert": ca.client("acme-client", "Acme"), "stranger_cert": ca.client("stranger")}


TENANTS = ({"name": "acme", "adapters": ["acme-*"], "tokens": [hash_token(SECRET)]},)


def config(world, **extra) -> ServeConfig:
    return ServeConfig(bases=(f"b=hf:{world['bert']}",), backend="torch", port=0, adapter_root=str(world["root"]),
                       max_delay_ms=1.0, auto_merge=False, tenants=extra.pop("tenants", TENANTS), **extra)


class Recorder:
    """Wraps `runtime.wire.lenient_deserializer` (as the server builds its handlers) and records
    each request it deserializes: (request type, bytes)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.real = runtime.server.lenient_deserializer

    def __call__(self, request_type):
        inner = self.real(request_type)

        def deserialize(data: bytes):
            self.calls.append((request_type.__name__, len(data)))
            return inner(data)

        return deserialize


@pytest.fixture
def recorded(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(runtime.server, "lenient_deserializer", recorder)
    return recorder


def infer_request(model: str = "acme-a") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(TEXT)
    return req


def code_of(call) -> C:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return C.OK


def secure_channel(port: int, world, client_cert=None) -> grpc.Channel:
    pair = [p.read_bytes() for p in client_cert] if client_cert else [None, None]
    creds = grpc.ssl_channel_credentials(world["ca"].cert.read_bytes(), private_key=pair[1], certificate_chain=pair[0])
    return grpc.secure_channel(f"localhost:{port}", creds, options=[("grpc.use_local_subchannel_pool", 1)])


# -- refusal logs: no metadata value, bounded volume -------------------------------------------

def test_refusal_logs_name_metadata_keys_never_values(world, caplog):
    server, port = create_server(config(world))
    server.auth.refusals.burst = 1000  # every refusal logged, so that every line is checked
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, caplog.at_level(logging.WARNING, logger="wara.serve"):
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            sent = [[(key, SECRET)] for key in WRONG_KEYS]
            sent += [[("authorization-bin", SECRET.encode())], [("authorization", SECRET)],  # malformed: no "Bearer"
                     [("authorization", f"Bearer {SECRET}x")], [("x-api-key", f"Bearer {SECRET}")]]
            for md in sent:
                assert code_of(lambda: stub.ModelInfer(infer_request(), metadata=md)) == C.UNAUTHENTICATED
                assert code_of(lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=md)) \
                    == C.UNAUTHENTICATED
            # the right token under the right key works (and is not logged either)
            own = [("authorization", f"Bearer {SECRET}"), ("x-api-key", SECRET)]
            assert stub.ModelInfer(infer_request(), metadata=own).model_name == "acme-a"
            assert code_of(lambda: stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="acme-a"),
                                                              metadata=own)) == C.PERMISSION_DENIED
        lines = [r.getMessage() for r in caplog.records if r.name == "wara.serve"]
        refused = [line for line in lines if line.startswith("refused ")]
        assert len(refused) == 19
        assert "x-api-key" in refused[0] and "missing_credentials" in refused[0]
        assert "PermissionDenied" not in refused[-1] and "not_admin" in refused[-1]
        for fragment in (SECRET, SECRET[5:21], SECRET[-16:]):
            assert fragment not in caplog.text
            assert not any(fragment in repr(r.args) for r in caplog.records)
    finally:
        server.stop(0)


def test_refusal_log_volume_is_bounded_and_summarised(world, caplog):
    server, port = create_server(config(world))
    interval = server.auth.refusals.interval = 2.0  # a short interval, to see its summary within the test
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, caplog.at_level(logging.WARNING, logger="wara.serve"):
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            big = [(f"x-key-{i}", "v" * 1000) for i in range(4)]  # 4 kB of metadata per call
            t0 = time.monotonic()
            for _ in range(200):
                assert code_of(lambda: stub.ModelInfer(infer_request(), metadata=big)) == C.UNAUTHENTICATED
            intervals = math.ceil((time.monotonic() - t0) / interval)  # 1 unless this machine is very slow
            time.sleep(interval + 0.5)  # the last interval ends: its summary line
        text = "".join(r.getMessage() + "\n" for r in caplog.records if r.name == "wara.serve")
        refused = [r for r in caplog.records if r.getMessage().startswith("refused ")]
        summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("suppressed ")]
        assert len(refused) <= 10 * intervals and 1 <= len(summaries) <= intervals
        assert len(refused) + sum(int(line.split()[1]) for line in summaries) == 200
        assert summaries[0].endswith("refusal log lines (at most 10 per 2s; wara_refusals_total counts every refusal)")
        assert len(text) < 4000 * intervals, len(text)  # was 1.5 MB for 200 refusals with less metadata
        assert 'wara_refusals_total{reason="missing_credentials"} 200.0' in server.service.metrics.text().decode()
    finally:
        server.stop(0)


def test_refusal_log_without_an_event_loop_summarises_before_its_next_line(caplog):
    log = RefusalLog(logging.getLogger("wara.serve"), burst=2, interval=0.2)
    error = Unauthenticated("missing_credentials", "no credential")
    with caplog.at_level(logging.WARNING, logger="wara.serve"):
        for _ in range(5):
            log.refused("ModelInfer", "ipv4:127.0.0.1:1", "missing_credentials", error, [("x-api-key", SECRET)])
        time.sleep(0.25)
        log.refused("ModelInfer", "ipv4:127.0.0.1:1", "missing_credentials", error, ())
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" ")[0] for line in lines] == ["refused", "refused", "suppressed", "refused"]
    assert lines[2].startswith("suppressed 3 refusal log lines")
    assert lines[0].endswith("(no credential; metadata keys: x-api-key)") and lines[3].endswith("metadata keys: none)")
    assert SECRET not in caplog.text


def test_metadata_keys_are_bounded():
    md = [(f"k{i:02d}", "v") for i in range(20)] + [("k00", "again"), ("x" * 100, "v")]
    shown = metadata_keys(md)
    assert shown.startswith("k00, k01,") and shown.endswith("(+5 more)") and "v" not in shown.replace("(+5 more)", "")
    assert metadata_keys([("y" * 100, "v")]) == "y" * 40 + "..."


# -- refused before the body is read -----------------------------------------------------------

def vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# Sends N requests of MB megabytes at once from another process (so that this process's memory
# is the server's alone), each with one of the credentials that are not valid; prints their codes.
BIG_CLIENT = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
import grpc
port, mb, n, secret = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
credentials = [(), (("authorization", "Bearer wara_not-a-token"),), (("x-api-key", secret),),
               (("authorization", "Basic " + secret),)]
from runtime.kserve import inference_pb2 as pb
request = pb.ModelInferRequest(model_name="acme-a")
request.inputs.add(name="input_ids", datatype="INT64", shape=[1, (mb << 20) // 8])
request.raw_input_contents.append(bytes(mb << 20))
body = request.SerializeToString()
channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 256 << 20)])
call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                           response_deserializer=lambda b: b)
def send(i):
    try:
        call(body, metadata=credentials[i % len(credentials)], timeout=60)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name
with ThreadPoolExecutor(n) as pool:
    print(json.dumps(list(pool.map(send, range(n)))))
"""


def send_big(port: int, mb: int, n: int) -> list[str]:
    out = subprocess.run([sys.executable, "-c", BIG_CLIENT, str(port), str(mb), str(n), SECRET], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_unauthenticated_requests_are_refused_before_their_body_is_read(world, recorded):
    server, port = create_server(config(world))
    try:
        assert send_big(port, 1, 4) == ["UNAUTHENTICATED"] * 4  # warm-up: channels, threads, first allocations
        rss = [vm_rss_mb()]
        for _ in range(3):
            assert send_big(port, 48, 8) == ["UNAUTHENTICATED"] * 8  # 8 x 48 MB, within max_message_mb
            rss.append(vm_rss_mb())
        assert recorded.calls == []  # not one of the 28 request bodies was deserialized
        assert max(rss) - rss[0] < 48, rss  # not even one request's bytes held (unread: 0.6-1.1 GB were kept)
        assert server.servicer.admission.nbytes == 0 and server.servicer.admission.inflight == 0
        text = server.service.metrics.text().decode()
        for reason, count in (("missing_credentials", 14), ("unknown_token", 7), ("malformed_header", 7)):
            assert f'wara_refusals_total{{reason="{reason}"}} {count}.0' in text, reason
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # the recorder sees what is deserialized
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ModelInfer(infer_request(), metadata=[("authorization", f"Bearer {SECRET}")]).model_name \
                == "acme-a"
            assert [name for name, _ in recorded.calls] == ["ModelInferRequest"]
            for who in ((), [("authorization", "Bearer wrong")]):
                requests = iter([infer_request()])
                assert code_of(lambda: list(stub.ModelStreamInfer(requests, metadata=who))) == C.UNAUTHENTICATED
            assert code_of(lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="acme-x"),
                                                            metadata=[("authorization", f"Bearer {SECRET}")])) \
                == C.PERMISSION_DENIED  # a tenant's token on an admin method: refused unread too
            assert [name for name, _ in recorded.calls] == ["ModelInferRequest"]
            # methods open to every caller are not screened
            assert stub.ServerReady(pb.ServerReadyRequest(), metadata=[("authorization", "Bearer wrong")]).ready
    finally:
        server.stop(0)


def test_a_call_only_a_client_certificate_identifies_reaches_its_handler(world, recorded, caplog):
    tenants = ({"name": "acme", "adapters": ["acme-*"], "subjects": ["CN=acme-client"]},
               {"name": "ops", "admin": True, "tokens": [hash_token(SECRET)]})
    server, port = create_server(config(world, tenants=tenants, tls_cert=str(world["server_cert"][0]),
                                        tls_key=str(world["server_cert"][1]), tls_client_ca=str(world["ca"].cert)))
    try:
        with caplog.at_level(logging.WARNING, logger="wara.serve"):
            ch = secure_channel(port, world, world["acme_cert"])
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ModelInfer(infer_request()).model_name == "acme-a"  # no token: the certificate decides
            assert len(recorded.calls) == 1
            wrong = [("authorization", "Bearer wara_not-a-token"), ("x-api-key", SECRET)]
            assert code_of(lambda: stub.ModelInfer(infer_request(), metadata=wrong)) == C.UNAUTHENTICATED
            assert len(recorded.calls) == 1  # a token that is wrong is refused unread, certificate or not
            ch.close()
            ch = secure_channel(port, world, world["stranger_cert"])  # a valid certificate no tenant lists
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            assert code_of(lambda: stub.ModelInfer(infer_request(), metadata=[("x-api-key", SECRET)])) \
                == C.UNAUTHENTICATED  # by the handler, which alone sees the certificate
            assert len(recorded.calls) == 2
            ch.close()
        refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
        assert len(refused) == 2 and ": unknown_token (" in refused[0] and ": unknown_subject (" in refused[1]
        assert SECRET not in caplog.text
    finally:
        server.stop(0)


@pytest.mark.parametrize("certificates", [False, True])
def test_screen_refuses_exactly_where_identify_would(certificates):
    auth = Authenticator([Tenant("acme", adapters=["acme-*"], tokens=[hash_token(SECRET)]),
                          *([Tenant("cert", adapters=["c-*"], subjects=["CN=c"])] if certificates else [])])
    cases = [(), [("x-api-key", SECRET)], [("authorization", SECRET)], [("authorization", "Bearer nope")],
             [("authorization", f"Bearer {SECRET}")], [("authorization-bin", SECRET.encode())]]
    for md in cases:
        try:
            screened = auth.screen(md, certificates=certificates)
        except Unauthenticated as e:
            screened = e.reason
        try:
            identified = auth.identify(md, {}).name
        except Unauthenticated as e:
            identified = e.reason
        if certificates and not any(k == "authorization" for k, _ in md):
            assert screened is None  # a certificate may identify it: the handler decides
        else:
            assert getattr(screened, "name", screened) == identified
    no_subjects = Authenticator([Tenant("acme", adapters=["acme-*"], tokens=[hash_token(SECRET)])])
    with pytest.raises(Unauthenticated) as e:  # a certificate, but no tenant lists any subject
        no_subjects.screen([], certificates=True)
    assert e.value.reason == "unknown_subject"


# -- the metrics port --------------------------------------------------------------------------

@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("::1", False), ("127.0.0.1", False)])
def test_a_metrics_port_off_loopback_is_warned_of(world, caplog, host, warned):
    with caplog.at_level(logging.WARNING, logger="wara.serve"):
        server, _ = create_server(config(world, metrics_port=9464, metrics_host=host))
        server.stop(0)
    assert ("METRICS ON" in caplog.text) is warned
    if warned:
        assert f"METRICS ON {host}:9464 WITHOUT AUTHENTICATION OR TLS" in caplog.text
        assert "tenant" in caplog.text and "metrics_host" in caplog.text
    assert "SERVING ON" not in caplog.text  # the gRPC port is loopback


def test_no_metrics_port_no_warning(world, caplog):
    with caplog.at_level(logging.WARNING, logger="wara.serve"):
        server, _ = create_server(config(world, metrics_host="0.0.0.0"))
        server.stop(0)
    assert "METRICS ON" not in caplog.text
