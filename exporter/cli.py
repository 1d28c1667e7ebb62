"""`wara export {merge,lora,onnx,tensorrt,verify}`: thin wrappers over the exporter functions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wara_train.errors import ConfigError

FORMS = ("merged", "unmerged", "multi", "base")
DTYPES = ("float32", "float16", "bfloat16")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="merge, fold to LoRA, export ONNX / TensorRT, verify")
    ex = p.add_subparsers(dest="export_command", required=True, metavar="FORM")

    m = ex.add_parser("merge", help="merge adapter(s) into a copy of the base weights")
    m.add_argument("--adapter", action="append", required=True, type=Path,
                   help="adapter directory; repeat to blend several")
    m.add_argument("--weight", action="append", type=float,
                   help="blend weight per --adapter, in order (default 1 each)")
    m.add_argument("--out", required=True, type=Path, help="output directory (model.safetensors, config.json)")
    m.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")

    lo = ex.add_parser("lora", help="fold into an equivalent peft LoRA adapter")
    lo.add_argument("--adapter", required=True, type=Path)
    lo.add_argument("--out", required=True, type=Path)

    o = ex.add_parser("onnx", help="export an ONNX graph")
    o.add_argument("--adapter", required=True, type=Path)
    o.add_argument("--form", choices=FORMS, default="merged",
                   help="merged (plain graph), unmerged (explicit WaRA ops), multi (factors as inputs), base")
    o.add_argument("--out", required=True, type=Path, help="output .onnx file")
    o.add_argument("--image-size", type=int, default=64, help="input size for vision bases (default 64)")

    t = ex.add_parser("tensorrt", help="build a TensorRT engine from an exported ONNX graph")
    t.add_argument("--onnx", required=True, type=Path)
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16")

    v = ex.add_parser("verify", help="run an exported form against the PyTorch unmerged model")
    v.add_argument("--adapter", required=True, type=Path)
    v.add_argument("--exported", required=True, type=Path,
                   help="an .onnx file, a merged directory, or a peft LoRA directory")
    v.add_argument("--atol", type=float, default=1e-4, help="max abs error allowed (default 1e-4)")


def run(args: argparse.Namespace) -> int:
    return {"merge": _merge, "lora": _lora, "onnx": _onnx, "tensorrt": _tensorrt, "verify": _verify}[
        args.export_command
    ](args)


def _merge(args: argparse.Namespace) -> int:
    import torch

    from .common import load_with_base
    from .merge import merged_state_dict, model_config, save_merged

    weights = args.weight or [1.0] * len(args.adapter)
    if len(weights) != len(args.adapter):
        raise ConfigError(f"{len(weights)} --weight values for {len(args.adapter)} --adapter directories")
    loaded = [load_with_base(a) for a in args.adapter]
    base = loaded[0][1]
    adapters = [(a, w) for (a, _), w in zip(loaded, weights)]
    first = adapters[0][0]
    state = merged_state_dict(base, adapters, base_model=first.base_model, dtype=getattr(torch, args.dtype))
    config = {
        "format": "wara-merged",
        "base_model": first.base_model,
        "labels": first.labels,
        "dtype": args.dtype,
        "sources": [{"adapter": str(p), "content_hash": a.content_hash, "weight": w} for p, (a, w) in zip(args.adapter, adapters)],
        "model_config": model_config(base),
    }
    out = save_merged(state, args.out, config=config)
    print(f"merged {len(adapters)} adapter(s) into {out / 'model.safetensors'} ({args.dtype}, {len(state)} tensors)")
    return 0


def _lora(args: argparse.Namespace) -> int:
    from .common import conv_targets, load_with_base
    from .lora import save_peft_lora

    adapter, base = load_with_base(args.adapter)
    out = save_peft_lora(adapter, args.out, conv_modules=conv_targets(adapter, base))
    cfg = json.loads((out / "adapter_config.json").read_text())
    print(f"wrote a peft LoRA adapter (rank {cfg['r']}, {len(cfg['target_modules'])} layers) to {out}")
    return 0


def _onnx(args: argparse.Namespace) -> int:
    from .common import load_with_base
    from .onnx_export import export_onnx, model_io

    adapter, base = load_with_base(args.adapter)
    export_onnx(adapter, base, args.form, args.out, io=model_io(adapter.base_model, image_size=args.image_size))
    return 0


def _tensorrt(args: argparse.Namespace) -> int:
    from .tensorrt import build_engine

    build_engine(args.onnx, args.out, precision=args.precision)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_exported

    result = verify_exported(args.adapter, args.exported, atol=args.atol)
    print(result)
    return 0 if result.ok else 1
