"""Each metric against an independent float64 NumPy computation written from the paper's formula."""

import math

import numpy as np
import pytest
import torch

from pico.metrics import (
    METRICS,
    cka,
    condition_number,
    get_metric,
    gini,
    hoyer,
    norm,
    per,
    pwcca,
    register_metric,
)
from tests.metrics.references import (
    close,
    np_cka,
    np_gini,
    np_hoyer,
    np_norm,
    np_per,
    np_pwcca,
    orthogonal,
)

rng = np.random.default_rng(0)

# ---------------------------------------------------------------- values against the references

# feature space and Gram space paths
SHAPES = [((64, 8), (64, 5)), ((40, 30), (40, 30)), ((20, 50), (20, 35))]


@pytest.mark.parametrize(
    "kernel,debiased", [("linear", False), ("linear", True), ("rbf", False), ("rbf", True)]
)
@pytest.mark.parametrize("shapes", SHAPES)
def test_cka_matches_reference(shapes, kernel, debiased):
    x, y = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    y[:, 0] += 2 * x[:, 0]  # some shared signal, so CKA is not near 0
    value = cka(torch.from_numpy(x), torch.from_numpy(y), kernel=kernel, debiased=debiased)
    assert close(value, np_cka(x, y, kernel, debiased))


@pytest.mark.parametrize("shapes", [((80, 10), (80, 6)), ((60, 7), (60, 12)), ((100, 20), (100, 20))])
def test_pwcca_matches_reference(shapes):
    x, y = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    y[:, :3] += x[:, :3]
    value = pwcca(torch.from_numpy(x), torch.from_numpy(y))
    assert close(value, np_pwcca(x, y))
    assert not close(value, pwcca(y, x))  # the weights come from x: not symmetric


@pytest.mark.parametrize("shape", [(12, 12), (30, 7), (7, 30)])
def test_matrix_metrics_match_reference(shape):
    w = rng.standard_normal(shape)
    t = torch.from_numpy(w)
    s = np.linalg.svd(w, compute_uv=False)
    assert close(per(t), np_per(w))
    assert close(condition_number(t), s[0] / s[-1])
    for kind in ("fro", "nuc", "inf", "spectral", "max"):
        assert close(norm(t, kind), np_norm(w, kind)), kind
    assert close(gini(t), np_gini(w))
    assert close(hoyer(t), np_hoyer(w))


def test_inf_norm_is_the_induced_norm():
    w = torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.5, 0.0]])
    assert norm(w, "inf") == 6.0  # max absolute row sum, not max |entry| (= 4, kind="max")
    assert norm(w, "max") == 4.0


def test_sparsity_of_known_vectors():
    assert close(gini(torch.ones(10)), 0.0)
    assert close(hoyer(torch.ones(10)), 0.0)
    one_hot = torch.zeros(10)
    one_hot[3] = -5.0
    assert close(hoyer(one_hot), 1.0)
    assert close(gini(one_hot), 1 - 1 / 10)  # Hurley-Rickard: 1 - 1/N for a single non-zero
    x = torch.randn(3, 4, 5)  # any shape is flattened
    assert gini(x) == gini(x.flatten()) and hoyer(x) == hoyer(x.flatten())


# ---------------------------------------------------------------- invariances


@pytest.mark.parametrize("kernel,debiased", [("linear", False), ("linear", True), ("rbf", False)])
def test_cka_invariant_to_orthogonal_transforms_and_isotropic_scaling(kernel, debiased):
    x, y = rng.standard_normal((50, 12)), rng.standard_normal((50, 9))
    y[:, :4] += x[:, :4]
    base = cka(x, y, kernel=kernel, debiased=debiased)
    assert close(cka(3.5 * x @ orthogonal(12, rng), y, kernel=kernel, debiased=debiased), base)
    assert close(cka(x, 0.01 * y @ orthogonal(9, rng), kernel=kernel, debiased=debiased), base)
    assert close(cka(x, x, kernel=kernel, debiased=debiased), 1.0)


def test_pwcca_invariant_to_invertible_maps():
    x = rng.standard_normal((120, 15))
    a = rng.standard_normal((15, 15)) + 3 * np.eye(15)
    assert close(pwcca(x, x @ a), 1.0)
    assert close(pwcca(x @ a, x), 1.0)
    assert close(pwcca(x, x), 1.0)


