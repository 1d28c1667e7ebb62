"""Scale-out on Ray Serve (issue 14), as a user runs it: `wara serve --ray --replicas 2` in its
own process over a tiny random BERT, driven by tritonclient from this process (which may hold
tritonclient's stubs because it never imports our gRPC edge). Every answer is checked against the
single-process serving core (`Service`) for the same adapter version; per-replica request
counts come from the cluster's one Prometheus endpoint; one replica's process is killed
mid-traffic, and no request is lost. Without Ray installed the cluster tests are skipped and
the CLI's error is tested.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict

import numpy as np
import pytest
import torch
from helpers import tol

import tiny_models
from runtime.config import RayConfig, ServeConfig
from wara_train.artifact import load_adapter
from wara_train.basespec import resolve_base
from wara_train.errors import ConfigError
from wara_train.synthetic import random_adapter

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray Serve is not installed (pip install 'wara-serve[ray]')")
ADAPTERS = [f"a{i}" for i in range(6)]
TEXTS = ["the movie was really good", "the service was slow and bad"]
START_S = 240  # Ray, two replicas importing torch and transformers: ~25 s here, slower on a busy machine
# Ray Serve's own config models use a pydantic idiom pydantic 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")


def _text(text: str, rows: int = 1):
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput("text", [rows], "BYTES")
    t.set_data_from_numpy(np.array([text.encode()] * rows, dtype=object))
    return t


def _scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=30).read().decode()
    samples: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name].append((s.labels, s.value))
    return samples


def _ok_counts(url: str) -> dict[tuple[str, str], float]:
    """(model, replica) -> requests answered, from the cluster's metrics."""
    return {(l["model"], l["replica"]): v for l, v in _scrape(url)["wara_requests_total"] if l["outcome"] == "ok"}


def _retries(url: str) -> float:
    """Requests the edge sent again to another replica because theirs stopped before answering."""
    return sum(v for _, v in _scrape(url)["wara_cluster_retries_total"])


