"""One SVD shared by the spectral metrics: `singular_values(w)` as `sv=` gives bitwise the same values."""

import math

import numpy as np
import pytest
import torch

from pico.metrics import SingularValues, condition_number, get_metric, norm, per, singular_values

rng = np.random.default_rng(2)


def spectral_values(w, sv=None, dtype=None):
    """Every metric that takes sv=, computed with the given spectrum (or its own SVD when sv is None)."""
    return [
        per(w, dtype=dtype, sv=sv),
        condition_number(w, dtype=dtype, sv=sv),
        norm(w, "nuc", dtype=dtype, sv=sv),
        norm(w, "spectral", dtype=dtype, sv=sv),
        norm(w, "fro", dtype=dtype, sv=sv),  # needs no SVD: sv is not used
    ]


@pytest.mark.parametrize("dtype", [None, torch.float32])
@pytest.mark.parametrize("shape", [(17, 17), (40, 9), (9, 40), (1, 6)])
@pytest.mark.parametrize("scale", [1.0, 1e-300, 1e300])
def test_shared_spectrum_is_bitwise_identical(shape, dtype, scale):
    w = torch.from_numpy(rng.standard_normal(shape) * scale)
    if dtype is torch.float32 and scale != 1.0:
        w = w / scale * 1e30  # float32 cannot hold the input: the largest magnitude it can
    shared = spectral_values(w, singular_values(w, dtype=dtype), dtype)
    own = spectral_values(w, dtype=dtype)
    assert all(math.isfinite(v) for v in own)
    assert [v.hex() for v in shared] == [v.hex() for v in own]


def test_values_match_numpy():
    w = rng.standard_normal((12, 30)) * 1e200
    sv = singular_values(w)
    expected = np.linalg.svd(w / 1e200, compute_uv=False)  # float64 reference on the unscaled matrix
    assert isinstance(sv, SingularValues) and sv.shape == (12, 30) and sv.scaled.shape == (12,)
    assert np.allclose(sv.values.numpy() / 1e200, expected, rtol=1e-12, atol=0)
    assert 0.5 <= float(np.abs(w).max()) * 2.0**-sv.exponent < 1  # the matrix was scaled to max|entry| ~ 1
    assert bool((sv.scaled[:-1] >= sv.scaled[1:]).all())  # descending


def test_degenerate_spectra():
    zeros = singular_values(torch.zeros(3, 5))
    assert spectral_values(torch.zeros(3, 5), zeros) == [0.0, math.inf, 0.0, 0.0, 0.0]
    bad = torch.ones(4, 3)
    bad[1, 2] = math.nan
    sv = singular_values(bad)  # no LAPACK call on a non-finite matrix: all NaN
    assert sv.scaled.shape == (3,) and bool(sv.scaled.isnan().all())
    assert all(math.isnan(v) for v in spectral_values(bad, sv))


def test_mismatched_spectrum_is_refused():
    sv = singular_values(torch.randn(4, 6))
    with pytest.raises(
        ValueError, match=r"per: sv must be singular_values\(w\) of this \(6, 4\) matrix, got .*\(4, 6\)"
    ):
        per(torch.randn(6, 4), sv=sv)
    with pytest.raises(ValueError, match="norm: sv must be singular_values.* got Tensor"):
        norm(torch.randn(4, 6), "nuc", sv=sv.values)
    with pytest.raises(ValueError, match=r"singular_values: expected a 2-D matrix, got shape \(7,\)"):
        singular_values(torch.randn(7))


def test_registry_marks_metrics_that_take_sv():
    assert [get_metric(n).takes_sv for n in ("per", "condition_number", "norm")] == [True, True, True]
    assert [get_metric(n).takes_sv for n in ("cka", "pwcca", "gini", "hoyer")] == [False] * 4
    assert get_metric("per").params == () and get_metric("norm").params == ("kind",)  # sv is no spec key
