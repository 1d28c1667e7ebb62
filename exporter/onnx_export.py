"""ONNX export in four forms: base, merged, unmerged (explicit WaRA ops), multi (slot factors).

How the adapter paths get into the graph: the base model is exported once by
``torch.onnx.export`` with a *probe* wrapper that also returns, for every layer to adapt, its
input X and output Y as extra graph outputs. Those outputs name the exact values in the graph,
whatever the exporter did inside. The adapter sub-graph is then spliced in: the node that made Y
now writes ``Y/base``, and ``Y = Y/base + Δ(X)`` is rebuilt under the old name, so every consumer
reads the adapted value. The probe outputs are dropped and dead nodes removed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from wara_train.artifact import WaraAdapter
from wara_train.bases import get_base
from wara_train.basespec import BaseSpec, TensorSpec
from wara_train.errors import ConfigError
from wara_train.layer import is_pointwise_conv, layer_shape

from .common import resolve_adapter_base, with_saved_modules
from .merge import merged_model
from .slots import head_input_names, slot_input_names
from .onnx_ops import DOMAIN, DOMAIN_VERSION, OPSET, GraphBuilder, explicit_delta, wara_functions

Form = Literal["base", "merged", "unmerged", "multi"]
FORMS: tuple[str, ...] = ("base", "merged", "unmerged", "multi")
INDEX_INPUT = "adapter_index"
FEATURES_OUTPUT = "features"


@dataclass(frozen=True)
class ModelIO:
    """How a base model is called: input names, a sample, which axes are dynamic (and the
    bounds of each named axis: (min, max), max None for unbounded)."""

    input_names: tuple[str, ...]
    sample: tuple[torch.Tensor, ...]
    dynamic: tuple[dict[int, str], ...]
    output_name: str = "logits"
    bounds: dict[str, tuple[int, int | None]] = field(default_factory=dict)


def model_io(spec_or_name: BaseSpec | str, *, batch: int = 2, seq: int = 16, image_size: int | None = None) -> ModelIO:
    """The ONNX inputs of a base, from its spec (a built-in may be given by name): the spec's
    sample at ``batch`` x ``seq``, its dynamic axes and their bounds. ``image_size`` resamples
    image inputs whose height and width are dynamic in the spec (a fixed size is refused)."""
    spec = get_base(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    sample = tuple(spec.sample(batch, seq))
    if len(sample) != len(spec.inputs):
        raise ConfigError(f"base {spec.name!r}: its sample has {len(sample)} tensors for {len(spec.inputs)} inputs")
    if image_size is not None:
        sample = tuple(_resized(spec, t, x, batch, image_size) for t, x in zip(spec.inputs, sample))
    lows: dict[str, list[int]] = {}
    highs: dict[str, list[int]] = {}
    for t, axes in zip(spec.inputs, spec.onnx_dynamic):
        for axis, name in axes.items():
            # torch.export specialises sizes 0 and 1: a dynamic axis other than the batch starts at 2.
            lows.setdefault(name, []).append(max((t.min_dims[axis] if t.min_dims else None) or 1, 1 if axis == 0 else 2))
            if t.max_dims and t.max_dims[axis] is not None:
                highs.setdefault(name, []).append(t.max_dims[axis])
    bounds = {name: (max(lo), min(highs[name]) if name in highs else None) for name, lo in lows.items()}
    dynamic = tuple(spec.onnx_dynamic) or tuple({} for _ in spec.inputs)
    return ModelIO(spec.input_names, sample, dynamic, output_name=spec.output, bounds=bounds)


def _resized(spec: BaseSpec, t: TensorSpec, x: torch.Tensor, batch: int, size: int) -> torch.Tensor:
    if x.dim() != 4 or not x.is_floating_point():
        return x
    if t.shape[-2:] != (-1, -1):
        raise ConfigError(f"base {spec.name!r} takes images of {t.shape[-2]}x{t.shape[-1]} only; "
                          f"--image-size {size} does not apply")
    gen = torch.Generator().manual_seed(batch * 1000 + size)
    return torch.randn(x.shape[0], x.shape[1], size, size, generator=gen, dtype=x.dtype)


# ------------------------------------------------------------------------------------------
# export with probes


@dataclass
class Probe:
    module: str
    x: str  # graph value names
    y: str
    x_rank: int
    conv: bool


def _export(model: nn.Module, io: ModelIO, probe_modules: Sequence[str] = ()) -> tuple[onnx.ModelProto, list[Probe]]:
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks: dict[str, int] = {}

    def hook(name):
        def fn(_mod, inputs, output):
            ranks[name] = inputs[0].dim()
            captured[name] = (inputs[0], output)
        return fn

    class ProbeWrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            captured.clear()
            out = self.inner(*args)
            # In the order of probe_modules, whatever order the model ran them in.
            return (out, *[t for name in probe_modules for t in captured[name]])

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in probe_modules]
    out_names = [io.output_name]
    for i, _ in enumerate(probe_modules):
        out_names += [f"wara_probe/{i}/x", f"wara_probe/{i}/y"]
    dims: dict[str, torch.export.Dim] = {}
    dynamic = []
    for axes in io.dynamic:
        dynamic.append({axis: dims.setdefault(name, _dim(name, io.bounds.get(name))) for axis, name in axes.items()})
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                ProbeWrapper(model).eval(), io.sample, dynamo=True, opset_version=OPSET,
                input_names=list(io.input_names), output_names=out_names, dynamic_shapes=(tuple(dynamic),),
                verbose=False,
            )
    finally:
        for h in handles:
            h.remove()
    proto = program.model_proto
    probes = [
        Probe(n, f"wara_probe/{i}/x", f"wara_probe/{i}/y", ranks[n], _is_conv(model.get_submodule(n)))
        for i, n in enumerate(probe_modules)
    ]
    return proto, probes


def _dim(name: str, bounds: tuple[int, int | None] | None):
    lo, hi = bounds or ((1, None) if name == "batch" else (2, None))
    return torch.export.Dim(name, min=lo, max=hi) if hi is not None else torch.export.Dim(name, min=lo)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's own notices (torchvision ops skipped, axis renames, deprecations) are
    noise to our users; errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _is_conv(module: nn.Module) -> bool:
    """A pointwise conv, or a wrapper of one (the runtime's slot layers say so themselves)."""
    return is_pointwise_conv(module) or bool(getattr(module, "conv", False))


def export_multi_graph(model: nn.Module, targets: list[str], shapes: dict[str, tuple[int, int]], io: ModelIO,
                       out: str | Path) -> Path:
    """The ``multi`` graph of any model (no task head spliced: its output is what the model
    returns), for engines that bind slot factors themselves."""
    proto, probes = _export(model.eval(), io, targets)
    new_inputs: list = []
    graph = _splice(proto, probes, _multi_splice(shapes, set(), new_inputs))
    graph.graph.input.append(helper.make_tensor_value_info(INDEX_INPUT, TensorProto.INT64, ["batch"]))
    graph.graph.input.extend(new_inputs)
    graph = _finish(graph, metadata={"wara.form": "multi", "wara.slot_inputs": json.dumps([i.name for i in new_inputs])})
    onnx.checker.check_model(graph, full_check=True)
    out = Path(out)
    onnx.save(graph, str(out))
    return out


def _producer_map(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _source(graph: onnx.GraphProto, name: str) -> str:
    """Follow Identity nodes back to the value that really holds ``name``."""
    prod = _producer_map(graph)
    while name in prod and prod[name].op_type == "Identity":
        name = prod[name].input[0]
    return name


def _rename_output(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, o in enumerate(node.output):
            if o == old:
                node.output[i] = new
                return
    raise ConfigError(f"internal: no node produces {old!r}")


def _toposort_and_prune(graph: onnx.GraphProto) -> None:
    """Order nodes so every input is produced first; drop nodes no output depends on."""
    prod = _producer_map(graph)
    needed: set[int] = set()
    stack = [o.name for o in graph.output]
    index = {id(n): i for i, n in enumerate(graph.node)}
    while stack:
        v = stack.pop()
        n = prod.get(v)
        if n is None or index[id(n)] in needed:
            continue
        needed.add(index[id(n)])
        stack.extend(i for i in n.input if i)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    pending = [n for i, n in enumerate(graph.node) if i in needed]
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = []
        rest = []
        for n in pending:
            if all(not i or i in available for i in n.input):
                progressed.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if not progressed:
            raise ConfigError(f"internal: graph has a cycle or a dangling input near {rest[0].name}")
        ordered += progressed
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _shape_prefix(g: GraphBuilder, x: str, end: int, last: int) -> str:
    """Concat(Shape(x)[:end], [last]) as an int64 shape tensor."""
    s = g.node("Shape", [x], "shape", end=end)
    return g.node("Concat", [s, g.ints(f"wara.i{last}", [last])], "outshape", axis=0)


Splice = Callable[[GraphBuilder, Probe, str, str], None]  # (builder, probe, x, y_base) -> writes probe.y


def _splice(proto: onnx.ModelProto, probes: list[Probe], build: Splice) -> onnx.ModelProto:
    model = copy.deepcopy(proto)
    graph = model.graph
    builders = []
    for p in probes:
        x = p.x
        y = _source(graph, p.y)
        y_base = f"{y}/base"
        _rename_output(graph, y, y_base)
        g = GraphBuilder(prefix=f"wara/{p.module}")
        build(g, Probe(p.module, x, y, p.x_rank, p.conv), x, y_base)
        graph.node.extend(g.nodes)
        builders.append(g)
    seen = {t.name for t in graph.initializer}
    for g in builders:
        for name, t in g.initializers.items():
            if name not in seen:
                graph.initializer.append(t)
                seen.add(name)
    probe_outs = {n for p in probes for n in (p.x, p.y)}
    keep = [o for o in graph.output if o.name not in probe_outs]
    del graph.output[:]
    graph.output.extend(keep)
    return model


def _finish(model: onnx.ModelProto, *, metadata: dict[str, str]) -> onnx.ModelProto:
    graph = model.graph
    _toposort_and_prune(graph)
    del graph.value_info[:]  # stale after surgery; ORT re-infers shapes
    if any(n.domain == DOMAIN for n in graph.node):
        existing = {f.name for f in model.functions}
        model.functions.extend(f for f in wara_functions() if f.name not in existing)
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    used_functions = {n.op_type for n in graph.node if n.domain == DOMAIN}
    keep = [f for f in model.functions if f.domain != DOMAIN or f.name in used_functions]
    del model.functions[:]
    model.functions.extend(keep)
    for k, v in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    return model


# ------------------------------------------------------------------------------------------
# the forms


def _unmerged_splice(adapter: WaraAdapter, heads: set[str]) -> Splice:
    def build(g: GraphBuilder, p: Probe, x: str, y_base: str) -> None:
        if p.module in heads:
            # The adapter's own task head, as constants: Y = X Wᵀ + b.
            params = adapter.saved_modules[p.module]
            wt = g.tensor(f"{p.module}.weight.T", params["weight"].float().T.contiguous())
            y = g.node("MatMul", [x, wt], "head")
            if "bias" in params:
                g.node("Add", [y, g.tensor(f"{p.module}.bias", params["bias"].float())], "head_bias", out=p.y)
            else:
                g.node("Identity", [y], "head_out", out=p.y)
            return
        m, n = adapter.shape(p.module)
        if p.conv:
            xt = g.node("Transpose", [x], "nhwc", perm=[0, 2, 3, 1])
            x2 = g.node("Reshape", [xt, g.ints(f"wara.rows{n}", [-1, n])], "x2d")
            out_shape = _shape_prefix(g, xt, 3, m)
        else:
            x2 = g.node("Reshape", [x, g.ints(f"wara.rows{n}", [-1, n])], "x2d")
            out_shape = _shape_prefix(g, x, p.x_rank - 1, m)
        d2 = explicit_delta(g, x2, adapter.factors[p.module], shape=(m, n), spec=adapter.config.spec,
                            scale=adapter.config.scale, layer=p.module)
        d = g.node("Reshape", [d2, out_shape], "delta")
        if p.conv:
            d = g.node("Transpose", [d], "nchw", perm=[0, 3, 1, 2])
        g.node("Add", [y_base, d], "adapted", out=p.y)

    return build


def _multi_inputs(name: str, dims: list[str | int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _multi_splice(shapes: dict[str, tuple[int, int]], heads: set[str], new_inputs: list) -> Splice:
    def build(g: GraphBuilder, p: Probe, x: str, y_base: str) -> None:
        m, n = shapes[p.module]
        if p.module in heads:
            # A per-row task head: Y = X W[slot]ᵀ + b[slot] replaces the base head.
            w_in, b_in = head_input_names(p.module)
            new_inputs.append(_multi_inputs(w_in, ["slots", "labels", n]))
            new_inputs.append(_multi_inputs(b_in, ["slots", "labels"]))
            w = g.node("Transpose", [g.node("Gather", [w_in, INDEX_INPUT], "w", axis=0)], "wT", perm=[0, 2, 1])
            x3 = g.node("Unsqueeze", [x, g.ints("wara.i1", [1])], "x3")
            z = g.node("Squeeze", [g.node("MatMul", [x3, w], "xw"), g.ints("wara.i1", [1])], "z")
            b = g.node("Gather", [b_in, INDEX_INPUT], "b", axis=0)
            g.node("Add", [z, b], "head", out=p.y)
            g.node("Identity", [x], "features", out=FEATURES_OUTPUT)
            return
        a_in, b_in = slot_input_names(p.module)
        new_inputs.append(_multi_inputs(a_in, ["slots", "rank", n]))
        new_inputs.append(_multi_inputs(b_in, ["slots", m, "rank"]))
        a_sel = g.node("Gather", [a_in, INDEX_INPUT], "A", axis=0)  # (B, R, n)
        b_sel = g.node("Gather", [b_in, INDEX_INPUT], "B", axis=0)  # (B, m, R)
        if p.conv:
            xr = g.node("Reshape", [x, g.ints("wara.bc_flat", [0, 0, -1])], "xflat")  # (B, n, HW)
            z = g.node("MatMul", [a_sel, xr], "z")  # (B, R, HW)
            d = g.node("MatMul", [b_sel, z], "d")  # (B, m, HW)
            d = g.node("Reshape", [d, g.node("Shape", [y_base], "yshape")], "delta")
        else:
            # Any rank (B, ..., n) -> (B, T, n): the batch axis stays first for the per-row
            # factors (a rank-4 input, ConvNeXt's pwconv on (B, H, W, C), would otherwise
            # broadcast H against the slot axis); rank 2 gives T = 1.
            xs = g.node("Reshape", [x, g.ints(f"wara.bt{n}", [0, -1, n])], "x3")
            z = g.node("MatMul", [xs, g.node("Transpose", [a_sel], "AT", perm=[0, 2, 1])], "z")  # (B, T, R)
            d = g.node("MatMul", [z, g.node("Transpose", [b_sel], "BT", perm=[0, 2, 1])], "d")  # (B, T, m)
            d = g.node("Reshape", [d, g.node("Shape", [y_base], "yshape")], "delta")
        g.node("Add", [y_base, d], "adapted", out=p.y)

    return build


def export_onnx(
    adapter: WaraAdapter,
    base: nn.Module,
    form: Form,
    out: str | Path,
    *,
    spec: BaseSpec | None = None,
    io: ModelIO | None = None,
    log: Callable[[str], None] = print,
    _cache: dict | None = None,
) -> Path:
    """Export one form to ``out`` (a .onnx file), checked with ``onnx.checker`` (full check).

    ``base`` is the plain base model the adapter fits (see `exporter.common.base_for`), ``spec``
    its spec (default `resolve_adapter_base`; only needed when ``io`` is not given).
    ``multi`` takes the (folded, rank-padded) factors of any set of adapters as inputs; the
    given adapter only decides which layers and heads are adaptable."""
    if form not in FORMS:
        raise ConfigError(f"unknown ONNX form {form!r}: valid forms are {', '.join(FORMS)}")
    io = io or model_io(spec or resolve_adapter_base(adapter))
    t0 = time.perf_counter()
    head_model = with_saved_modules(base, adapter)
    if io.output_name == "embeddings" and any(isinstance(base.get_submodule(m), nn.Linear) for m in adapter.saved_modules):
        io = dataclasses.replace(io, output_name="logits")  # the adapter's task head answers logits
    meta = {"wara.form": form, "wara.base_model": adapter.base_model, "wara.adapter": adapter.content_hash,
            "wara.labels": json.dumps(adapter.labels), "wara.inputs": json.dumps(list(io.input_names))}
    targets = list(adapter.config.target_modules)
    if form == "merged":
        log(f"exporting merged {adapter.base_model} ...")
        proto, _ = _export(merged_model(base, [(adapter, 1.0)]).eval(), io)
        model = _finish(proto, metadata=meta)
    elif form == "base":
        log(f"exporting base {adapter.base_model} ...")
        proto, _ = _export(head_model.eval(), io)
        model = _finish(proto, metadata=meta)
    else:
        # Linear task heads are spliced per adapter, so one probe export serves every adapter
        # of a base; any other saved module is baked in (and then keys the cache).
        heads = {m for m in adapter.saved_modules if isinstance(base.get_submodule(m), nn.Linear)}
        baked = sorted(set(adapter.saved_modules) - heads)
        static = tuple(tuple(d for a, d in enumerate(x.shape) if a not in axes) for x, axes in zip(io.sample, io.dynamic))
        key = (adapter.base_fingerprint, tuple(targets + sorted(heads)), adapter.content_hash if baked else "",
               static, io.output_name)
        cached = _cache.get(key) if _cache is not None else None
        if cached is None:
            log(f"exporting {adapter.base_model} with probes on {len(targets) + len(heads)} layers ...")
            cached = _export(head_model.eval(), io, targets + sorted(heads))
            if _cache is not None:
                _cache[key] = cached
        proto, probes = cached
        log(f"splicing the {form} WaRA path into {len(probes)} layers ...")
        if form == "unmerged":
            model = _splice(proto, probes, _unmerged_splice(adapter, heads))
        else:
            shapes = {m: layer_shape(base.get_submodule(m)) for m in targets + sorted(heads)}
            new_inputs: list = []
            model = _splice(proto, probes, _multi_splice(shapes, heads, new_inputs))
            model.graph.input.append(helper.make_tensor_value_info(INDEX_INPUT, TensorProto.INT64, ["batch"]))
            model.graph.input.extend(new_inputs)
            if heads:
                model.graph.output.append(helper.make_tensor_value_info(FEATURES_OUTPUT, TensorProto.FLOAT, ["batch", "hidden"]))
            meta["wara.slot_inputs"] = json.dumps([i.name for i in new_inputs])
        model = _finish(model, metadata=meta)
    onnx.checker.check_model(model, full_check=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(model.graph.node)} nodes) in {time.perf_counter() - t0:.1f}s")
    return out
