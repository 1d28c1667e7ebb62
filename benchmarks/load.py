"""Ten thousand adapters on one node: start-up, memory, flat latency and cold starts.

Generated MiniLM adapters (random WaRA factors on all 36 layers, haar J=1, ranks 4 and 8 in
turn, each with its own head) are written to an adapter root; then, in one process, a server on
the first ``small`` of them (a root of hard links) and a server on all of them, both with the
default lazy start. Measured, all in one run:

* time to ready (indexing the root; no tensor is read) and the RSS each start adds;
* batch-1 latency over gRPC, one closed-loop client, each request's adapter drawn from a
  Zipf(1.1) law over the registered names, in rounds that alternate between the two servers
  (a ratio counts only from interleaved runs);
* the cold first request of adapters only on disk (read, checked, folded, written to the pool,
  answered) against a warm request of the same adapter right after;
* load -> servable: the time an adapter takes to enter the device tier (fold + pool write),
  from the repository's own timer, over the whole run;
* RSS per registered adapter after the traffic, with the host and device tiers' bytes, and
  the RSS one more adapter in the host tier costs (explicit loads), against its own bytes.

    .venv/bin/python -m benchmarks.load                    # 10,000 adapters: ~20 GB disk, ~10 min
    .venv/bin/python -m benchmarks.load --quick            # tiny (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment, figure, percentile, save_figure, write_json

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


def generate(root: Path, count: int, ranks: tuple[int, ...], *, log, seed: int = 0) -> None:
    """``count`` adapters named ``t00000``...: one template per rank from `random_adapters`
    (the real writer), then each adapter the template's tensors redrawn at the same scale."""
    import torch
    from safetensors.torch import load_file, save_file

    from wara_train.artifact import CONFIG_NAME, WEIGHTS_NAME
    from wara_train.synthetic import random_adapters

    templates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in ranks:
            random_adapters("minilm", [Path(tmp) / f"r{r}"], rank=r, seed=seed + r)
            t = load_file(str(Path(tmp) / f"r{r}" / WEIGHTS_NAME))
            templates[r] = ((Path(tmp) / f"r{r}" / CONFIG_NAME).read_bytes(), {k: (v.shape, float(v.std())) for k, v in t.items()})
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for i in range(count):
        config, shapes = templates[ranks[i % len(ranks)]]
        d = root / f"t{i:05d}"
        d.mkdir()
        (d / CONFIG_NAME).write_bytes(config)
        save_file({k: torch.randn(shape, generator=gen) * std for k, (shape, std) in shapes.items()}, str(d / WEIGHTS_NAME))
        if (i + 1) % 1000 == 0:
            log(f"  generated {i + 1} adapters ({time.perf_counter() - t0:.0f} s)")


def link_root(src: Path, dst: Path, names: list[str]) -> None:
    """A root of the first adapters as hard links (no copy, and inside its own root)."""
    for name in names:
        (dst / name).mkdir(parents=True)
        for f in (src / name).iterdir():
            os.link(f, dst / name / f.name)


