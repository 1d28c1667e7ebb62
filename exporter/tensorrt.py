"""ONNX -> TensorRT engine (optional: needs the `tensorrt` extra and an NVIDIA GPU).

TensorRT cannot be installed on our CPU machines (DESIGN.md 6), so this module imports it lazily
and fails with a message naming the extra. The graphs we export stay inside what its ONNX parser
accepts: opset <= 20, weights as initializers, model-local functions built from standard ops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

from wara_train.errors import ConfigError

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")

# (min, opt, max) for each named dynamic axis our exporter writes.
DEFAULT_PROFILE: dict[str, tuple[int, int, int]] = {
    "batch": (1, 8, 64),
    "seq": (2, 64, 512),
    "slots": (1, 8, 64),
    "rank": (1, 16, 64),
    "labels": (1, 32, 1024),
}


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ConfigError(
            "TensorRT engines need the 'tensorrt' extra and an NVIDIA GPU: pip install 'wara-serve[tensorrt]' "
            f"(tensorrt is not importable here: {e})"
        ) from None
    return trt


def build_engine(
    onnx_path: str | Path,
    out: str | Path,
    *,
    precision: Precision = "fp16",
    profile: dict[str, tuple[int, int, int]] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Parse the ONNX graph, add one optimisation profile over its dynamic axes, set the
    precision flag, and write the serialized engine."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: valid values are {', '.join(PRECISIONS)}")
    trt = import_tensorrt()
    ranges = {**DEFAULT_PROFILE, **(profile or {})}
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if all(d >= 0 for d in shape):
            continue
        names = _dim_names(onnx_path, tensor.name)
        lo, mid, hi = ([d if d >= 0 else ranges.get(names[k], (1, 1, 1))[j] for k, d in enumerate(shape)] for j in range(3))
        opt_profile.set_shape(tensor.name, lo, mid, hi)
    config.add_optimization_profile(opt_profile)
    log(f"building a {precision} TensorRT engine from {onnx_path} ...")
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ConfigError(f"TensorRT failed to build an engine from {onnx_path}")
    out = Path(out)
    out.write_bytes(bytes(engine))
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


def _dim_names(onnx_path: str | Path, input_name: str) -> list[str]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for value in model.graph.input:
        if value.name == input_name:
            return [d.dim_param for d in value.type.tensor_type.shape.dim]
    return []