def test_deterministic():
    x, y = torch.randn(200, 30), torch.randn(200, 20)
    for fn in (
        lambda: cka(x, y),
        lambda: cka(x, y, kernel="rbf", debiased=True),
        lambda: pwcca(x, y),
        lambda: per(x),
        lambda: condition_number(x),
        lambda: gini(x),
        lambda: hoyer(x),
    ):
        assert fn() == fn()


# ---------------------------------------------------------------- degenerate input: one behaviour each


def test_zero_tensor():
    z = torch.zeros(10, 4)
    x = torch.randn(10, 4)
    assert (
        math.isnan(cka(z, x)) and math.isnan(cka(z, x, kernel="rbf")) and math.isnan(cka(z, x, debiased=True))
    )
    assert math.isnan(pwcca(z, x)) and math.isnan(pwcca(x, z))
    assert per(z) == 0.0
    assert condition_number(z) == math.inf
    assert math.isnan(gini(z)) and math.isnan(hoyer(z))
    assert all(norm(z, kind) == 0.0 for kind in ("fro", "nuc", "inf", "spectral", "max"))


def test_constant_features_are_zero_after_centring():
    c = torch.ones(10, 3) * torch.tensor([1.0, 2.0, 3.0])
    assert math.isnan(cka(c, torch.randn(10, 3)))
    assert math.isnan(cka(c, torch.randn(10, 3), kernel="rbf"))  # all samples equal: median distance 0


def test_rank_deficiency():
    x = torch.randn(50, 6, dtype=torch.float64)
    x[:, 5] = x[:, 0] + x[:, 1]  # rank 5
    y = torch.randn(50, 4, dtype=torch.float64)
    assert 0 <= pwcca(x, y) <= 1 and close(pwcca(x, x), 1.0) and close(pwcca(x, x[:, :5]), 1.0)
    assert close(cka(x, x), 1.0)
    assert math.isfinite(per(x)) and 0 < per(x) < 1
    assert condition_number(torch.diag(torch.tensor([3.0, 2.0, 0.0]))) == math.inf
    assert close(per(torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))), 2 / 4)  # 0 log 0 = 0: effective rank 2


def test_fewer_samples_than_features():
    x, y = rng.standard_normal((10, 40)), rng.standard_normal((10, 25))
    assert close(cka(x, y), np_cka(x, y))
    with pytest.raises(
        ValueError, match=r"pwcca: needs more samples than features, got x \(10, 40\) and y \(10, 25\)"
    ):
        pwcca(x, y)


def test_single_element():
    one = torch.tensor([[3.0]])
    assert math.isnan(cka(one, one))
    with pytest.raises(ValueError, match=r"\(1, 1\)"):
        pwcca(one, one)
    assert per(one) == 1.0 and condition_number(one) == 1.0
    assert gini(one) == 0.0 and math.isnan(hoyer(one))
    assert norm(one, "spectral") == 3.0 and norm(torch.tensor(-3.0), "max") == 3.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_gives_nan(bad):
    x = torch.randn(20, 5)
    x[3, 2] = bad
    y = torch.randn(20, 5)
    for name, metric in METRICS.items():
        if name in ("cka", "pwcca"):
            assert math.isnan(metric(x, y)) and math.isnan(metric(y, x)), name
        else:
            assert math.isnan(metric(x)), name
    assert math.isnan(norm(x, "max")) and math.isnan(cka(x, y, kernel="rbf", debiased=True))


