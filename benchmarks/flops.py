"""Matmul FLOPs and matmul peaks: what `benchmarks.latency` sets its timings against.

FLOPs are multiply-adds x 2 of the matmul work; elementwise work is not counted. A model's are
counted from the model: 2·m·n per token for each adapted (m, n) layer (tokens counted by forward
hooks), plus attention's Q Kᵀ and softmax·V where a transformers config gives its depth and
width. The peaks are a plain square matmul's achieved GFLOP/s on the same machine, in the same
run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch


# ------------------------------------------------------------------------------------------
# FLOPs (multiply-adds x 2) of the matmul work; elementwise work is not counted


def wavelet_flops(length: int, taps: int, levels: int) -> int:
    """One analysis (or synthesis) cascade on a vector of ``length``: F taps per output."""
    return sum(2 * taps * (length >> (j - 1)) for j in range(1, levels + 1))


def adapter_flops(m: int, n: int, *, rank: int, levels: int, taps: int, form: str) -> int:
    """Extra FLOPs per token of one (m, n) layer's adapter path."""
    from wara_train.config import wara_param_count

    if form in ("base", "merged"):
        return 0
    if form == "folded":
        return 2 * (3 * levels + 1) * rank * (m + n)
    return 2 * wara_param_count(m, n, rank=rank, levels=levels) + wavelet_flops(n, taps, levels) + wavelet_flops(m, taps, levels)


def layer_tokens(model: torch.nn.Module, layers: list[str], inputs: list[torch.Tensor]) -> dict[str, int]:
    """Token positions each of ``layers`` sees in one forward of ``model`` on ``inputs``: the
    number of length-n input vectors it multiplies by its (m, n) weight (batch x seq for a text
    model's linears, batch x H x W for a 1x1 conv), counted with forward hooks."""
    from wara_train.layer import layer_shape

    seen: dict[str, int] = {}
    hooks = []
    for name in layers:
        module = model.get_submodule(name)
        n = layer_shape(module)[1]
        hooks.append(module.register_forward_hook(
            lambda mod, args, out, name=name, n=n: seen.__setitem__(name, seen.get(name, 0) + args[0].numel() // n)))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    missing = [name for name in layers if name not in seen]
    if missing:
        raise SystemExit(f"adapted layers never ran in a forward: {missing[:3]}")
    return seen


def attention_dims(model: torch.nn.Module) -> tuple[int, int] | None:
    """(layers, hidden) of the transformer inside ``model``, read from its transformers config;
    None for a model without one (its attention, if any, is not counted)."""
    for module in model.modules():
        cfg = getattr(module, "config", None)
        layers, hidden = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "hidden_size", None)
        if isinstance(layers, int) and isinstance(hidden, int):
            return layers, hidden
    return None


def model_base_flops(shapes: dict[str, tuple[int, int]], tokens: dict[str, int], *, batch: int,
                     attention: tuple[int, int] | None) -> int:
    """The base's matmul FLOPs: 2·m·n per token for each adapted (m, n) layer, plus, for a
    transformer of L layers and width d, Q Kᵀ and softmax·V: L · 2 · 2·B·S²·d, with S the tokens
    per row the adapted layers see."""
    linear = sum(2 * m * n * tokens[name] for name, (m, n) in shapes.items())
    if attention is None:
        return linear
    layers, hidden = attention
    seq = max(tokens.values()) // batch
    return linear + layers * 2 * (2 * batch * seq * seq * hidden)


# ------------------------------------------------------------------------------------------
# peaks


def torch_matmul_gflops(device: torch.device, size: int = 2048) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(6):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def ort_matmul_gflops(size: int = 2048) -> float:
    import onnx
    from onnx import TensorProto, helper

    from exporter.verify import ort_session

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mm.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
        sess = ort_session(str(path), spinning=False)
        feeds = {n: np.random.default_rng(0).standard_normal((size, size), dtype=np.float32) for n in "ab"}
        best = float("inf")
        for _ in range(6):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op on CPU), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize()
