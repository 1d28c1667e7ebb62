"""`wara export {merge,lora,onnx,tensorrt,verify}`: thin wrappers over the exporter functions.

`add_parser(sub)` adds the ``export`` command to the umbrella CLI's subparsers; `run(args)` runs
it. ``--base SOURCE`` names the adapter's base when it is not built in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wara_train.errors import ConfigError

FORMS = ("merged", "unmerged", "multi", "base")
DTYPES = ("float32", "float16", "bfloat16")
BASE_HELP = ("the adapter's base, when it is not built in: hf:PATH[@TASK] or py:module:function "
             "(default: the built-in the adapter names, or the source it was trained from)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="merge, fold to LoRA, export ONNX / TensorRT, verify")
    ex = p.add_subparsers(dest="export_command", required=True, metavar="FORM")

    m = ex.add_parser("merge", help="merge adapter(s) into a copy of the base weights")
    m.add_argument("--adapter", action="append", required=True, type=Path,
                   help="adapter directory; repeat to blend several")
    m.add_argument("--weight", action="append", type=float,
                   help="blend weight per --adapter, in order (default 1 each)")
    m.add_argument("--out", required=True, type=Path,
                   help="output directory: a transformers model directory for transformers bases, else "
                        "model.safetensors + config.json; wara_merged.json says how it was made")
    m.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    m.add_argument("--base", metavar="SOURCE", help=BASE_HELP)

    lo = ex.add_parser("lora", help="fold into an equivalent peft LoRA adapter")
    lo.add_argument("--adapter", required=True, type=Path)
    lo.add_argument("--out", required=True, type=Path)
    lo.add_argument("--base", metavar="SOURCE", help=BASE_HELP)

    o = ex.add_parser("onnx", help="export an ONNX graph")
    o.add_argument("--adapter", required=True, type=Path)
    o.add_argument("--form", choices=FORMS, default="merged",
                   help="merged (plain graph), unmerged (explicit WaRA ops), multi (factors as inputs), base")
    o.add_argument("--out", required=True, type=Path, help="output .onnx file")
    o.add_argument("--image-size", type=int, default=None,
                   help="sample image size for vision bases that take any size (default: the base's sample)")
    o.add_argument("--base", metavar="SOURCE", help=BASE_HELP)

    t = ex.add_parser("tensorrt", help="build a TensorRT engine from an exported ONNX graph")
    t.add_argument("--onnx", required=True, type=Path)
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16")

    v = ex.add_parser("verify", help="run an exported form against the PyTorch unmerged model")
    v.add_argument("--adapter", required=True, type=Path)
    v.add_argument("--exported", required=True, type=Path,
                   help="an .onnx file, a merged directory, or a peft LoRA directory")
    v.add_argument("--atol", type=float, default=1e-4, help="max abs error allowed (default 1e-4)")
    v.add_argument("--base", metavar="SOURCE", help=BASE_HELP)


def run(args: argparse.Namespace) -> int:
    return {"merge": _merge, "lora": _lora, "onnx": _onnx, "tensorrt": _tensorrt, "verify": _verify}[
        args.export_command
    ](args)


def _merge(args: argparse.Namespace) -> int:
    from wara_train.artifact import check_compatible, load_adapter

    from .common import load_with_base
    from .merge import save_merged

    weights = args.weight or [1.0] * len(args.adapter)
    if len(weights) != len(args.adapter):
        raise ConfigError(f"{len(weights)} --weight values for {len(args.adapter)} --adapter directories")
    first, spec, base = load_with_base(args.adapter[0], args.base)
    adapters = [first] + [load_adapter(a) for a in args.adapter[1:]]
    for a in adapters[1:]:
        check_compatible(a, base)  # one base for all: by fingerprint
    out = save_merged(base, list(zip(adapters, weights)), args.out, spec=spec, dtype=args.dtype, sources=args.adapter)
    kind = f"a {spec.hf.auto_class} directory" if spec.hf else "model.safetensors"
    print(f"merged {len(adapters)} adapter(s) into {out} ({kind}, {args.dtype})")
    return 0


def _lora(args: argparse.Namespace) -> int:
    from .common import load_with_base
    from .lora import save_peft_lora

    adapter, spec, base = load_with_base(args.adapter, args.base)
    out = save_peft_lora(adapter, args.out, spec=spec, base=base)
    cfg = json.loads((out / "adapter_config.json").read_text())
    print(f"wrote a peft LoRA adapter (rank {cfg['r']}, {len(cfg['target_modules'])} layers) to {out}")
    return 0


def _onnx(args: argparse.Namespace) -> int:
    from .common import load_with_base
    from .onnx_export import export_onnx, model_io

    adapter, spec, base = load_with_base(args.adapter, args.base)
    export_onnx(adapter, base, args.form, args.out, spec=spec, io=model_io(spec, image_size=args.image_size))
    return 0


def _tensorrt(args: argparse.Namespace) -> int:
    from .tensorrt import build_engine

    build_engine(args.onnx, args.out, precision=args.precision)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_exported

    result = verify_exported(args.adapter, args.exported, atol=args.atol, source=args.base)
    print(result)
    return 0 if result.ok else 1
