"""Single-request latency over gRPC versus the same call in-process, MiniLM batch 1.

Starts a real server on a free port with one random adapter, checks that both paths give the
same answer, then times them interleaved (gRPC, in-process, gRPC, ...) and reports p50/p99.

    .venv/bin/python -m benchmarks.grpc_overhead            # 200 requests each
    .venv/bin/python -m benchmarks.grpc_overhead --quick    # a tiny run (used by the tests)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment, percentile, write_json


def run(n: int, workdir: Path, backend: str = "torch") -> dict:
    import grpc

    from runtime.config import ServeConfig
    from runtime.kserve import inference_pb2 as pb
    from runtime.kserve import inference_pb2_grpc as pb_grpc
    from runtime.server import create_server, decode_outputs
    from wara_train.synthetic import random_adapter

    random_adapter("minilm", workdir / "tenant", rank=4, seed=0)
    config = ServeConfig(port=0, adapter_root=str(workdir), bases=("minilm",), max_delay_ms=0.0, backend=backend,
                         auto_merge=False)
    server, port = create_server(config)
    service = server.service
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    text = "What is artificial intelligence and how do computers learn?"
    req = pb.ModelInferRequest(model_name="tenant")
    req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(text.encode())
    inputs = {"text": np.array([text.encode()], dtype=object)}
    try:
        over_grpc = decode_outputs(stub.ModelInfer(req))["logits"]
        in_process = service.predict("tenant", inputs)[1]["logits"]
        if not np.allclose(over_grpc, in_process, atol=1e-5):
            raise SystemExit("gRPC and in-process answers differ")
        for _ in range(10):
            stub.ModelInfer(req)
            service.predict("tenant", inputs)
        times = {"grpc": [], "in_process": []}
        for _ in range(n):
            t0 = time.perf_counter()
            stub.ModelInfer(req)
            times["grpc"].append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            service.predict("tenant", inputs)
            times["in_process"].append((time.perf_counter() - t0) * 1e3)
    finally:
        channel.close()
        server.stop(grace=1.0)
    report = {k: {"p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99), "mean_ms": statistics.mean(v)} for k, v in times.items()}
    report["grpc_overhead_p50_ms"] = report["grpc"]["p50_ms"] - report["in_process"]["p50_ms"]
    return {"benchmark": "grpc_overhead", **environment(), "backend": backend, "requests_each": n, "model": "minilm + WaRA r=4 haar J=1 (random)",
            "input": "BYTES text, server-side tokenization, batch 1", "results": report}


def main(argv: list[str] | None = None) -> int:
    environment()  # read at the start: the commit and machine this run measures
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/grpc_overhead_<backend>.json")
    args = p.parse_args(argv)
    args.out = args.out or Path(f"benchmarks/results/grpc_overhead_{args.backend}.json")
    with tempfile.TemporaryDirectory() as tmp:
        report = run(5 if args.quick else args.requests, Path(tmp), args.backend)
    write_json(args.out, report)
    r = report["results"]
    print(f"gRPC       p50 {r['grpc']['p50_ms']:.2f} ms  p99 {r['grpc']['p99_ms']:.2f} ms")
    print(f"in-process p50 {r['in_process']['p50_ms']:.2f} ms  p99 {r['in_process']['p99_ms']:.2f} ms")
    print(f"gRPC overhead at p50: {r['grpc_overhead_p50_ms']:.2f} ms   ({args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
