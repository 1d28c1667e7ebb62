"""Serving under load: closed-loop clients over many adapters with Zipf-popular traffic, and how
latency and memory grow with the number of registered adapters.

One real server (port 0) on MiniLM. Adapters (random WaRA r=4 haar J=1, each with its own head)
are added in steps (1, 10, 100, 1000); after each step: the load time per adapter, the resident
memory, the host tier's bytes, and the batch-1 latency in-process (one client). At 100 and 1000
adapters, closed-loop runs with 1, 4 and 16 clients, over gRPC and in-process, each request's
adapter drawn from a Zipf law (exponent 1.1) over the registered names: p50 / p99 latency and
throughput. Answers are checked against the in-process answer of the same adapter first.

    .venv/bin/python -m benchmarks.load --backend onnxruntime    # about 6 min on 2 cores
    .venv/bin/python -m benchmarks.load --quick                  # tiny (used by the tests)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment, figure, save_figure, percentile, write_json

TEXTS = [
    "What is artificial intelligence and how do computers learn?",
    "Tell me a joke about robots.",
    "Wie spät ist es in Berlin?",
    "I love reading books about history and science.",
    "Do you know any good recipes for dinner tonight?",
]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def zipf_weights(n: int, s: float = 1.1) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def closed_loop(call, names: list[str], clients: int, seconds: float, seed: int) -> dict:
    """``clients`` threads, each sending its next request when the last one is answered."""
    weights = zipf_weights(len(names))
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def client(k: int) -> None:
        rng = np.random.default_rng(seed + k)
        while not stop.is_set():
            name = names[rng.choice(len(names), p=weights)]
            text = TEXTS[int(rng.integers(len(TEXTS)))]
            t0 = time.perf_counter()
            try:
                call(name, text)
            except BaseException as e:  # noqa: BLE001 - reported after the run
                errors.append(e)
                return
            latencies[k].append((time.perf_counter() - t0) * 1e3)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"a request failed under load: {errors[0]!r}")
    flat = [x for lat in latencies for x in lat]
    return {"requests": len(flat), "p50_ms": percentile(flat, 50), "p99_ms": percentile(flat, 99),
            "mean_ms": statistics.mean(flat), "throughput_rps": len(flat) / wall}


def run(*, backend: str, steps: list[int], load_counts: list[int], clients: list[int], seconds: float,
        workdir: Path, log) -> dict:
    import grpc

    from runtime.config import ServeConfig
    from runtime.kserve import inference_pb2 as pb
    from runtime.kserve import inference_pb2_grpc as pb_grpc
    from runtime.server import create_server, decode_outputs
    from wara_train.synthetic import random_adapters

    root = workdir / "adapters"
    root.mkdir()
    config = ServeConfig(port=0, adapter_root=str(root), bases=("minilm",), backend=backend, auto_merge=False,
                         max_delay_ms=2.0, host_budget_mb=4096)
    server, port = create_server(config)
    service = server.service
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def over_grpc(name: str, text: str) -> np.ndarray:
        req = pb.ModelInferRequest(model_name=name)
        req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(text.encode())
        return decode_outputs(stub.ModelInfer(req))["logits"]

    def in_process(name: str, text: str) -> np.ndarray:
        return service.infer(name, {"text": np.array([text.encode()], dtype=object)})[1]["logits"]

    scaling, load_rows = [], []
    names: list[str] = []
    rss0 = rss_mb()
    try:
        for n in steps:
            new = [f"tenant-{i:04d}" for i in range(len(names), n)]
            random_adapters("minilm", [root / x for x in new], rank=4, seed=len(names))
            times = []
            for x in new:
                t0 = time.perf_counter()
                service.load(x)
                times.append((time.perf_counter() - t0) * 1e3)
            names += new
            got, want = over_grpc(names[-1], TEXTS[0]), in_process(names[-1], TEXTS[0])
            if not np.allclose(got, want, atol=1e-5):
                raise SystemExit(f"gRPC and in-process answers differ for {names[-1]}")
            one = closed_loop(in_process, names, 1, seconds, seed=n)
            host = service.registry
            scaling.append({"adapters": n, "load_p50_ms": statistics.median(times), "rss_mb": rss_mb(),
                            "rss_growth_mb": rss_mb() - rss0,
                            "host_folded_mb": sum(v.nbytes for v in host.host.values() if v.folded is not None) / 2**20,
                            "host_source_mb": sum(sum(len(b) for b in v.source.values()) for v in host.host.values()
                                                      if isinstance(v.source, dict)) / 2**20,
                            "in_process_p50_ms": one["p50_ms"], "in_process_p99_ms": one["p99_ms"],
                            "slot_evictions": host.stats["slot_evictions"]})
            log(f"{n:5d} adapters: load p50 {scaling[-1]['load_p50_ms']:.1f} ms, RSS {scaling[-1]['rss_mb']:.0f} MB, "
                f"batch-1 p50 {one['p50_ms']:.1f} ms")
            if n in load_counts:
                for c in clients:
                    for mode, call in (("grpc", over_grpc), ("in_process", in_process)):
                        r = closed_loop(call, names, c, seconds, seed=1000 * c + n)
                        load_rows.append({"adapters": n, "clients": c, "mode": mode, **r})
                        log(f"  {n} adapters, {c:2d} clients, {mode:10s}: p50 {r['p50_ms']:.1f} ms  p99 "
                            f"{r['p99_ms']:.1f} ms  {r['throughput_rps']:.1f} req/s")
    finally:
        channel.close()
        server.stop(grace=1.0)
    return {"scaling": scaling, "load": load_rows}


def plot(report: dict, path: Path) -> None:
    fig, (a1, a2) = figure(1, 2, figsize=(10, 3.8))
    s = report["scaling"]
    a1.plot([x["adapters"] for x in s], [x["in_process_p50_ms"] for x in s], "o-", label="batch-1 p50 ms")
    a1.plot([x["adapters"] for x in s], [x["rss_growth_mb"] / 10 for x in s], "s--", label="RSS growth / 10 MB")
    a1.set_xscale("log")
    a1.set_xlabel("registered adapters")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    for n in dict.fromkeys(r["adapters"] for r in report["load"]):
        for mode, style in (("grpc", "o-"), ("in_process", "s--")):
            pts = [r for r in report["load"] if r["adapters"] == n and r["mode"] == mode]
            a2.plot([p["clients"] for p in pts], [p["throughput_rps"] for p in pts], style, label=f"{n} adapters, {mode}")
    a2.set_xlabel("closed-loop clients")
    a2.set_ylabel("requests / s")
    a2.set_xscale("log", base=2)
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
    fig.suptitle(f"MiniLM, {report['backend']} engine, Zipf(1.1) traffic", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    environment()  # read at the start: the commit and machine this run measures
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="onnxruntime")
    p.add_argument("--seconds", type=float, default=6.0, help="length of each closed-loop run")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a test that it runs)")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/load_<backend>.json")
    args = p.parse_args(argv)
    out = args.out or Path(f"benchmarks/results/load_{args.backend}.json")
    if args.quick:
        steps, load_counts, clients, seconds = [1, 3], [3], [1, 2], 0.5
    else:
        steps, load_counts, clients, seconds = [1, 10, 100, 1000], [100, 1000], [1, 4, 16], args.seconds
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = run(backend=args.backend, steps=steps, load_counts=load_counts, clients=clients, seconds=seconds,
                  workdir=Path(tmp), log=print)
    report = {"benchmark": "load", **environment(), "backend": args.backend, "seconds_per_run": seconds,
              "zipf_exponent": 1.1, "adapter": "WaRA r=4 haar J=1, random, 5 labels", "quick": args.quick,
              "wall_seconds": time.perf_counter() - t0, **res}
    write_json(out, report)
    plot(report, out.with_suffix(".png"))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