def test_shape_errors_name_the_shapes():
    with pytest.raises(
        ValueError, match=r"cka: x and y need the same number of samples .* \(20, 5\) and y \(21, 5\)"
    ):
        cka(torch.randn(20, 5), torch.randn(21, 5))
    with pytest.raises(ValueError, match=r"pwcca: x and y need the same number of samples"):
        pwcca(torch.randn(20, 5), torch.randn(21, 5))
    with pytest.raises(ValueError, match=r"per: expected a 2-D matrix, got shape \(7,\)"):
        per(torch.randn(7))
    with pytest.raises(ValueError, match=r"condition_number: expected a 2-D matrix, got shape \(2, 3, 4\)"):
        condition_number(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"norm: kind='spectral' needs a 2-D matrix, got shape \(7,\)"):
        norm(torch.randn(7), "spectral")
    with pytest.raises(ValueError, match=r"gini: empty input of shape \(0, 3\)"):
        gini(torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r"cka: debiased=True needs at least 4 samples, got x \(3, 2\)"):
        cka(torch.randn(3, 2), torch.randn(3, 2), debiased=True)
    with pytest.raises(ValueError, match="kernel must be 'linear' or 'rbf'"):
        cka(torch.randn(5, 2), torch.randn(5, 2), kernel="poly")
    with pytest.raises(ValueError, match="kind must be one of"):
        norm(torch.randn(3, 3), "l1")
    with pytest.raises(ValueError, match="expected a torch.Tensor or numpy.ndarray, got list"):
        hoyer([1.0, 2.0])


# ---------------------------------------------------------------- input types and devices


def test_numpy_and_float32_inputs():
    x64, y64 = torch.randn(60, 10, dtype=torch.float64), torch.randn(60, 8, dtype=torch.float64)
    x32, y32 = x64.float(), y64.float()
    for metric, args in [
        (cka, (x32, y32)),
        (pwcca, (x32, y32)),
        (per, (x32,)),
        (gini, (x32,)),
        (hoyer, (x32,)),
    ]:
        from_numpy = metric(*(a.numpy() for a in args))
        assert isinstance(from_numpy, float)
        # float32 input is promoted to float64 on CPU
        assert from_numpy == metric(*(a.double() for a in args))
        assert close(metric(*args, dtype=torch.float32), metric(*(a.double() for a in args)), rtol=1e-4)
    assert close(norm(x64.to(torch.bfloat16), "fro"), norm(x64.to(torch.bfloat16).double(), "fro"))
    assert isinstance(condition_number(np.eye(3, dtype=np.float16)), float)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_gpu_agree():
    x, y = torch.randn(500, 40, dtype=torch.float64), torch.randn(500, 30, dtype=torch.float64)
    y[:, :10] += x[:, :10]
    xc, yc = x.cuda(), y.cuda()
    metrics = [
        lambda a, b: cka(a, b),
        lambda a, b: cka(a, b, kernel="rbf"),
        lambda a, b: cka(a, b, debiased=True),
        lambda a, b: pwcca(a, b),
        lambda a, b: per(a),
        lambda a, b: norm(a, "nuc"),
        lambda a, b: gini(a),
    ]
    for fn in metrics:  # float32 on the GPU against float64 on the CPU
        assert close(fn(xc, yc), fn(x, y), rtol=1e-4)
        assert fn(xc, yc) == fn(xc, yc)
    assert close(cka(xc, yc, dtype=torch.float64), cka(x, y))


# ---------------------------------------------------------------- registry


def test_registry_round_trip():
    assert {"cka", "pwcca", "per", "condition_number", "gini", "hoyer", "norm"} <= set(METRICS)
    assert get_metric("cka").comparative and get_metric("pwcca").comparative
    assert not get_metric("per").comparative and get_metric("cka").data_types == ("activations",)
    assert get_metric("norm").params == ("kind",)
    assert get_metric("cka")(torch.eye(5), torch.eye(5)) == cka(torch.eye(5), torch.eye(5))

    @register_metric("test_mean_abs", data_types=("weights",))
    def mean_abs(w, scale: float = 1.0) -> float:
        return float(torch.as_tensor(w).abs().mean() * scale)

    try:
        metric = get_metric("test_mean_abs")
        assert metric.fn is mean_abs and metric.data_types == ("weights",) and not metric.comparative
        assert metric(torch.tensor([-2.0, 2.0]), scale=3.0) == 6.0
        with pytest.raises(ValueError, match="already registered"):
            register_metric("test_mean_abs")(mean_abs)
    finally:
        METRICS.pop("test_mean_abs")
    with pytest.raises(ValueError, match="unknown metric 'nope'; registered: cka"):
        get_metric("nope")
    with pytest.raises(ValueError, match="unknown data types"):
        register_metric("bad", data_types=("logits",))
