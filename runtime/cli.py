"""`wara serve`: the KServe-v2 gRPC server for base models and their adapters."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


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
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"),
                   help="engine: auto (default: onnxruntime for MiniLM on CPU, else PyTorch), torch, onnxruntime")


def run(args: argparse.Namespace) -> int:
    import logging

    from .config import BaseEntry, ServeConfig
    from .server import create_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):  # the ONNX exporter's own notices at start-up
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = ServeConfig.from_toml(args.config) if args.config else ServeConfig()
    bases = tuple(BaseEntry.parse(b) for b in args.base) if args.base else None
    config = config.replace(host=args.host, port=args.port, adapter_root=args.adapter_root,
                            metrics_port=args.metrics_port, backend=args.backend, bases=bases)
    server, port = create_server(config)
    service = server.service
    if config.metrics_port is not None:
        service.metrics.serve(config.metrics_port, config.host)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    loaded = [v.name for v in service.registry.index()]
    bases = ", ".join(f"{b} ({e.platform.removeprefix('wara_')})" for b, e in service.engines.items())
    print(f"adapters: {', '.join(loaded) or 'none'}; bases: {bases}", file=sys.stderr)
    print(f"serving on {config.host}:{port}", flush=True)
    stop.wait()
    print(f"draining (grace {config.grace_s:.0f}s) ...", file=sys.stderr, flush=True)
    server.stop(config.grace_s)
    print("stopped", file=sys.stderr, flush=True)
    return 0
