"""The WaRA operators as ONNX model-local functions, and the adapter sub-graphs built from them.

Functions live in the ``wara`` domain with unique op types, and their bodies use only standard
ops, so onnxruntime and TensorRT run them without a plugin (a plugin can replace them later):

* ``WaraDWT1D(x, bank, index) -> y``: one periodization level along axis 1 of a (P, N) matrix:
  ``y = [a | d]``, ``a[k] = Σ_i lo[i] x[(2k + F/2 - i) mod N]`` (likewise d): a Gather that
  extends x periodically, then a stride-2 Conv with the flipped filter bank.
* ``WaraIDWT1D(y, bank, index, crop_start, crop_end) -> x``: its inverse (= adjoint): the
  coefficients are extended periodically, run through a stride-2 ConvTranspose, and cropped.
* ``WaraDWT1DMatrix(x, mt)`` / ``WaraIDWT1DMatrix(y, m)``: the same level as one MatMul with
  the orthogonal level matrix (boundary mode, where edges are not periodic).

The per-layer sub-graphs mirror `wara_train.layer` exactly; tests run them in onnxruntime
against the PyTorch model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from wara_train.wavelets import (
    WaveletSpec,
    conv_bank,
    analysis_extension,
    blocks,
    level_matrix,
    periodic_index,
    synthesis_extension,
)

DOMAIN = "wara"
DOMAIN_VERSION = 1
OPSET = 20


def _const(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))


def wara_functions() -> list[onnx.FunctionProto]:
    """The four model-local functions of the ``wara`` domain."""
    std = [helper.make_opsetid("", OPSET)]
    dwt = helper.make_function(
        DOMAIN, "WaraDWT1D", ["x", "bank", "index"], ["y"],
        [
            helper.make_node("Gather", ["x", "index"], ["ext"], axis=1),
            _const("axis1", [1]),
            helper.make_node("Unsqueeze", ["ext", "axis1"], ["ext3"]),
            helper.make_node("Conv", ["ext3", "bank"], ["ad"], strides=[2]),  # (P, 2, N/2)
            helper.make_node("Flatten", ["ad"], ["y"], axis=1),  # [a | d]
        ],
        std,
        doc_string="One periodization DWT level along axis 1: y = [a | d].",
    )
    idwt = helper.make_function(
        DOMAIN, "WaraIDWT1D", ["y", "bank", "index", "crop_start", "crop_end"], ["x"],
        [
            _const("shape3", [0, 2, -1]),
            helper.make_node("Reshape", ["y", "shape3"], ["ad"]),  # (P, 2, N/2)
            helper.make_node("Gather", ["ad", "index"], ["ext"], axis=2),
            helper.make_node("ConvTranspose", ["ext", "bank"], ["full"], strides=[2]),
            _const("axis2", [2]),
            helper.make_node("Slice", ["full", "crop_start", "crop_end", "axis2"], ["cropped"]),
            helper.make_node("Flatten", ["cropped"], ["x"], axis=1),
        ],
        std,
        doc_string="Inverse of WaraDWT1D (its adjoint, the transform being orthogonal).",
    )
    dwt_m = helper.make_function(
        DOMAIN, "WaraDWT1DMatrix", ["x", "mt"], ["y"], [helper.make_node("MatMul", ["x", "mt"], ["y"])], std,
        doc_string="One DWT level as x @ Mᵀ with the orthogonal level matrix M (boundary mode).",
    )
    idwt_m = helper.make_function(
        DOMAIN, "WaraIDWT1DMatrix", ["y", "m"], ["x"], [helper.make_node("MatMul", ["y", "m"], ["x"])], std,
        doc_string="Inverse of WaraDWT1DMatrix: y @ M.",
    )
    return [dwt, idwt, dwt_m, idwt_m]


@dataclass
class GraphBuilder:
    """Collects nodes and initializers with unique names; shared constants are made once."""

    prefix: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    _count: int = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def node(self, op: str, inputs: list[str], hint: str, *, domain: str = "", out: str | None = None, **attrs) -> str:
        """Append one single-output node; ``out`` names its output (default: a fresh name)."""
        result = out or self.name(hint)
        self.nodes.append(helper.make_node(op, inputs, [result], name=self.name(op), domain=domain, **attrs))
        return result

    def tensor(self, name: str, value: np.ndarray | torch.Tensor) -> str:
        if name not in self.initializers:
            arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
            self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        return name

    def ints(self, name: str, values: list[int]) -> str:
        return self.tensor(name, np.asarray(values, dtype=np.int64))


# ------------------------------------------------------------------------------------------
# the explicit (unmerged) delta: DWT cascade, per-block factors, inverse cascade


def _dwt_level(g: GraphBuilder, x: str, length: int, spec: WaveletSpec) -> tuple[str, str]:
    half = length // 2
    if spec.effective_mode == "boundary":
        m = level_matrix(length, wavelet=spec.wavelet, mode="boundary").float()
        mt = g.tensor(f"wara.{spec.wavelet}.boundary.{length}.mT", m.T.contiguous())
        y = g.node("WaraDWT1DMatrix", [x, mt], "dwt", domain=DOMAIN)
    else:
        bank_t = conv_bank(spec.wavelet, torch.float32, torch.device("cpu"))
        bank = g.tensor(f"wara.{spec.wavelet}.bank", bank_t)
        start, size = analysis_extension(length, bank_t.shape[-1])
        idx = g.tensor(f"wara.dwt_index.{spec.wavelet}.{length}", periodic_index(length, start, size, torch.device("cpu")))
        y = g.node("WaraDWT1D", [x, bank, idx], "dwt", domain=DOMAIN)
    a = g.node("Slice", [y, g.ints("wara.i0", [0]), g.ints(f"wara.i{half}", [half]), g.ints("wara.i1", [1])], "a")
    d = g.node("Slice", [y, g.ints(f"wara.i{half}", [half]), g.ints(f"wara.i{length}", [length]), g.ints("wara.i1", [1])], "d")
    return a, d


def _idwt_level(g: GraphBuilder, a: str, d: str, length: int, spec: WaveletSpec) -> str:
    y = g.node("Concat", [a, d], "ad", axis=1)
    if spec.effective_mode == "boundary":
        m = level_matrix(length, wavelet=spec.wavelet, mode="boundary").float()
        mm = g.tensor(f"wara.{spec.wavelet}.boundary.{length}.M", m.contiguous())
        return g.node("WaraIDWT1DMatrix", [y, mm], "idwt", domain=DOMAIN)
    bank_t = conv_bank(spec.wavelet, torch.float32, torch.device("cpu"))
    bank = g.tensor(f"wara.{spec.wavelet}.bank", bank_t)
    start, size, crop = synthesis_extension(length // 2, bank_t.shape[-1])
    idx = g.tensor(f"wara.idwt_index.{spec.wavelet}.{length}", periodic_index(length // 2, start, size, torch.device("cpu")))
    cs = g.ints(f"wara.i{crop}", [crop])
    ce = g.ints(f"wara.i{crop + length}", [crop + length])
    return g.node("WaraIDWT1D", [y, bank, idx, cs, ce], "idwt", domain=DOMAIN)


def explicit_delta(
    g: GraphBuilder,
    x2d: str,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    shape: tuple[int, int],
    spec: WaveletSpec,
    scale: float,
    layer: str,
) -> str:
    """(P, n) -> (P, m): ``scale · Σ_s P_row,sᵀ B_s A_s P_col,s x`` with explicit wavelet ops."""
    m, n = shape
    approx, detail = {0: x2d}, {}
    for j in range(1, spec.levels + 1):
        approx[j], detail[j] = _dwt_level(g, approx[j - 1], n >> (j - 1), spec)
    out_a: dict[int, str] = {}
    out_d: dict[int, str] = {}
    for b in blocks(spec.levels):
        a, bb = factors[b.name]
        at = g.tensor(f"{layer}.wara_A.{b.name}.T", a.float().T.contiguous())
        bt = g.tensor(f"{layer}.wara_B.{b.name}.T_scaled", (scale * bb.float()).T.contiguous())
        src = (approx if b.col == "a" else detail)[b.level]
        u = g.node("MatMul", [g.node("MatMul", [src, at], f"z_{b.name}"), bt], f"u_{b.name}")
        dst = out_a if b.row == "a" else out_d
        dst[b.level] = g.node("Add", [dst[b.level], u], "sum") if b.level in dst else u
    cur = out_a[spec.levels]
    for j in range(spec.levels, 0, -1):
        cur = _idwt_level(g, cur, out_d[j], m >> (j - 1), spec)
        if j - 1 >= 1:
            cur = g.node("Add", [cur, out_a[j - 1]], "inject")
    return cur
