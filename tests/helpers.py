"""Shared test helpers: one tolerance table keyed by dtype (STYLE.md 4)."""

from __future__ import annotations

import torch

# (rtol, atol) per dtype, from machine epsilon. float64 checks identities: its 1e5·eps covers
# the published filter taps, which pywt stores orthonormal only to ~5e-13 for sym4/sym8 (so a
# 3-level round trip of O(10) values moves by ~1e-11), while any real bug is O(1). float32 covers
# a whole 6-layer model run two ways; 16-bit types round every stored value.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e5 * torch.finfo(torch.float64).eps,) * 2,  # ~2.2e-11
    torch.float32: (1e3 * torch.finfo(torch.float32).eps,) * 2,  # ~1.2e-4
    torch.bfloat16: (4 * torch.finfo(torch.bfloat16).eps,) * 2,  # ~3.1e-2
    torch.float16: (4 * torch.finfo(torch.float16).eps,) * 2,  # ~3.9e-3
}


def tol(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close(actual, expected, *, dtype: torch.dtype | None = None, msg: str = "") -> None:
    """Compare with the tolerance of ``dtype`` (default: the actual tensor's dtype)."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    rtol, atol = tol(dtype or actual.dtype)
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), rtol=rtol, atol=atol, check_dtype=False, msg=msg or None
    )
