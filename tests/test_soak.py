"""The server under time and churn, run as users run it: `wara serve` in its own process (so the
clients here never share its GIL), a tiny BERT base, gRPC from this process.

* Shutdown under load: SIGTERM drains (every admitted request completes with the right answer,
  a new one gets UNAVAILABLE, exit 0); a second SIGTERM exits at once with 128 + SIGTERM.
* Soak: 8 client threads x 2,000 requests over 50 adapters while another thread loads, unloads
  and reloads (new content under the same name) every 100 ms. Every answer equals the
  single-request reference of the version it names; NOT_FOUND only for a name that was unloaded.
* 10,000 load/unload cycles over gRPC: the server's RSS ends within 10% of where it stood after
  a warm-up, and an unloaded name leaves the metrics and the health table.

Sizes shrink with WARA_SOAK_REQUESTS (per client) and WARA_SOAK_CYCLES; the figures are printed
(``pytest -s``). The last test is a server bug the soak found (gauges that went negative across
an unload), kept as its regression test.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import tol

import tiny_models
from exporter.common import base_for
from exporter.verify import reference_model
from runtime.kserve import inference_pb2 as pb
from runtime.kserve import inference_pb2_grpc as pb_grpc
from runtime.wire import decode_outputs
from wara_train.artifact import fingerprint, load_adapter, save_adapter
from wara_train.basespec import resolve_base
from wara_train.config import WaraConfig
from wara_train.model import base_weights, inject, wara_layers
from wara_train.synthetic import random_adapters, randomize_factors

C = grpc.StatusCode
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
RTOL, ATOL = tol(torch.float32)
TEXTS = ["the movie was really good", "this food is awful and sad", "it was okay i guess", "hello world",
         "the best hotel but the worst service ."]
NAMES = [f"s{i:02d}" for i in range(50)]
CLIENTS = 8
REQUESTS = int(os.environ.get("WARA_SOAK_REQUESTS", "2000"))  # per client
CYCLES = int(os.environ.get("WARA_SOAK_CYCLES", "10000"))
WARMUP = min(500, CYCLES // 10)
FILES = ("adapter_config.json", "adapter_model.safetensors")


# ------------------------------------------------------------------------------------------
# the world: a tiny BERT, 50 adapters in the adapter root and 50 other contents of the same names


class Reference:
    """Single-request PyTorch outputs (`exporter.verify.reference_model`, the unmerged model) of
    every adapter content, for every text, tokenized by transformers' own tokenizer."""

    def __init__(self, bert: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(bert)
        self.base = None
        self.logits: dict[tuple[str, str], np.ndarray] = {}  # (name, version) -> (len(TEXTS), labels)

    def add(self, name: str, path: Path) -> str:
        adapter = load_adapter(path)
        self.base = self.base if self.base is not None else base_for(adapter)
        model = reference_model(adapter, self.base)
        rows = []
        with torch.no_grad():
            for text in TEXTS:
                enc = self.tok([text], truncation=True, max_length=128, return_tensors="pt")
                rows.append(model(enc["input_ids"], enc["attention_mask"])[0].numpy())
        self.logits[(name, adapter.content_hash)] = np.stack(rows)
        return adapter.content_hash

    def matches(self, name: str, version: str, text: int, got: np.ndarray) -> bool:
        want = self.logits.get((name, version))
        return want is not None and got.shape == want[text].shape and np.allclose(got, want[text], rtol=RTOL, atol=ATOL)


def small_adapter(spec, out: Path, *, seed: int) -> None:
    """A random adapter on the two ``query`` layers only (16 factor tensors instead of 96, at
    rank 8 so its bytes stay those of a real adapter): a load costs the server a few ms, so
    10,000 cycles fit in CI."""
    model = spec.build(5)
    config = WaraConfig(rank=8, alpha=16.0, wavelet="haar", levels=1, target_modules=("query",),
                        modules_to_save=(spec.head,))
    inject(model, config, seed=seed)
    for i, layer in enumerate(wara_layers(model).values()):
        randomize_factors(layer, seed * 1000 + i, std=0.1)
    save_adapter(model, out, base_model=spec.name, labels=[f"label{i}" for i in range(5)],
                 base_fingerprint=fingerprint(base_weights(model, list(wara_layers(model)))), base_source=spec.source)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("soak")
    bert = tiny_models.make_bert_classifier(tmp / "bert")
    spec = resolve_base(f"hf:{bert}", name="b")
    root, variants, single = tmp / "adapters", tmp / "variants", tmp / "single"
    random_adapters(spec, [root / n for n in NAMES], rank=2, seed=100)
    random_adapters(spec, [variants / n for n in NAMES], rank=2, seed=1000)
    random_adapters(spec, [single / "one"], rank=2, seed=7)
    cycle = [tmp / "cycle" / str(k) for k in range(2)]
    for k, path in enumerate(cycle):
        small_adapter(spec, path, seed=20 + k)
    ref = Reference(bert)
    versions = {n: (ref.add(n, root / n), ref.add(n, variants / n)) for n in NAMES}
    ref.add("one", single / "one")
    for path in cycle:
        ref.add("cycle", path)
    assert len({v for pair in versions.values() for v in pair}) == 2 * len(NAMES)  # every content distinct
    return {"tmp": tmp, "bert": bert, "root": root, "variants": variants, "single": single, "cycle": cycle,
            "ref": ref, "versions": versions}


# ------------------------------------------------------------------------------------------
# the server as a process, and talking to it


def connect(port: int) -> grpc.Channel:
    """A channel with a connection of its own (grpc shares one between channels of the same
    target and options unless told not to), as a separate client process would have."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`wara serve --config FILE` in its own process; stderr goes to a log file."""

    def __init__(self, world: dict, name: str, *, adapter_root: Path, **serve) -> None:
        self.metrics_port = free_port()
        settings = {"port": 0, "backend": "torch", "bases": [f"b=hf:{world['bert']}"],
                    "adapter_root": str(adapter_root), "metrics_port": self.metrics_port, **serve}
        config = world["tmp"] / f"{name}.toml"
        config.write_text("[serve]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items()))
        self.log = world["tmp"] / f"{name}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "wara", "serve", "--config", str(config)],
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
        self.port = self._wait_ready()
        self.channel = connect(self.port)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def _wait_ready(self) -> int:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            line = self.proc.stdout.readline()
            if line.startswith("serving on"):
                return int(line.strip().rsplit(":", 1)[1])
            if self.proc.poll() is not None:
                break
        self.proc.kill()
        raise AssertionError(f"the server did not start: {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text()[-n:]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def gauge(self, metric: str, **labels) -> float | None:
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        m = re.search(rf"^{metric}\{{{re.escape(want)}\}} (\S+)$", self.metrics(), re.M)
        return float(m.group(1)) if m else None

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def infer_request(name: str, text: int) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=name)
    req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(TEXTS[text].encode())
    return req


def load_request(name: str, path: Path | None = None) -> pb.RepositoryModelLoadRequest:
    """Load ``name`` with the files of ``path`` sent over gRPC, or from the adapter root."""
    params = {} if path is None else {
        f"file:{f}": pb.ModelRepositoryParameter(bytes_param=(path / f).read_bytes()) for f in FILES}
    return pb.RepositoryModelLoadRequest(model_name=name, parameters=params)


def logits(response: pb.ModelInferResponse) -> np.ndarray:
    return decode_outputs(response)["logits"][0]


def wait_until(predicate, timeout: float, what: str, poll: float = 0.01) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - t0


def nonzero_gauges(text: str) -> list[str]:
    """Per-model waiting/running gauge series that are not 0 (on a quiet server all are)."""
    return [line for line in text.splitlines() if line.startswith(("wara_requests_waiting{", "wara_requests_running{"))
            and float(line.rsplit(" ", 1)[1]) != 0]


def health_code(served: Served, name: str):
    try:
        return served.health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
    except grpc.RpcError as e:
        return e.code()


# ------------------------------------------------------------------------------------------
# 1. shutdown under load


@pytest.mark.slow
def test_sigterm_drains_admitted_requests_and_refuses_new_ones(world):
    """64 requests from 4 clients (16 each: under the server's streams per connection) sit in
    the batcher's queue (a 1.5 s batching delay) when SIGTERM arrives: every one completes with
    the right answer, a request sent during the drain gets UNAVAILABLE, and the process exits 0."""
    ref, n = world["ref"], 64
    served = Served(world, "drain", adapter_root=world["single"], max_delay_ms=1500.0, max_batch=256, grace_s=20.0)
    clients = [connect(served.port) for _ in range(4)]
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in clients]
        futures = [stubs[k % 4].ModelInfer.future(infer_request("one", k % len(TEXTS)), timeout=60) for k in range(n)]
        wait_until(lambda: served.gauge("wara_tenant_requests_inflight", tenant="-") == n, 10, f"{n} requests admitted")
        t0 = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        t_closed = wait_until(lambda: not served.stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready, 10,
                              "the drain to begin")
        assert not any(f.done() for f in futures), "the requests were answered before the drain began: no test"
        with pytest.raises(grpc.RpcError) as refused:
            served.stub.ModelInfer(infer_request("one", 0), timeout=10)
        assert refused.value.code() == C.UNAVAILABLE, refused.value
        assert not all(f.done() for f in futures), "the drain ended before the new request was refused: no test"
        wrong = []
        for k, f in enumerate(futures):
            r = f.result(timeout=30)  # raises on any error
            if not ref.matches("one", r.model_version, k % len(TEXTS), logits(r)):
                wrong.append(k)
        t_answered = time.monotonic() - t0
        rc = served.proc.wait(timeout=30)
        t_exit = time.monotonic() - t0
        assert wrong == [], f"{len(wrong)} of {n} drained answers differ from the reference"
        assert rc == 0, served.log_tail()
        assert "stopped" in served.log_tail()
        print(f"\ndrain: {n} queued requests; SIGTERM -> refusing new ones {t_closed * 1e3:.0f} ms, "
              f"-> all {n} answered {t_answered * 1e3:.0f} ms, -> exit 0 {t_exit * 1e3:.0f} ms")
    finally:
        for c in clients:
            c.close()
        served.close()


@pytest.mark.slow
def test_second_sigterm_exits_at_once(world):
    """Requests stuck behind a 60 s batching delay, a drain under way (grace 20 s): a second
    SIGTERM ends the process within 5 s with 128 + SIGTERM, and the stuck requests fail
    (none is answered)."""
    n = 8
    served = Served(world, "abort", adapter_root=world["single"], max_delay_ms=60000.0, max_batch=256, grace_s=20.0)
    try:
        futures = [served.stub.ModelInfer.future(infer_request("one", 0), timeout=60) for _ in range(n)]
        wait_until(lambda: served.gauge("wara_tenant_requests_inflight", tenant="-") == n, 10, f"{n} requests admitted")
        served.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: not served.stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready, 10,
                   "the drain to begin")
        t0 = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        rc = served.proc.wait(timeout=10)
        elapsed = time.monotonic() - t0
        assert rc == 128 + signal.SIGTERM, (rc, served.log_tail())
        assert elapsed < 5.0
        codes = Counter(e.code() if e is not None else C.OK for e in (f.exception(timeout=30) for f in futures))
        assert codes == {C.UNAVAILABLE: n}, codes  # the connection went: none was answered
        print(f"\nsecond SIGTERM: exit {rc} after {elapsed * 1e3:.0f} ms; the {n} stuck requests: "
              f"{', '.join(f'{c.name} x{k}' for c, k in codes.items())}")
    finally:
        served.close()


