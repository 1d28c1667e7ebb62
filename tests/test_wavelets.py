"""Our wavelet transforms against independent oracles: pywt (periodization) and ptwt (boundary)."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch
from helpers import assert_close

from wara_train.delta import delta_weight
from wara_train.errors import ConfigError
from wara_train.wavelets import (
    WaveletSpec,
    axis_operator,
    blocks,
    dwt1_cascade,
    idwt1_cascade,
    wavedec1,
    wavedec2,
    waverec1,
    waverec2,
)

WAVELETS = ["haar", "db2", "sym4"]
LEVELS = [1, 2, 3]
SHAPE = (64, 96)  # non-square


def _pywt_coeffs(coeffs: dict[str, torch.Tensor], levels: int) -> list:
    """Our block dict -> pywt's list ``[a_J, (h_J, v_J, d_J), ..., (h_1, v_1, d_1)]``."""
    out = [coeffs[f"a{levels}"].numpy()]
    for j in range(levels, 0, -1):
        out.append(tuple(coeffs[f"{k}{j}"].numpy() for k in "hvd"))
    return out


def _random_factors(m, n, rank, levels, gen, dtype=torch.float64):
    return {
        b.name: (
            torch.randn(rank, b.shape(m, n)[1], generator=gen, dtype=dtype),
            torch.randn(b.shape(m, n)[0], rank, generator=gen, dtype=dtype),
        )
        for b in blocks(levels)
    }


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("levels", LEVELS)
def test_delta_weight_equals_pywt_waverec2(wavelet, levels):
    """ΔW = scale · pywt.waverec2(block products, mode="periodization"), float64."""
    m, n = SHAPE
    gen = torch.Generator().manual_seed(levels)
    factors = _random_factors(m, n, 3, levels, gen)
    spec = WaveletSpec(wavelet, "periodization", levels)
    got = delta_weight(factors, shape=SHAPE, spec=spec, scale=0.5)
    products = {name: b @ a for name, (a, b) in factors.items()}
    expected = 0.5 * pywt.waverec2(_pywt_coeffs(products, levels), wavelet, mode="periodization")
    assert got.dtype == torch.float64
    assert_close(got, torch.from_numpy(expected))


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("levels", LEVELS)
def test_wavedec2_equals_pywt(wavelet, levels):
    w = torch.randn(*SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spec = WaveletSpec(wavelet, "periodization", levels)
    ours = wavedec2(w, spec=spec)
    ref = pywt.wavedec2(w.numpy(), wavelet, mode="periodization", level=levels)
    assert list(ours) == [b.name for b in blocks(levels)]
    for mine, theirs in zip(_pywt_coeffs(ours, levels), ref):
        if isinstance(theirs, tuple):
            for a, b in zip(mine, theirs):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
        else:
            np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-12)
    assert_close(waverec2(ours, shape=SHAPE, spec=spec), w)