def run(*, backend: str, small: int, large: int, rounds: int, seconds: float, cold: int, device_mb: float,
        host_mb: float, workdir: Path, log, root: Path | None = None, host_loads: int = 300) -> dict:
    import grpc

    from runtime.config import ServeConfig
    from runtime.kserve import inference_pb2 as pb
    from runtime.kserve import inference_pb2_grpc as pb_grpc
    from runtime.server import create_server
    from runtime.wire import decode_outputs

    if root is None or not root.is_dir() or len(os.listdir(root)) != large:
        if root is not None and root.is_dir() and os.listdir(root):
            raise SystemExit(f"{root} holds {len(os.listdir(root))} entries, not {large} generated adapters")
        root = root or workdir / "all"
        root.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        generate(root, large, (4, 8), log=log)
        log(f"generated {large} adapters in {time.perf_counter() - t0:.0f} s")
    names = sorted(os.listdir(root))
    small_root = workdir / "small"
    link_root(root, small_root, names[:small])

    servers = {}
    report: dict = {"starts": {}, "rounds": [], "cold": {}}
    # Device entries (fold + pool write) and host entries (read + check), as the repository times them.
    entries: dict[str, list[float]] = {"device": [], "host": []}
    from runtime.adapters.disk import Catalog

    gc_rss, t = rss_mb(), time.perf_counter()
    catalog = Catalog(root).scan()  # the index alone: what start-up reads for every adapter
    report["index_alone"] = {"adapters": len(catalog), "seconds": time.perf_counter() - t,
                             "rss_per_adapter_kb": (rss_mb() - gc_rss) * 1024 / max(1, len(catalog))}
    log(f"index alone: {len(catalog)} adapters in {report['index_alone']['seconds']:.2f} s, "
        f"{report['index_alone']['rss_per_adapter_kb']:.2f} KB RSS each")
    del catalog
    rss0 = rss_mb()
    for label, path, n in (("small", small_root, small), ("large", root, large)):
        before = rss_mb()
        t = time.perf_counter()
        config = ServeConfig(port=0, adapter_root=str(path), bases=("minilm",), backend=backend, auto_merge=False,
                             max_delay_ms=1.0, device_budget_mb=device_mb, host_budget_mb=host_mb)
        server, port = create_server(config)
        ready = time.perf_counter() - t
        repository = server.service.repository
        repository.observe = lambda tier, s, _o=repository.observe: (entries[tier].append(s * 1e3), _o(tier, s))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        servers[label] = (server, channel, stub, n)
        report["starts"][label] = {"adapters": n, "ready_s": ready, "rss_added_mb": rss_mb() - before,
                                   "index_s": repository.catalog.seconds,
                                   "tensors_read_at_start": len(repository.current)}
        log(f"{label}: {n} adapters, ready in {ready:.2f} s (index {repository.catalog.seconds:.2f} s), "
            f"RSS +{rss_mb() - before:.0f} MB")

    def call(stub, name: str, text: str) -> float:
        req = pb.ModelInferRequest(model_name=name)
        req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(text.encode())
        t = time.perf_counter()
        decode_outputs(stub.ModelInfer(req, timeout=60))
        return (time.perf_counter() - t) * 1e3

    try:
        # Cold first requests: adapters of the large root no request touched yet, each then warm.
        stub = servers["large"][2]
        rng = np.random.default_rng(7)
        call(stub, names[-1], TEXTS[0])  # the first request of a server pays one-time costs
        pick = [names[i] for i in rng.choice(np.arange(len(names) // 2, len(names) - 1), size=cold, replace=False)]
        cold_ms, warm_ms = [], []
        for name in pick:
            cold_ms.append(call(stub, name, TEXTS[1]))
            warm_ms.append(call(stub, name, TEXTS[1]))
        report["cold"] = {"adapters": cold, "cold_p50_ms": statistics.median(cold_ms), "warm_p50_ms": statistics.median(warm_ms),
                          "ratio_p50": statistics.median(cold_ms) / statistics.median(warm_ms)}
        log(f"cold first request p50 {report['cold']['cold_p50_ms']:.1f} ms, warm {report['cold']['warm_p50_ms']:.1f} ms")

        # Zipf traffic, rounds alternating between the two servers; round 0 warms the tiers up
        # (the first touches of the popular adapters) and is reported, not counted.
        for k in range(rounds + 1):
            for label in ("small", "large"):
                _, _, stub, n = servers[label]
                reg = servers[label][0].service.repository
                weights = zipf_weights(n)
                rng = np.random.default_rng(1000 * k + n)
                lat, hit, miss = [], [], []
                end = time.perf_counter() + seconds
                while time.perf_counter() < end:
                    before = reg.stats["slot_misses"]
                    ms = call(stub, names[int(rng.choice(n, p=weights))], TEXTS[int(rng.integers(len(TEXTS)))])
                    lat.append(ms)
                    (miss if reg.stats["slot_misses"] > before else hit).append(ms)
                report["rounds"].append({"round": k, "warmup": k == 0, "server": label, "adapters": n,
                                         "requests": len(lat), "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
                                         "device_misses": len(miss), "hit_p50_ms": percentile(hit, 50) if hit else None,
                                         "miss_p50_ms": percentile(miss, 50) if miss else None})
                log(f"round {k} {label:5s}: {len(lat)} requests, p50 {percentile(lat, 50):.2f} ms, "
                    f"p99 {percentile(lat, 99):.2f} ms, {len(miss)} device misses"
                    + (f" (p50 {percentile(miss, 50):.1f} ms; hits {percentile(hit, 50):.1f} ms)" if miss and hit else ""))
        # The host tier's cost per adapter: explicit loads of adapters not touched yet.
        service = servers["large"][0].service
        fresh = [n for n in names if n not in service.repository.current][:host_loads]
        before, own = rss_mb(), 0
        for name in fresh:
            own += service.load_now(name).nbytes
        report["host_loads"] = {"adapters": len(fresh), "rss_per_adapter_mb": (rss_mb() - before) / max(1, len(fresh)),
                                "own_bytes_per_adapter_mb": own / max(1, len(fresh)) / 2**20}
        log(f"host tier: {len(fresh)} loads, RSS +{report['host_loads']['rss_per_adapter_mb']:.2f} MB per adapter "
            f"(own factors {report['host_loads']['own_bytes_per_adapter_mb']:.2f} MB)")
        # The host and device tiers' residents (the disk tier, the root's index, is not a memory tier).
        tiers = {label: {t: v for t, v in servers[label][0].service.repository.tiers()[0].items() if t in ("host", "device")}
                 for label in servers}
        report["memory"] = {"rss_mb": rss_mb(), "rss_growth_mb": rss_mb() - rss0,
                            "tiers_mb": {label: {t: b / 2**20 for t, (_, b) in v.items()} for label, v in tiers.items()},
                            "resident": {label: {t: c for t, (c, _) in v.items()} for label, v in tiers.items()}}
    finally:
        for server, channel, _, _ in servers.values():
            channel.close()
            server.stop(grace=1.0)
    counted = [r for r in report["rounds"] if not r["warmup"]]
    p50 = {label: statistics.median(r["p50_ms"] for r in counted if r["server"] == label) for label in servers}
    report["p50_ratio"] = p50["large"] / p50["small"]
    report["p50_ratio_per_round"] = [b["p50_ms"] / a["p50_ms"] for a, b in zip(counted[::2], counted[1::2])]
    start = report["starts"]["large"]
    report["rss_per_registered_mb"] = (report["memory"]["rss_growth_mb"] - report["starts"]["small"]["rss_added_mb"]) / large
    report["rss_per_registered_at_start_mb"] = (start["rss_added_mb"] - report["starts"]["small"]["rss_added_mb"]) / (large - small)
    report["device_entry_ms"] = {"count": len(entries["device"]), "p50": percentile(entries["device"], 50),
                                 "p99": percentile(entries["device"], 99)}
    report["host_entry_ms"] = {"count": len(entries["host"]), "p50": percentile(entries["host"], 50) if entries["host"] else None}
    return report


def plot(report: dict, path: Path) -> None:
    fig, (a1, a2) = figure(1, 2, figsize=(10, 3.8))
    for label, style in (("small", "o-"), ("large", "s--")):
        pts = [r for r in report["rounds"] if r["server"] == label and not r["warmup"]]
        n = pts[0]["adapters"]
        a1.plot([p["round"] for p in pts], [p["p50_ms"] for p in pts], style, label=f"{n} adapters p50")
        a1.plot([p["round"] for p in pts], [p["p99_ms"] for p in pts], style, alpha=0.4, label=f"{n} adapters p99")
    a1.set_xlabel("round (interleaved)")
    a1.set_ylabel("batch-1 ms over gRPC")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    c = report["cold"]
    a2.bar(["warm", "cold (disk)", "device entry"], [c["warm_p50_ms"], c["cold_p50_ms"], report["device_entry_ms"]["p50"]])
    a2.set_ylabel("p50 ms")
    a2.grid(alpha=0.3, axis="y")
    fig.suptitle(f"MiniLM, {report['backend']} engine, Zipf(1.1) over the registered adapters", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    environment()  # read at the start: the commit and machine this run measures
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="onnxruntime")
    p.add_argument("--adapters", type=int, default=10000)
    p.add_argument("--small", type=int, default=100, help="adapters of the server compared against")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=8.0, help="length of each round")
    p.add_argument("--cold", type=int, default=30, help="adapters whose first request is timed")
    p.add_argument("--device-budget-mb", type=float, default=1024.0)
    p.add_argument("--host-budget-mb", type=float, default=2048.0)
    p.add_argument("--workdir", type=Path, default=None, help="where the adapters are written (default a temp dir)")
    p.add_argument("--root", type=Path, default=None,
                   help="keep the generated adapters here (generated when empty; reused by the next run)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a test that it runs)")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/load_<backend>.json")
    args = p.parse_args(argv)
    out = args.out or Path(f"benchmarks/results/load_{args.backend}.json")
    if args.quick:
        args.adapters, args.small, args.rounds, args.seconds, args.cold = 12, 4, 2, 0.5, 3
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        res = run(backend=args.backend, small=args.small, large=args.adapters, rounds=args.rounds, seconds=args.seconds,
                  cold=args.cold, device_mb=args.device_budget_mb, host_mb=args.host_budget_mb, workdir=Path(tmp), log=print,
                  root=args.root, host_loads=3 if args.quick else 300)
    report = {"benchmark": "load", **environment(), "backend": args.backend, "seconds_per_round": args.seconds,
              "zipf_exponent": 1.1, "adapter": "WaRA haar J=1 on MiniLM's 36 layers, ranks 4 and 8, random, 5 labels",
              "device_budget_mb": args.device_budget_mb, "host_budget_mb": args.host_budget_mb, "quick": args.quick,
              "wall_seconds": time.perf_counter() - t0, **res}
    write_json(out, report)
    plot(report, out.with_suffix(".png"))
    print(json.dumps({k: report[k] for k in ("p50_ratio", "rss_per_registered_mb", "device_entry_ms", "cold")}, indent=1))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