# ------------------------------------------------------------------------------------------
# 2. soak and 3. load/unload cycles, against one server


@pytest.fixture(scope="module")
def soak_server(world):
    served = Served(world, "soak", adapter_root=world["root"], max_delay_ms=2.0, preload=True)
    try:
        yield served
    finally:
        served.proc.send_signal(signal.SIGTERM)
        rc = served.proc.wait(timeout=60)
        served.close()
        assert rc == 0, served.log_tail()


@pytest.mark.slow
def test_soak_with_load_unload_reload_every_100ms(world, soak_server):
    """CLIENTS closed-loop client threads (a connection each) x REQUESTS requests over 50
    adapters, one of 5 texts each, while an admin thread every 100 ms unloads a name, loads an
    unloaded one (from the adapter root or by files) or reloads one with its other content (by
    files), in turn. Counted: answers that differ from the reference of the (name, version) they name
    (must be 0); status codes other than OK and NOT_FOUND (none); NOT_FOUND for a name never
    unloaded (none)."""
    ref, root, variants, versions = world["ref"], world["root"], world["variants"], world["versions"]
    served = soak_server
    stop = threading.Event()
    ever_unloaded: set[str] = set()
    ops: Counter[str] = Counter()
    admin_errors: list[str] = []

    def admin():
        rng = random.Random(0)
        channel = connect(served.port)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        current: dict[str, str | None] = {n: "root" for n in NAMES}  # what each name serves: root, variant or None
        schedule = ("unload", "reload", "unload", "load", "reload", "load")  # every kind within 0.4 s; 0-2 names out
        try:
            for tick in range(1 << 30):
                if stop.wait(0.1):
                    break
                op = schedule[tick % len(schedule)]
                name = rng.choice(sorted(n for n, c in current.items() if (c is None) == (op == "load")))
                try:
                    if op == "unload":
                        ever_unloaded.add(name)  # before the call: a client may see NOT_FOUND before it returns
                        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=30)
                        current[name] = None
                    elif op == "load":  # from the adapter root by name, or the other content's files sent
                        which = rng.choice(("root", "variant"))
                        source = None if which == "root" else variants / name
                        stub.RepositoryModelLoad(load_request(name, source), timeout=30)
                        current[name] = which
                    else:  # reload: the other content under the same name, its files sent
                        which = "variant" if current[name] == "root" else "root"
                        stub.RepositoryModelLoad(load_request(name, (root if which == "root" else variants) / name),
                                                 timeout=30)
                        current[name] = which
                    ops[op] += 1
                except grpc.RpcError as e:
                    admin_errors.append(f"{op} {name}: {e.code().name} {e.details()}")
        finally:
            channel.close()

    results: list[tuple[Counter, list, set] | None] = [None] * CLIENTS

    def client(k: int):
        rng = random.Random(100 + k)
        codes: Counter = Counter()  # (name, code)
        wrong: list = []
        seen: set = set()  # (name, version)
        channel = connect(served.port)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            for _ in range(REQUESTS):
                name, text = rng.choice(NAMES), rng.randrange(len(TEXTS))
                try:
                    r = stub.ModelInfer(infer_request(name, text), timeout=30)
                except grpc.RpcError as e:
                    codes[(name, e.code())] += 1
                    continue
                codes[(name, C.OK)] += 1
                seen.add((name, r.model_version))
                if not ref.matches(name, r.model_version, text, logits(r)):
                    wrong.append((name, r.model_version[:19], text))
        finally:
            channel.close()
            results[k] = (codes, wrong, seen)

    admin_thread = threading.Thread(target=admin, name="soak-admin")
    clients = [threading.Thread(target=client, args=(k,), name=f"soak-client-{k}") for k in range(CLIENTS)]
    rss0 = served.rss()
    t0 = time.monotonic()
    admin_thread.start()
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    seconds = time.monotonic() - t0
    stop.set()
    admin_thread.join()

    assert all(r is not None for r in results), "a client thread died"
    codes = sum((r[0] for r in results), Counter())
    wrong = [w for r in results for w in r[1]]
    seen = set().union(*(r[2] for r in results))
    by_code = Counter()
    for (name, code), k in codes.items():
        by_code[code] += k
    total = sum(by_code.values())
    not_found = {name for (name, code) in codes if code == C.NOT_FOUND}
    print(f"\nsoak: {CLIENTS} clients x {REQUESTS} requests over {len(NAMES)} adapters in {seconds:.1f} s: "
          f"{total / seconds:.0f} req/s; {dict((c.name, k) for c, k in by_code.items())}; "
          f"repository ops {dict(ops)} ({sum(ops.values()) / seconds:.1f}/s); "
          f"{len(seen)} (name, version) pairs answered; wrong answers {len(wrong)}; "
          f"server RSS {rss0 / 2**20:.0f} -> {served.rss() / 2**20:.0f} MiB; per-model gauges left non-zero: "
          f"{nonzero_gauges(served.metrics()) or 'none'}")
    assert total == CLIENTS * REQUESTS
    assert admin_errors == [], admin_errors[:5]
    assert wrong == [], f"{len(wrong)} answers differ from their version's reference, e.g. {wrong[:5]}"
    assert set(by_code) <= {C.OK, C.NOT_FOUND}, by_code
    assert not_found <= ever_unloaded, f"NOT_FOUND for names never unloaded: {sorted(not_found - ever_unloaded)}"
    assert by_code[C.OK] > 0.5 * total
    # the churn really happened, and requests really ran on reloaded contents
    assert ops["unload"] >= 1 and ops["reload"] >= 1 and ops["load"] >= 1, ops
    reloaded = [n for n in NAMES if all((n, v) in seen for v in versions[n])]
    assert reloaded, "no name answered with both of its contents"
    # quiet again: the edge holds nothing (the per-model gauges: see test_gauges_survive_an_unload...)
    assert served.gauge("wara_tenant_requests_inflight", tenant="-") == 0