@pytest.mark.parametrize("wavelet", WAVELETS + ["coif1", "db4"])
@pytest.mark.parametrize("levels", LEVELS)
def test_1d_cascade_equals_pywt_wavedec(wavelet, levels):
    x = torch.randn(5, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    spec = WaveletSpec(wavelet, "periodization", levels)
    ours = wavedec1(x, spec=spec)
    ref = pywt.wavedec(x.numpy(), wavelet, mode="periodization", level=levels, axis=-1)
    for a, b in zip(ours, ref):
        assert_close(a, torch.from_numpy(b))
    assert_close(waverec1(ours, spec=spec), x)
    # The inverse under autograd (training) takes another code path for two-tap wavelets.
    tracked = [c.clone().requires_grad_(True) for c in ours]
    rebuilt = waverec1(tracked, spec=spec)
    assert rebuilt.requires_grad
    assert_close(rebuilt.detach(), torch.from_numpy(pywt.waverec(ref, wavelet, mode="periodization", axis=-1)))


@pytest.mark.parametrize("wavelet", ["db2", "sym4"])
@pytest.mark.parametrize("levels", [1, 2])
def test_boundary_mode_equals_ptwt_matrices(wavelet, levels):
    """Boundary mode = ptwt's separable boundary-wavelet matrices (ptwt names h and v the other
    way round from pywt, DESIGN.md 6), in 2-D and along activations."""
    import ptwt

    w = torch.randn(*SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    spec = WaveletSpec(wavelet, "boundary", levels)
    ours = wavedec2(w, spec=spec)
    ref = ptwt.MatrixWavedec2(wavelet, level=levels, separable=True)(w.unsqueeze(0))
    assert_close(ours[f"a{levels}"], ref[0][0])
    for i, j in enumerate(range(levels, 0, -1)):
        theirs = ref[1 + i]
        assert_close(ours[f"h{j}"], theirs[1][0])  # ptwt's "vertical" is pywt's horizontal
        assert_close(ours[f"v{j}"], theirs[0][0])
        assert_close(ours[f"d{j}"], theirs[2][0])
    rec = ptwt.MatrixWaverec2(wavelet, separable=True)(ref)[0]
    assert_close(waverec2(ours, shape=SHAPE, spec=spec), rec)

    x = torch.randn(4, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for a, b in zip(wavedec1(x, spec=spec), ptwt.MatrixWavedec(wavelet, level=levels)(x)):
        assert_close(a, b)


def test_haar_boundary_is_periodization():
    w = torch.randn(*SHAPE, dtype=torch.float64)
    a = wavedec2(w, spec=WaveletSpec("haar", "boundary", 2))
    b = wavedec2(w, spec=WaveletSpec("haar", "periodization", 2))
    for k in a:
        assert torch.equal(a[k], b[k])


@pytest.mark.parametrize("mode", ["periodization", "boundary"])
@pytest.mark.parametrize("wavelet", WAVELETS + ["coif2"])
def test_transforms_are_orthogonal(mode, wavelet):
    """Stacking every block's row operator gives an orthogonal matrix on each axis, so the 1-D
    and 2-D transforms preserve inner products and their inverse is their transpose."""
    levels, length = 2, 64
    spec = WaveletSpec(wavelet, mode, levels)
    rows = [axis_operator(length, "a", levels, spec=spec)] + [
        axis_operator(length, "d", j, spec=spec) for j in range(levels, 0, -1)
    ]
    s = torch.cat(rows)
    eye = torch.eye(length, dtype=torch.float64)
    assert_close(s @ s.T, eye)
    assert_close(s.T @ s, eye)
    # 2-D pyramid: Parseval (energy preserved) and inverse = transpose.
    w = torch.randn(length, 32, dtype=torch.float64)
    c = wavedec2(w, spec=spec)
    assert_close(sum((v**2).sum() for v in c.values()), (w**2).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype):
    """float32 runs natively; bf16 is cast to float32 around the transform (ptwt does the same)."""
    spec = WaveletSpec("db2", "periodization", 2)
    x = torch.randn(3, 64, dtype=torch.float64)
    ref = wavedec1(x, spec=spec)
    got = wavedec1(x.to(dtype), spec=spec)
    for a, b in zip(got, ref):
        assert a.dtype == dtype
        assert_close(a, b, dtype=dtype)


def test_idwt_cascade_with_intermediate_approximations():
    """Σ_j A_jᵀ u_j + Σ_j D_jᵀ e_j computed by one cascade equals the dense-operator sum."""
    spec = WaveletSpec("sym4", "periodization", 3)
    n = 64
    gen = torch.Generator().manual_seed(4)
    approx_in = {j: torch.randn(2, n >> j, dtype=torch.float64, generator=gen) for j in (1, 2, 3)}
    detail_in = {j: torch.randn(2, n >> j, dtype=torch.float64, generator=gen) for j in (1, 3)}
    got = idwt1_cascade(approx_in, detail_in, length=n, spec=spec)
    want = sum(approx_in[j] @ axis_operator(n, "a", j, spec=spec) for j in approx_in)
    want = want + sum(detail_in[j] @ axis_operator(n, "d", j, spec=spec) for j in detail_in)
    assert_close(got, want)
    pyr = dwt1_cascade(got, spec=spec)
    assert_close(pyr.approx[0], got)


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown wavelet 'bior2.2'.*haar, db, sym, coif"):
        WaveletSpec("bior2.2")
    with pytest.raises(ConfigError, match="valid modes are periodization, boundary"):
        WaveletSpec("haar", "periodic")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="levels must be an integer >= 1"):
        WaveletSpec("haar", "periodization", 0)
    with pytest.raises(ConfigError, match="100 is not divisible by 2\\^levels = 8"):
        wavedec2(torch.zeros(100, 64), spec=WaveletSpec("haar", "periodization", 3))
    with pytest.raises(ConfigError, match="shorter than the sym4 filter"):
        WaveletSpec("sym4", "boundary", 3).check_length(16)
