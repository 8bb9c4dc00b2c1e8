"""Extreme finite magnitudes and float32 accumulation, against float64 NumPy computations written here.

Every reference is computed from the definition on the unscaled data: the metrics are scale-invariant (or,
for norms, scale exactly), and a power-of-two scale leaves the data's digits untouched.
"""

import math

import numpy as np
import pytest
import torch

from pico.metrics import cka, condition_number, gini, hoyer, norm, per, pwcca
from tests.metrics.references import close, np_cka, np_gini, np_hoyer, np_norm, np_per, np_pwcca

rng = np.random.default_rng(1)
X = rng.standard_normal((60, 7))
Y = np.tanh(X @ rng.standard_normal((7, 5)))  # related to X, so CKA and PWCCA are far from 0
W = rng.standard_normal((9, 13))
TINY_AND_HUGE_64 = [2.0**-1000, 1e-300, 1e-200, 1e154, 1e200, 1e300, 2.0**1000]
TINY_AND_HUGE_32 = [1e-30, 1e-20, 1e9, 1e20, 1e30]


def np_cond(w):
    s = np.linalg.svd(w, compute_uv=False)
    return s[0] / s[-1]


SCALE_FREE = {  # name: (metric on tensors, reference on the unscaled arrays)
    "cka": (lambda x, y, **kw: cka(x, y, **kw), np_cka),
    "cka_rbf": (lambda x, y, **kw: cka(x, y, kernel="rbf", **kw), lambda x, y: np_cka(x, y, "rbf")),
    "cka_debiased": (
        lambda x, y, **kw: cka(x, y, debiased=True, **kw),
        lambda x, y: np_cka(x, y, debiased=True),
    ),
    "cka_gram": (lambda x, y, **kw: cka(x[:5], y[:5], **kw), lambda x, y: np_cka(x[:5], y[:5])),
    "pwcca": (lambda x, y, **kw: pwcca(x, y, **kw), np_pwcca),
    "per": (lambda x, y, **kw: per(x, **kw), lambda x, y: np_per(x)),
    "condition_number": (lambda x, y, **kw: condition_number(x, **kw), lambda x, y: np_cond(x)),
    "gini": (lambda x, y, **kw: gini(x, **kw), lambda x, y: np_gini(x)),
    "hoyer": (lambda x, y, **kw: hoyer(x, **kw), lambda x, y: np_hoyer(x)),
}


@pytest.mark.parametrize("scale", TINY_AND_HUGE_64)
@pytest.mark.parametrize("name", SCALE_FREE)
def test_scale_free_metrics_float64_at_any_magnitude(name, scale):
    metric, reference = SCALE_FREE[name]
    value = metric(torch.from_numpy(X * scale), torch.from_numpy(Y * scale))
    assert close(value, reference(X, Y), rtol=1e-8), (value, reference(X, Y))


@pytest.mark.parametrize("scale", TINY_AND_HUGE_32)
@pytest.mark.parametrize("name", SCALE_FREE)
def test_scale_free_metrics_float32_at_any_magnitude(name, scale):
    metric, reference = SCALE_FREE[name]
    x, y = torch.from_numpy(X * scale).float(), torch.from_numpy(Y * scale).float()
    expected = reference(x.double().numpy() / scale, y.double().numpy() / scale)  # the float32 data's digits
    assert close(metric(x, y, dtype=torch.float32), expected, rtol=1e-4)
    assert close(metric(x, y), expected, rtol=1e-8)  # float32 input, float64 compute on CPU


def test_reported_cases():
    assert (
        cka(torch.from_numpy(X * 1e9).float(), torch.from_numpy(X * 1e9).float(), dtype=torch.float32) == 1.0
    )
    assert close(pwcca(X * 1e154, Y * 1e154), np_pwcca(X, Y))  # was a LinAlgError
    assert close(pwcca(X * 1e-200, Y * 1e-200), np_pwcca(X, Y))  # was NaN (covariances underflowed to 0)
    # hoyer([a, b]) = (sqrt(2) - (a + b) / sqrt(a^2 + b^2)) / (sqrt(2) - 1), evaluated with b / a
    assert close(
        hoyer(np.array([1e300, 1.0])), (math.sqrt(2) - 1 / math.hypot(1, 1e-300)) / (math.sqrt(2) - 1)
    )
    assert hoyer(np.array([1e-200, 0.0])) == 1.0 and hoyer(np.array([5e-324, 0.0])) == 1.0  # was NaN


