"""The `wara` command. Subcommands: train, demo, export, serve, bench, token."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wara_train.errors import ConfigError, WaraError


def _add_train(sub: argparse._SubParsersAction) -> None:
    from wara_train.config import MODES
    from wara_train.tasks import TASKS

    p = sub.add_parser("train", help="fine-tune a WaRA adapter: a built-in task, or any base on your data",
                       description="Either --task NAME (a built-in recipe: base, offline data and defaults), "
                                   "or --base SOURCE --data PATH for any base on your own data.")
    p.add_argument("--task", choices=sorted(TASKS), help="built-in recipe")
    p.add_argument("--base", help="base model: a built-in name, hf:PATH[@TASK] (a transformers model directory; "
                                  "TASK: feature-extraction, text-classification, image-classification, "
                                  "text-generation; default: read off its config's architectures) or "
                                  "py:package.module:function")
    p.add_argument("--data", type=Path, help="a JSONL file of {\"text\": ..., \"label\": ...} lines, "
                                             "or an image folder ROOT/<label>/<file>.png|jpg; for a text-generation "
                                             "base, JSONL lines of {\"prompt\": ..., \"completion\": ...} or "
                                             "{\"messages\": [...]} (the loss is on the completion / last "
                                             "assistant message only)")
    p.add_argument("--eval-data", type=Path, help="held-out data in the same form (default: a seeded 20%% split "
                                                  "of --data; 10%% for a text-generation base)")
    p.add_argument("--base-name", help="the name the adapter records for its base (default: the built-in's name, "
                                       "the directory's or the function's)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per text (default 128; 256 per example for a text-generation base)")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    p.add_argument("--rank", type=int, default=4, help="rank r per coefficient block (default 4)")
    p.add_argument("--alpha", type=float, default=None, help="scaling alpha; ΔW is scaled by alpha/r (default 2r)")
    p.add_argument("--wavelet", default="haar", help="orthogonal wavelet: haar, dbN, symN, coifN (default haar)")
    p.add_argument("--mode", default="periodization", choices=MODES, help="boundary treatment (default periodization)")
    p.add_argument("--levels", type=int, default=1, help="wavelet levels J (default 1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the task's)")
    p.add_argument("--steps", type=int, default=None, help="stop after N optimizer steps (smoke run)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the task's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the task's)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data split and order (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_train(args: argparse.Namespace) -> int:
    from wara_train.tasks import train_on_base, train_task

    if args.task and (args.base or args.data or args.eval_data or args.base_name):
        raise ConfigError("--task is a built-in recipe: use either --task NAME or --base SOURCE --data PATH, not both")
    if not args.task:
        if not (args.base and args.data):
            raise ConfigError("give --task NAME (a built-in recipe) or both --base SOURCE and --data PATH")
        train_on_base(args.base, args.data, args.out, eval_data=args.eval_data, base_name=args.base_name,
                      rank=args.rank, alpha=args.alpha, wavelet=args.wavelet, mode=args.mode, levels=args.levels,
                      epochs=args.epochs, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      max_length=args.max_length, progress=not args.no_progress)
        return 0
    train_task(
        args.task, args.out, rank=args.rank, alpha=args.alpha, wavelet=args.wavelet, mode=args.mode,
        levels=args.levels, epochs=args.epochs, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        seed=args.seed, progress=not args.no_progress,
    )
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the end-to-end demo on the built-in models")
    p.add_argument("--out", type=Path, default=Path(".wara-cache/demo"), help="where the demo keeps its adapters")
    p.add_argument("--steps", type=int, default=None, help="cap optimizer steps per adapter (a quick run)")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, steps=args.steps)


BENCHES = {"quality": "benchmarks.quality", "latency": "benchmarks.latency", "multitenant": "benchmarks.multitenant",
           "hotswap": "benchmarks.hotswap", "load": "benchmarks.load", "grpc-overhead": "benchmarks.grpc_overhead",
           "ray-scale": "benchmarks.ray_scale",
           "all": "benchmarks.run"}


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (JSON + plot under benchmarks/results/)",
                       description="Run one benchmark; arguments after its name go to it (try: wara bench quality --help).")
    p.add_argument("name", choices=sorted(BENCHES), help="which benchmark ('all' = make bench)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")


def _run_bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(BENCHES[args.name]).main(args.args)


def _add_token(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="make a bearer token for a [[serve.tenant]] (the config stores its hash)",
                       description="Print a new token on stdout and, on stderr, the [[serve.tenant]] table with "
                                   "its hash. The token is shown once and stored nowhere.")
    p.add_argument("--tenant", help="the tenant's name in the snippet (default my-tenant)")
    p.add_argument("--admin", action="store_true", help="the snippet grants admin (every adapter, load/unload)")
    p.add_argument("--hash", action="store_true", help="read an existing token from stdin; print only its hash")


def _run_token(args: argparse.Namespace) -> int:
    from runtime.auth import hash_token, new_token, toml_snippet

    if args.hash:
        if args.admin or args.tenant is not None:
            raise ConfigError("--hash prints the hash of a token read from stdin; it takes no --tenant or --admin")
        import getpass

        token = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.read().strip()
        if not token or len(token.split()) != 1 or token.startswith("sha256:"):
            raise ConfigError("--hash reads one token (no spaces) from stdin, not a hash")
        print(hash_token(token))
        return 0
    token = new_token()
    snippet = toml_snippet(args.tenant or "my-tenant", hash_token(token), admin=args.admin)
    print(token, flush=True)
    print("The token above is shown once and stored nowhere: give it to the client now.\n"
          "Paste this into the serve config (only the hash):\n\n" + snippet, file=sys.stderr, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wara", description="Train, export and serve WaRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_demo(sub)
    from exporter.cli import add_parser as add_export

    add_export(sub)
    from runtime.cli import add_parser as add_serve

    add_serve(sub)
    _add_bench(sub)
    _add_token(sub)
    return parser


def _run_export(args: argparse.Namespace) -> int:
    from exporter.cli import run

    return run(args)


def _run_serve(args: argparse.Namespace) -> int:
    from runtime.cli import run

    return run(args)


COMMANDS = {"train": _run_train, "demo": _run_demo, "export": _run_export, "serve": _run_serve, "bench": _run_bench,
            "token": _run_token}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except WaraError as e:
        print(f"wara {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wara {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