def _replica_pids(url: str) -> dict[str, int]:
    return {l["replica"]: int(l["pid"]) for l, _ in _scrape(url)["wara_cluster_replica_info"]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not HAS_RAY:
        pytest.skip("Ray Serve is not installed (pip install 'wara-serve[ray]')")
    import tritonclient.grpc as grpcclient

    from runtime.service import Service

    tmp = tmp_path_factory.mktemp("ray")
    bert = tiny_models.make_bert_classifier(tmp / "bert")
    spec = resolve_base(f"hf:{bert}", name="b")
    root = tmp / "adapters"
    for k, name in enumerate(ADAPTERS + ["cold"]):
        random_adapter(spec, root / name, rank=2 + 2 * (k % 2), seed=70 + k)
    sent = tmp / "variants" / "sent"  # loaded through the edge with its files
    random_adapter(spec, sent, rank=2, seed=99)
    settings = dict(bases=[f"b=hf:{bert}"], backend="torch", adapter_root=str(root), max_delay_ms=2.0, auto_merge=False)
    (tmp / "serve.toml").write_text("[serve]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
                                    + "[serve.ray]\nreplicas = 2\nnum_cpus = 2\n")
    proc = subprocess.Popen([sys.executable, "-m", "wara", "serve", "--config", str(tmp / "serve.toml"), "--port", "0",
                             "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    service = Service(ServeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}))
    try:
        line, t0 = "", time.time()
        while not line.startswith("serving on") and time.time() - t0 < START_S and proc.poll() is None:
            line = proc.stdout.readline()
        assert line.startswith("serving on 127.0.0.1:"), "".join(stderr)[-4000:]
        port = int(line.strip().rsplit(":", 1)[1])
        metrics = next(m.group(1) for m in map(re.compile(r"metrics on (http://\S+)").search, stderr) if m)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        while not client.is_server_ready() and time.time() - t0 < START_S:
            time.sleep(0.2)
        assert client.is_server_ready(), "".join(stderr)[-4000:]
        yield {"client": client, "port": port, "metrics": metrics, "service": service, "root": root, "sent": sent,
               "proc": proc, "stderr": stderr}
    finally:
        service.drain()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()


def _check(cluster, name: str, text: str, result) -> None:
    """The cluster's answer equals the single-process core's for the same adapter version."""
    version, want = cluster["service"].predict(name, {"text": np.array([text.encode()], dtype=object)})
    assert result.get_response().model_version == version
    rtol, atol = tol(torch.float32)
    np.testing.assert_allclose(result.as_numpy("logits")[0], want["logits"][0], rtol=rtol, atol=atol, err_msg=name)


@needs_ray
@pytest.mark.slow
def test_an_adapter_on_disk_is_ready_and_loads_on_one_replica(cluster):
    """As on one server: ModelReady is true for an adapter only on disk, and ModelMetadata loads
    it, here on the one replica its requests go to."""
    client = cluster["client"]
    index = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
    assert index["cold"][0] == "UNAVAILABLE" and "on disk" in index["cold"][1], index["cold"]
    assert client.is_model_ready("cold")
    assert list(client.get_model_metadata("cold").versions) == [load_adapter(cluster["root"] / "cold").content_hash]
    index = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
    assert index["cold"][0] == "READY" and index["cold"][1].startswith("1 of 2 replicas"), index["cold"]
    _check(cluster, "cold", TEXTS[0], client.infer("cold", [_text(TEXTS[0])]))
    index = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
    assert index["cold"][1].startswith("1 of 2 replicas"), index["cold"]  # served where it was loaded


@needs_ray
@pytest.mark.slow
def test_answers_equal_the_single_process_server(cluster):
    client = cluster["client"]
    for name in ADAPTERS + ["b"]:
        for text in TEXTS:
            _check(cluster, name, text, client.infer(name, [_text(text)]))
    assert list(client.get_model_metadata("a2").versions) == [load_adapter(cluster["root"] / "a2").content_hash]
    assert client.get_model_metadata("b").platform == "wara_pytorch:b"
    assert client.is_model_ready("a2") and not client.is_model_ready("nope")


@needs_ray
@pytest.mark.slow
def test_each_adapter_stays_on_one_replica(cluster):
    """From its first request on (the previous test's), every request for an adapter is
    answered by the same replica, also when many arrive at once."""
    client = cluster["client"]
    threads = [threading.Thread(target=lambda n=name: [client.infer(n, [_text(TEXTS[0])]) for _ in range(5)])
               for name in ADAPTERS for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = _ok_counts(cluster["metrics"])
    homes = {}
    for name in ADAPTERS:
        served_by = {replica: n for (model, replica), n in counts.items() if model == name}
        assert len(served_by) == 1 and sum(served_by.values()) == 2 + 15, (name, served_by)
        homes[name] = next(iter(served_by))
    print(f"\nadapter -> replica: {homes}")
    samples = _scrape(cluster["metrics"])
    replicas = set(_replica_pids(cluster["metrics"]))
    assert len(replicas) == 2 and samples["wara_cluster_ready"][0][1] == 1.0
    lora = samples["wara_lora_requests_info"]  # the gateways' affinity gauge, one series per replica
    assert {l["replica"] for l, _ in lora} == replicas and all(l["max_lora"] for l, _ in lora)


@needs_ray
@pytest.mark.slow
def test_load_through_the_ingress_is_servable_everywhere(cluster):
    client, service = cluster["client"], cluster["service"]
    src = cluster["sent"]
    config, weights = (src / "adapter_config.json").read_text(), (src / "adapter_model.safetensors").read_bytes()
    client.load_model("sent", config=config, files={"file:adapter_model.safetensors": weights})
    service.load_now("sent", {"adapter_config.json": config.encode(), "adapter_model.safetensors": weights})
    for text in TEXTS:
        _check(cluster, "sent", text, client.infer("sent", [_text(text)]))
    index = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
    assert index["sent"][0] == "READY" and index["sent"][1].startswith("2 of 2 replicas"), index["sent"]
    client.load_model("a3")  # by name, from the shared root: on every replica
    index = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
    assert index["a3"][1].startswith("2 of 2 replicas"), index["a3"]


@needs_ray
@pytest.mark.slow
def test_unload_is_not_found_everywhere(cluster):
    from tritonclient.utils import InferenceServerException

    client = cluster["client"]
    client.unload_model("a1")
    for _ in range(4):
        with pytest.raises(InferenceServerException) as info:
            client.infer("a1", [_text(TEXTS[0])])
        assert info.value.status() == "StatusCode.NOT_FOUND"
    assert not client.is_model_ready("a1")
    index = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
    assert index["a1"] == ("UNAVAILABLE", "unloaded")  # every replica says so, also one that never had it
    for name, code in (("nope", "StatusCode.NOT_FOUND"), ("b", "StatusCode.INVALID_ARGUMENT")):
        with pytest.raises(InferenceServerException) as info:
            client.unload_model(name)
        assert info.value.status() == code, name
    with pytest.raises(InferenceServerException) as info:  # refused by every replica: changes nothing
        client.load_model("no-such-adapter")
    assert info.value.status() == "StatusCode.NOT_FOUND" and "no-such-adapter" in info.value.message()


@needs_ray
@pytest.mark.slow
def test_killing_a_replica_mid_traffic_loses_no_request(cluster):
    """A request in flight on the killed replica is sent once more, to the other replica: every
    request is answered (none lost, none UNAVAILABLE), correctly, and the resends are counted.
    Ray starts a replacement, which replays the repository log (the adapter unloaded above stays
    NOT_FOUND, the one sent with its files is served there too). The replica is stopped
    (SIGSTOP) for a second before it is killed, so that requests are surely in flight on it when
    it dies."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    url, port = cluster["metrics"], cluster["port"]
    names = [n for n in ADAPTERS if n != "a1"] + ["sent", "b"]
    homes = {m: r for (m, r) in _ok_counts(url) if m in names}
    pids = _replica_pids(url)
    victim = max(pids, key=lambda r: sum(1 for h in homes.values() if h == r))
    retries_before = _retries(url)
    stop, records = threading.Event(), defaultdict(list)
    rows = 16  # rows per request: most of a request's time is spent on a replica

    def traffic(name: str) -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        while not stop.is_set():
            t0 = time.time()
            try:
                result = client.infer(name, [_text(TEXTS[1], rows)], client_timeout=60)
                records[name].append(("OK", t0, time.time(), result))
            except InferenceServerException as e:
                records[name].append((e.status(), t0, time.time(), e.message()))

    threads = [threading.Thread(target=traffic, args=(n,)) for n in names for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    os.kill(pids[victim], signal.SIGSTOP)
    time.sleep(1.0)
    t_kill = time.time()
    os.kill(pids[victim], signal.SIGKILL)
    time.sleep(4.0)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads)  # no hang
    sent = sum(map(len, records.values()))
    lost = {n: [r[:3] + (r[3][:200],) for r in rs if r[0] != "OK"] for n, rs in records.items()}
    retried = _retries(url) - retries_before
    print(f"\n{sent} requests, {sum(map(len, lost.values()))} lost, {retried:.0f} sent again to another replica")
    assert not any(lost.values()), lost
    assert retried >= 1  # requests were in flight on the victim when it died, and were sent again
    for name in names:
        assert sum(1 for r in records[name] if r[1] > t_kill + 1.0) > 0, name  # served after the kill too
    assert max(r[2] - r[1] for rs in records.values() for r in rs) < 30
    for name in ("a0", "sent"):
        ok = records[name]
        _check(cluster, name, TEXTS[1], ok[-1][3])
        assert ok[-1][3].as_numpy("logits").shape[0] == rows

    t0 = time.time()
    while time.time() - t0 < START_S:  # Ray brings the replica back
        now = _replica_pids(url)
        if len(now) == 2 and pids[victim] not in now.values() and cluster["client"].is_server_ready():
            break
        time.sleep(0.5)
    client = cluster["client"]
    assert len(now) == 2 and pids[victim] not in now.values() and client.is_server_ready(), now
    print(f"replaced and ready {time.time() - t_kill:.1f} s after the kill")
    index = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
    assert index["a1"] == ("UNAVAILABLE", "unloaded") and index["sent"][1].startswith("2 of 2 replicas"), index
    for name in names:
        _check(cluster, name, TEXTS[0], client.infer(name, [_text(TEXTS[0])]))
    with pytest.raises(InferenceServerException) as info:
        client.infer("a1", [_text(TEXTS[0])])
    assert info.value.status() == "StatusCode.NOT_FOUND"


@needs_ray
def test_adapter_order_is_holders_first_then_a_stable_hash():
    from types import SimpleNamespace

    from runtime.ray_serve.router import preference

    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=f"r{i}"), multiplexed_model_ids=set())
                for i in range(4)]
    firsts = [preference(f"adapter-{k}", replicas)[0].replica_id.unique_id for k in range(400)]
    assert firsts == [preference(f"adapter-{k}", replicas[::-1])[0].replica_id.unique_id for k in range(400)]
    assert all(60 < firsts.count(f"r{i}") < 140 for i in range(4)), {f"r{i}": firsts.count(f"r{i}") for i in range(4)}
    without = preference("adapter-0", replicas)
    without[-1].multiplexed_model_ids.add("adapter-0")  # the last in hash order holds it: it goes first
    assert preference("adapter-0", replicas) == [without[-1]] + without[:-1]


# --- configuration and the CLI (no cluster) ----------------------------------------------------
def _serve(*args: str, hide_ray: bool = False) -> subprocess.CompletedProcess:
    hide = "sys.modules['ray'] = None; " if hide_ray else ""
    code = f"import sys; {hide}from wara.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "serve", "--port", "0", *args], capture_output=True, text=True,
                          timeout=120)


def test_serve_ray_without_the_extra_names_it():
    proc = _serve("--ray", hide_ray=True)
    assert proc.returncode == 2 and "pip install 'wara-serve[ray]'" in proc.stderr, proc.stderr[-2000:]


def test_bad_ray_flags_are_clear_errors():
    proc = _serve("--ray", "--replicas", "0")
    assert proc.returncode == 2 and "ray replicas must be a positive integer, got 0" in proc.stderr, proc.stderr[-2000:]
    proc = _serve("--replicas", "2")
    assert proc.returncode == 2 and "--replicas and --ray-address need --ray" in proc.stderr, proc.stderr[-2000:]


def test_ray_table_in_the_config(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('[serve]\nport = 0\n[serve.ray]\nreplicas = 3\naddress = "auto"\nreplica_cpus = 0.5\n')
    ray = ServeConfig.from_toml(path).ray
    assert ray == RayConfig(replicas=3, address="auto", replica_cpus=0.5)
    assert ServeConfig().ray is None  # one process unless asked
    path.write_text("[serve.ray]\nreplica = 3\n")
    with pytest.raises(ConfigError, match=r"\[serve.ray\] takes .*replicas.*; got \['replica'\]"):
        ServeConfig.from_toml(path)
    with pytest.raises(ConfigError, match="app_name"):
        RayConfig(app_name="no spaces")