@pytest.mark.parametrize("kind", ["fro", "nuc", "inf", "spectral", "max"])
@pytest.mark.parametrize("exponent", [-1040, -1000, -500, 500, 1000])
def test_norms_scale_exactly(kind, exponent):
    scale = 2.0**exponent  # exact: the reference is the unscaled norm times the same power of two
    assert close(norm(torch.from_numpy(W * scale), kind), np_norm(W, kind) * scale, rtol=1e-12)
    if abs(exponent) < 100:
        return
    w32 = torch.from_numpy(W * 2.0 ** (exponent // 8)).float()  # within float32's range, 2**±62 to 2**±130
    expected = np_norm(w32.double().numpy(), kind)
    assert close(norm(w32, kind, dtype=torch.float32), expected, rtol=1e-6)


def test_norms_overflow_only_when_the_value_does():
    big = np.array([[1e308, 1e308]])
    assert close(norm(big, "fro"), math.hypot(1e308, 1e308)) and close(
        norm(big, "spectral"), math.hypot(1e308, 1e308)
    )
    assert norm(np.array([[1.7e308, 1.7e308]]), "fro") == math.inf  # 2.4e308 is not a float64
    assert norm(np.array([[1.7e308, 1.7e308]]), "max") == 1.7e308
    f32 = torch.tensor([[3e38, 3e38]])  # float32; the float64 result 6e38 is returned as a Python float
    assert close(norm(f32, "inf", dtype=torch.float32), 6e38, rtol=1e-6)


def test_degenerate_inputs_at_extreme_magnitudes():
    for scale in (1e-300, 1e300):
        one_hot = np.zeros(50)
        one_hot[7] = scale
        assert close(hoyer(one_hot), 1.0) and close(gini(one_hot), 1 - 1 / 50)
        assert close(hoyer(np.full(50, scale)), 0.0) and close(gini(np.full(50, scale)), 0.0)
        assert close(per(np.outer(np.ones(6), np.arange(1.0, 5.0)) * scale), 1 / 4)  # rank 1
        assert close(per(np.eye(5) * scale), 1.0) and close(condition_number(np.eye(5) * scale), 1.0)
        assert math.isnan(cka(np.full((10, 3), scale), X[:10, :3]))  # constant features, as at scale 1
    assert condition_number(np.diag([2.0**-1000, 2.0**-1030])) == 2.0**30  # sigma_min subnormal-free
    assert condition_number(np.diag([2.0**1000, 2.0**-1000])) == math.inf  # 2**2000 exceeds float64
    assert per(np.zeros((3, 4))) == 0.0 and norm(np.zeros((3, 4)), "fro") == 0.0
    near_max = np.full(1000, 1e306)  # the sum |w|_1 = 1e309 overflows float64; gini and hoyer must not
    assert close(gini(near_max), 0.0) and close(hoyer(near_max), 0.0)


N_LARGE = 2**24 + 3_000_001  # past float32's 2**24 integer range, where float32 sums drift


@pytest.fixture(scope="module")
def large32():
    return torch.rand(N_LARGE, generator=torch.Generator().manual_seed(0))


def test_float32_paths_accumulate_in_float64(large32):
    w64 = large32.double().numpy()  # the same values; NumPy's pairwise float64 sums are the reference
    assert close(hoyer(large32, dtype=torch.float32), np_hoyer(w64), rtol=1e-7)
    assert close(norm(large32, "fro", dtype=torch.float32), np.sqrt(np.dot(w64, w64)), rtol=1e-7)
    row = large32.view(1, -1)
    assert close(norm(row, "inf", dtype=torch.float32), np.abs(w64).sum(), rtol=1e-7)
    assert close(gini(large32, dtype=torch.float32), np_gini(w64), rtol=1e-6)
