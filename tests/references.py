"""Slow, obviously-correct references for the fast paths (STYLE.md 3): test-only code."""

from __future__ import annotations

import torch


def reference_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   groups: list[tuple[int, torch.Tensor]], ranks: list[int] | None = None) -> torch.Tensor | None:
    """Slow oracle: row by row, float64."""
    if not groups:
        return None
    out = torch.zeros(*x.shape[:-1], lora_b.shape[1], dtype=torch.float64)
    for slot, rows in groups:
        for r in rows.tolist():
            out[r] = (x[r].double() @ lora_a[slot].double().T) @ lora_b[slot].double().T
    return out.to(x.dtype)


def pywt_delta(factors: dict, *, shape: tuple[int, int], wavelet: str, levels: int, scale: float) -> torch.Tensor:
    """ΔW of one layer from its WaRA factors by ``pywt.waverec2`` in float64 (periodization):
    the oracle, independent of our transforms. ``factors``: block name -> (A, B)."""
    import numpy as np
    import pywt

    m, n = shape
    c = {name: (b.double() @ a.double()).numpy() for name, (a, b) in factors.items()}
    coeffs = [c[f"a{levels}"]] + [(c[f"h{j}"], c[f"v{j}"], c[f"d{j}"]) for j in range(levels, 0, -1)]
    out = pywt.waverec2(coeffs, wavelet, mode="periodization")
    assert out.shape == (m, n), out.shape
    return torch.from_numpy(np.ascontiguousarray(out)) * scale


def merge_into(model: torch.nn.Module, adapter, *, prefix: str = "") -> torch.nn.Module:
    """``W0 + ΔW(pywt)`` written into ``model``'s weights in place (float64 sum, one cast); the
    caller loads the task head. ``prefix`` is stripped from the adapter's module names
    (``bert.`` when ``model`` is the plain transformers model). Conv1D weights are (in, out)."""
    cfg = adapter.config
    with torch.no_grad():
        for name in cfg.target_modules:
            layer = model.get_submodule(name[len(prefix):] if prefix and name.startswith(prefix) else name)
            w = layer.weight
            conv1d = type(layer).__name__ == "Conv1D"
            shape = (w.shape[1], w.shape[0]) if conv1d else (w.shape[0], w.shape[1])
            d = pywt_delta(adapter.factors[name], shape=shape, wavelet=cfg.wavelet, levels=cfg.levels, scale=cfg.scale)
            d = d.T if conv1d else d.reshape(w.shape)
            w.copy_((w.double() + d).to(w.dtype))
    return model
