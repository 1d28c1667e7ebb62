"""`wara serve`: the KServe-v2 gRPC server for base models and their adapters."""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (on 127.0.0.1 unless "
                                                    "metrics_host says otherwise)")
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
        service.metrics.serve(config.metrics_port, config.metrics_host)
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
    loaded = [v.name for v in service.registry.index()]
    bases = ", ".join(f"{b} ({e.platform.removeprefix('wara_')})" for b, e in service.engines.items())
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


def _reload(server) -> None:
    changed = server.reload_tls()
    print("SIGHUP: TLS certificate reloaded" if changed else "SIGHUP: TLS files unchanged (or no TLS)",
          file=sys.stderr, flush=True)