@pytest.mark.slow
def test_load_unload_cycles_keep_rss_flat_and_forget_names(world, soak_server):
    """CYCLES load/unload cycles over gRPC (two threads, four rotating names, files sent over
    gRPC, two contents in turn); every 100th cycle also infers on the loaded name and checks its
    health and, after the unload, that the name left the metrics and the health table."""
    ref, served = world["ref"], soak_server
    names = [f"cycle-{k}" for k in range(4)]
    by_name = {n: [load_request(n, p) for p in world["cycle"]] for n in names}
    failures: list[str] = []
    checked = Counter()

    def cycles(thread: int, start: int, count: int) -> None:
        channel = connect(served.port)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        hstub = health_pb2_grpc.HealthStub(channel)
        try:
            for i in range(start + thread, start + count, 2):
                name = names[(i // 2) % 2 * 2 + thread]  # each thread has two names of its own
                stub.RepositoryModelLoad(by_name[name][(i // 4) % 2], timeout=30)
                probe = i % 100 < 2
                if probe:
                    r = stub.ModelInfer(infer_request(name, 0), timeout=30)
                    if not ref.matches("cycle", r.model_version, 0, logits(r)):
                        failures.append(f"cycle {i}: {name} answered wrong")
                    status = hstub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                    if status != health_pb2.HealthCheckResponse.SERVING:
                        failures.append(f"cycle {i}: {name} loaded but health says {status}")
                stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=30)
                if probe:
                    try:
                        hstub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                        failures.append(f"cycle {i}: {name} unloaded and still in the health table")
                    except grpc.RpcError as e:
                        if e.code() != C.NOT_FOUND:
                            failures.append(f"cycle {i}: health of unloaded {name}: {e.code().name}")
                    if f'model="{name}"' in served.metrics():
                        failures.append(f"cycle {i}: {name} unloaded and still in /metrics")
                    checked[thread] += 1
        except grpc.RpcError as e:
            failures.append(f"thread {thread}: {e.code().name} {e.details()}")
        finally:
            channel.close()

    def run(start: int, count: int) -> float:
        t0 = time.monotonic()
        threads = [threading.Thread(target=cycles, args=(k, start, count)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - t0

    rss_before = served.rss()
    run(0, WARMUP)
    rss_start = served.rss()
    seconds = run(WARMUP, CYCLES - WARMUP)
    rss_end = served.rss()
    print(f"\n{CYCLES} load/unload cycles: {(CYCLES - WARMUP) / seconds:.0f} cycles/s after warm-up; server RSS "
          f"{rss_before / 2**20:.1f} MiB before, {rss_start / 2**20:.1f} MiB after {WARMUP} warm-up cycles, "
          f"{rss_end / 2**20:.1f} MiB at the end ({rss_end / rss_start - 1:+.1%}); {sum(checked.values())} probes")
    assert failures == [], failures[:5]
    assert sum(checked.values()) >= CYCLES // 100
    assert rss_end <= 1.10 * rss_start
    index = served.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    assert not {m.name for m in index.models} & set(names)
    text = served.metrics()
    assert not any(f'model="{n}"' in text for n in names)
    assert all(health_code(served, n) == C.NOT_FOUND for n in names)


# ------------------------------------------------------------------------------------------
# a server bug the soak found: per-model gauges across an unload


def test_gauges_survive_an_unload_with_a_request_in_flight(world):
    """One request queued (a 500 ms batching delay) for adapter ``one``, then ``one`` unloaded:
    the request is answered (its lease keeps the version), and afterwards every per-model gauge
    is back at 0."""
    from runtime.config import ServeConfig
    from runtime.server import create_server

    config = ServeConfig(bases=(f"b=hf:{world['bert']}",), backend="torch", port=0,
                         adapter_root=str(world["single"]), max_delay_ms=500.0)
    server, port = create_server(config)
    channel = connect(port)
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metrics = server.service.metrics
        future = stub.ModelInfer.future(infer_request("one", 0), timeout=30)
        wait_until(lambda: 'wara_requests_waiting{model="one"} 1.0' in metrics.text().decode(), 5, "the request queued")
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="one"), timeout=10)
        r = future.result(timeout=30)
        assert world["ref"].matches("one", r.model_version, 0, logits(r))
        assert nonzero_gauges(metrics.text().decode()) == []
    finally:
        channel.close()
        server.stop(grace=2.0)
