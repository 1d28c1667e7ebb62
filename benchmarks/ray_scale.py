"""Scale-out on Ray Serve: the single-process server and Ray Serve clusters of 1 and of 2
replicas behind the same gRPC edge, all up at once in one run, on the same base and adapters.

For each, every adapter's answer over gRPC is first checked against the in-process core's. Then,
in interleaved rounds (single, 1 replica, 2 replicas, single, ...: drift on the machine hits all
alike), a client in its own process measures batch-1 latency (one request at a time, p50/p99)
and throughput (``--concurrency`` requests in flight). Requests cycle over ``--adapters`` random
adapters, so the 2-replica cluster routes them by adapter (the requests each replica answered
are recorded). A replica reserves its share of the cores (the 1-replica cluster all of them).
Ray's added cost per request is the 1-replica cluster's batch-1 p50 minus the single server's,
from the same rounds. Start-up is not in the figures.

    .venv/bin/python -m benchmarks.ray_scale                 # MiniLM: 300 requests and 12 s of load each
    .venv/bin/python -m benchmarks.ray_scale --quick         # a tiny run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import add_base_option, base_info, base_spec, environment, percentile, write_json

TEXT = "What is artificial intelligence and how do computers learn?"


# --- the client (its own process: `--client`) ------------------------------------------------
async def _client(port: int, names: list[str], requests: int, concurrency: int, seconds: float) -> dict:
    import grpc

    from runtime.kserve import inference_pb2 as pb
    from runtime.kserve import inference_pb2_grpc as pb_grpc

    def request(name: str):
        req = pb.ModelInferRequest(model_name=name)
        req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(TEXT.encode())
        return req

    reqs = [request(n) for n in names]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for r in reqs * 3:  # warm: every adapter on the replica that serves it
            await stub.ModelInfer(r, timeout=120)
        sequential = []
        for i in range(requests):
            t0 = time.perf_counter()
            await stub.ModelInfer(reqs[i % len(reqs)], timeout=60)
            sequential.append((time.perf_counter() - t0) * 1e3)
        loaded, errors, end = [], 0, time.perf_counter() + seconds

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    await stub.ModelInfer(reqs[i % len(reqs)], timeout=60)
                    loaded.append((time.perf_counter() - t0) * 1e3)
                except grpc.aio.AioRpcError:
                    errors += 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"sequential_ms": sequential, "loaded_ms": loaded, "errors": errors, "seconds": elapsed}


def measure(port: int, names: list[str], requests: int, concurrency: int, seconds: float) -> dict:
    """One round of the client, in its own process: its raw latencies (ms) and counts."""
    cmd = [sys.executable, "-m", "benchmarks.ray_scale", "--client", str(port), "--names", ",".join(names),
           "--requests", str(requests), "--concurrency", str(concurrency), "--seconds", str(seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"client failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def summarize(rounds: list[dict]) -> dict:
    seq = [x for r in rounds for x in r["sequential_ms"]]
    loaded = [x for r in rounds for x in r["loaded_ms"]]
    rates = [len(r["loaded_ms"]) / r["seconds"] for r in rounds]
    return {"batch1_p50_ms": percentile(seq, 50), "batch1_p99_ms": percentile(seq, 99),
            "batch1_mean_ms": statistics.mean(seq), "batch1_p50_ms_per_round": [percentile(r["sequential_ms"], 50)
                                                                                 for r in rounds],
            "requests_per_s": statistics.median(rates), "requests_per_s_per_round": rates,
            "loaded_p50_ms": percentile(loaded, 50) if loaded else None,
            "loaded_p99_ms": percentile(loaded, 99) if loaded else None,
            "errors": sum(r["errors"] for r in rounds)}


# --- the variants -----------------------------------------------------------------------------
def check(port: int, names: list[str], service) -> None:
    """Every adapter's answer over gRPC equals the in-process core's (before anything is timed)."""
    import grpc

    from runtime.kserve import inference_pb2 as pb
    from runtime.kserve import inference_pb2_grpc as pb_grpc
    from runtime.wire import decode_outputs

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for name in names:
            req = pb.ModelInferRequest(model_name=name)
            req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(TEXT.encode())
            resp = stub.ModelInfer(req, timeout=120)
            version, want = service.predict(name, {"text": np.array([TEXT.encode()], dtype=object)})
            got = decode_outputs(resp)["logits"]
            if resp.model_version != version or not np.allclose(got, want["logits"], rtol=1e-4, atol=1e-4):
                raise SystemExit(f"{name}: the served answer differs from the in-process core's")


def per_replica(server) -> dict[str, dict[str, float]]:
    """replica -> model -> requests answered, from the cluster's metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(server.service.metrics.text().decode()):
        for s in family.samples:
            if s.name == "wara_requests_total" and s.labels.get("outcome") == "ok":
                out.setdefault(s.labels["replica"], {})[s.labels["model"]] = s.value
    return out


def handle_roundtrip(server, n: int) -> float:
    """p50 of a Ray Serve handle call that does no work (a replica's status), from this process."""
    handle = server.service.handle.options(method_name="status")
    for _ in range(5):
        handle.remote().result()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        handle.remote().result()
        times.append((time.perf_counter() - t0) * 1e3)
    return percentile(times, 50)


