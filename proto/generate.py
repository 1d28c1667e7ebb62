"""Generate the Python gRPC stubs from proto/ into the runtime package.

    .venv/bin/python proto/generate.py           # write runtime/kserve/inference_pb2*.py
    .venv/bin/python proto/generate.py --check   # exit 1 if the committed stubs are stale

The proto's path (runtime/kserve/inference.proto, relative to proto/) makes the stubs import
each other as ``runtime.kserve``, and gives our descriptors their own file path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
SOURCES = ["runtime/kserve/inference.proto"]
OUTPUTS = ["inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py"]


def generate(out_root: Path) -> None:
    from grpc_tools import protoc

    for src in SOURCES:
        code = protoc.main([
            "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", str(PROTO_DIR / src),
        ])
        if code != 0:
            raise SystemExit(f"protoc failed on {src}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed stubs")
    args = parser.parse_args()
    target = ROOT / "runtime" / "kserve"
    if not args.check:
        generate(ROOT)
        print(f"wrote {', '.join(OUTPUTS)} to {target}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [f for f in OUTPUTS
                 if not (target / f).is_file() or (target / f).read_text() != (Path(tmp) / "runtime/kserve" / f).read_text()]
    if stale:
        print(f"stale generated stubs: {', '.join(stale)}; run: python proto/generate.py", file=sys.stderr)
        return 1
    print("generated stubs are current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
