"""`wara serve`: the KServe-v2 gRPC server for base models and their adapters."""

from __future__ import annotations

import argparse
import dataclasses
import asyncio
import os
import signal
import sys
import threading
from pathlib import Path

from wara_train.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve base models and WaRA adapters over gRPC (KServe v2)")
    p.add_argument("--config", type=Path, help="TOML config ([serve] table; flags override it)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8001; 0 picks a free one)")
    p.add_argument("--adapter-root", help="directory of adapters, each loaded at start and loadable by name")
    p.add_argument("--base", action="append", metavar="NAME=SOURCE[@TASK]",
                   help="serve a base under NAME; SOURCE: a built-in name, hf:PATH (a transformers model directory) "
                        "or py:package.module:function; TASK: feature-extraction, text-classification, "
                        "image-classification. Repeat for several (default: every built-in base)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (on 127.0.0.1 unless "
                                                    "metrics_host says otherwise; no authentication, and its labels "
                                                    "name every tenant and adapter)")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"),
                   help="engine: auto (default: onnxruntime for MiniLM on CPU, else PyTorch), torch, onnxruntime")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "auto"),
                   help="what every base computes in unless its [[serve.base]] table sets dtype (default float32); "
                        "auto: bfloat16 where the CPU has AMX or AVX-512 BF16 (or CUDA has bf16) and the engine "
                        "runs it, else float32")
    ray = p.add_argument_group("scale-out on Ray Serve (the ray extra)")
    ray.add_argument("--ray", action="store_true",
                     help="serve as a Ray Serve application: REPLICAS full serving cores behind this endpoint, routed "
                          "by adapter (a [serve.ray] table in --config does the same)")
    ray.add_argument("--replicas", type=int, metavar="N", help="replicas (default 2)")
    ray.add_argument("--ray-address", metavar="ADDR",
                     help="join this Ray cluster ('auto' on one of its nodes, or HOST:6379) instead of starting a local one")


def config_from_args(args: argparse.Namespace):
    """The `ServeConfig` of ``wara serve``'s arguments: the TOML file, then the flags over it."""
    from .config import BaseEntry, RayConfig, ServeConfig

    config = ServeConfig.from_toml(args.config) if args.config else ServeConfig()
    bases = tuple(BaseEntry.parse(b) for b in args.base) if args.base else None
    config = config.replace(host=args.host, port=args.port, adapter_root=args.adapter_root,
                            metrics_port=args.metrics_port, backend=args.backend, dtype=args.dtype, bases=bases)
    if args.ray or config.ray is not None:
        overrides = {k: v for k, v in (("replicas", args.replicas), ("address", args.ray_address)) if v is not None}
        config = config.replace(ray=dataclasses.replace(config.ray or RayConfig(), **overrides))
    elif args.replicas is not None or args.ray_address is not None:
        raise ConfigError("--replicas and --ray-address need --ray (or a [serve.ray] table in --config)")
    return config


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):  # the ONNX exporter's own notices at start-up
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = config_from_args(args)
    if config.ray is not None:
        from .ray_serve import start_cluster

        server, port = start_cluster(config)
        ray = config.ray
        print(f"Ray Serve: application {ray.app_name!r}, {ray.replicas} replicas of {ray.replica_cpus:g} CPUs "
              f"on {ray.address or 'a local cluster'}", file=sys.stderr)
    else:
        from .server import create_server

        server, port = create_server(config)
    service = server.service
    if config.metrics_port is not None:
        httpd = service.metrics.serve(config.metrics_port, config.metrics_host)[0]
        print(f"metrics on http://{config.metrics_host}:{httpd.server_port}/metrics", file=sys.stderr)
    stop = threading.Event()

    def on_stop(signum, _frame) -> None:
        if stop.is_set():  # a second signal: no more waiting
            print(f"second {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=_reload, args=(server,), daemon=True).start())
    loaded, bases = asyncio.run(_summary(service, [b.name for b in config.bases]))
    security = ("TLS" + (" + client certificates" if config.tls_client_ca else "") if config.tls else "plaintext") + \
        (f", {len(config.tenants)} tenants" if config.tenants else ", no authentication")
    print(f"adapters: {', '.join(loaded) or 'none'}; bases: {bases}; {security}", file=sys.stderr)
    print(f"serving on {config.host}:{port}", flush=True)
    while not stop.wait(0.5):  # a timed wait, so signals are handled promptly
        pass
    print(f"draining (grace {config.grace_s:.0f}s; a second signal exits at once) ...", file=sys.stderr, flush=True)
    server.stop(config.grace_s)
    print("stopped", file=sys.stderr, flush=True)
    return 0


async def _summary(core, base_names: list[str]) -> tuple[list[str], str]:
    """(adapters loaded, "base (engine), ...") from the serving core."""
    rows = await core.index(ready_only=True)
    loaded = [r.name for r in rows if r.name not in base_names]
    infos = [await core.metadata(b) for b in base_names]
    return loaded, ", ".join(f"{i.name} ({i.platform.split(':')[0].removeprefix('wara_')})" for i in infos)


def _reload(server) -> None:
    changed = server.reload_tls()
    print("SIGHUP: TLS certificate reloaded" if changed else "SIGHUP: TLS files unchanged (or no TLS)",
          file=sys.stderr, flush=True)