def run(args, workdir: Path) -> dict:
    import ray
    from ray import serve

    from runtime.config import RayConfig, ServeConfig
    from runtime.ray_serve import start_cluster
    from runtime.server import create_server
    from runtime.service import Service
    from wara_train.synthetic import random_adapter

    spec = base_spec(args.base)
    names = [f"t{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        random_adapter(spec, workdir / name, rank=4, seed=i)
    cpus = len(os.sched_getaffinity(0))
    config = ServeConfig(port=0, adapter_root=str(workdir), bases=(f"{spec.name}={args.base}",), backend=args.backend,
                         max_delay_ms=args.max_delay_ms, auto_merge=False)
    reference = Service(config)
    servers: dict[str, tuple] = {}
    rounds: dict[str, list[dict]] = {}
    # Both clusters share one local Ray cluster; each replica reserves its share of the cores
    # (the 1-replica cluster all of them), so the cluster has twice the machine's CPUs to give.
    ray.init(num_cpus=2 * cpus, include_dashboard=False, namespace="wara", log_to_driver=False)
    try:
        servers["single"] = create_server(config)
        for replicas in (1, 2):
            settings = RayConfig(replicas=replicas, replica_cpus=cpus / replicas, app_name=f"bench-{replicas}")
            servers[f"ray_{replicas}"] = start_cluster(config.replace(ray=settings))
        for key, (server, port) in servers.items():
            deadline = time.time() + 300
            while not server.service.ready and time.time() < deadline:
                time.sleep(0.2)
            check(port, names, reference)
        for _ in range(args.rounds):  # interleaved, so the machine's drift hits every variant alike
            for key, (server, port) in servers.items():
                rounds.setdefault(key, []).append(
                    measure(port, names, args.requests // args.rounds, args.concurrency, args.seconds / args.rounds))
        results = {key: summarize(r) for key, r in rounds.items()}
        results["ray_1"]["handle_roundtrip_p50_ms"] = handle_roundtrip(servers["ray_1"][0], args.requests)
        for replicas in (1, 2):
            counts = per_replica(servers[f"ray_{replicas}"][0])
            results[f"ray_{replicas}"].update(replica_cpus=cpus / replicas,
                                              requests_per_replica={k: sum(v.values()) for k, v in counts.items()},
                                              adapters_per_replica={k: sorted(v) for k, v in counts.items()})
    finally:
        for server, _ in servers.values():
            server.stop(grace=1.0)
        reference.drain()
        serve.shutdown()
        ray.shutdown()
    single, one, two = results["single"], results["ray_1"], results["ray_2"]
    summary = {"ray_overhead_p50_ms": one["batch1_p50_ms"] - single["batch1_p50_ms"],
               "handle_roundtrip_p50_ms": one["handle_roundtrip_p50_ms"],
               "ray_overhead_p99_ms": one["batch1_p99_ms"] - single["batch1_p99_ms"],
               "throughput_2_vs_1_replicas": two["requests_per_s"] / one["requests_per_s"],
               "throughput_2_replicas_vs_single": two["requests_per_s"] / single["requests_per_s"]}
    info = {} if args.base == "minilm" else {"base": base_info(spec)}
    return {"benchmark": "ray_scale", **environment(), **info, "backend": args.backend, "cpus": cpus,
            "model": f"{spec.name} + WaRA r=4 haar J=1 (random), {args.adapters} adapters in turn",
            "input": "BYTES text, server-side tokenization, batch 1", "rounds": args.rounds,
            "requests": args.requests, "concurrency": args.concurrency, "seconds": args.seconds,
            "max_delay_ms": args.max_delay_ms, "results": results, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    environment()  # read at the start: the commit and machine this run measures
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_base_option(p)
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch")
    p.add_argument("--adapters", type=int, default=8, help="adapters the requests cycle over (default 8)")
    p.add_argument("--requests", type=int, default=300, help="batch-1 requests, one at a time, over all rounds (default 300)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight for throughput (default 16)")
    p.add_argument("--seconds", type=float, default=12.0, help="seconds of throughput load over all rounds (default 12)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds: single, 1 replica, 2 replicas, ... (default 3)")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="the batcher's max_delay_ms (default 2)")
    p.add_argument("--quick", action="store_true", help="a tiny run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ray_scale.json"))
    p.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the client process
    p.add_argument("--names", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client is not None:
        print(json.dumps(asyncio.run(_client(args.client, args.names.split(","), args.requests, args.concurrency,
                                             args.seconds))))
        return 0
    if args.quick:
        args.requests, args.seconds, args.concurrency, args.rounds = 20, 2.0, 4, 1
    from runtime.ray_serve import require_ray

    require_ray()
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args, Path(tmp))
    write_json(args.out, report)
    r, s = report["results"], report["summary"]
    for key, label in (("single", "single process"), ("ray_1", "Ray, 1 replica"), ("ray_2", "Ray, 2 replicas")):
        x = r[key]
        print(f"{label:16s} batch-1 p50 {x['batch1_p50_ms']:6.2f} ms  p99 {x['batch1_p99_ms']:6.2f} ms   "
              f"{x['requests_per_s']:7.1f} req/s at {args.concurrency} in flight")
    print(f"Ray's added cost per request: {s['ray_overhead_p50_ms']:.2f} ms at p50 "
          f"({s['ray_overhead_p99_ms']:.2f} ms at p99); a handle call doing nothing: "
          f"{s['handle_roundtrip_p50_ms']:.2f} ms   ({args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
