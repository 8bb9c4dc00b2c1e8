"""Centred kernel alignment (Kornblith et al. 2019) of two activation matrices (samples, features)."""

import math

import torch

from pico.errors import AnalysisError
from pico.metrics._common import centred, checked_pair, compute_dtype, sum_sq
from pico.metrics.registry import register_metric


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    """num / den as a Python float; NaN when the denominator is zero (a constant input)."""
    return math.nan if den.item() <= 0 else (num / den).item()


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Frobenius inner product <a, b> = sum_ij a_ij b_ij, accumulated in float64."""
    return (a * b).sum(dtype=torch.float64)


def _rbf_gram(x: torch.Tensor, sigma: float) -> torch.Tensor | None:
    """exp(-d2_ij / (2 sigma^2 m)), m = lower median of all n^2 entries of d2; None when m is zero."""
    k = x @ x.T  # (n, n)
    sq = k.diagonal().clone()  # (n,) squared norms
    d2 = k.mul_(-2).add_(sq[:, None]).add_(sq[None, :]).clamp_min_(0).fill_diagonal_(0)  # |x_i - x_j|^2
    median = d2.median()  # the lower of the two middle values for an even count
    if median.item() == 0:
        return None
    return d2.div_(-2 * sigma**2 * median).exp_()


def _centre_gram(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T/n, in place."""
    k.sub_(k.mean(dim=0, keepdim=True))
    return k.sub_(k.mean(dim=1, keepdim=True))


def _u_centre_gram(k: torch.Tensor) -> torch.Tensor:
    """U-centring (Song et al. 2012), in place: <U(K), U(L)> = n(n-3) HSIC_unbiased(K, L)."""
    n = k.shape[0]
    k.fill_diagonal_(0)
    means = k.sum(dim=0) / (n - 2)  # (n,)
    means -= means.sum() / (2 * (n - 1))
    return k.sub_(means[:, None]).sub_(means[None, :]).fill_diagonal_(0)


def _debiased_dot(xty_sq, rows_x, rows_y, sq_x, sq_y, n):
    """n(n-3) HSIC_unbiased for linear kernels of centred features, from feature-space quantities."""
    return xty_sq - n / (n - 2) * _inner(rows_x, rows_y) + sq_x * sq_y / ((n - 1) * (n - 2))


def _linear_cka_features(x: torch.Tensor, y: torch.Tensor, debiased: bool) -> float:
    """Linear CKA of centred x (n, p), y (n, q) in feature space: |Y^T X|_F^2 / (|X^T X|_F |Y^T Y|_F)."""
    # |Y^T X|_F^2, |X^T X|_F^2, |Y^T Y|_F^2 as float64 scalars
    xy, xx, yy = sum_sq(y.T @ x), sum_sq(x.T @ x), sum_sq(y.T @ y)
    if debiased:
        n = x.shape[0]
        rows_x, rows_y = (x * x).sum(dim=1), (y * y).sum(dim=1)  # (n,) = diag of the Gram matrices
        sq_x, sq_y = rows_x.sum(dtype=torch.float64), rows_y.sum(dtype=torch.float64)
        xy = _debiased_dot(xy, rows_x, rows_y, sq_x, sq_y, n)
        xx = _debiased_dot(xx, rows_x, rows_x, sq_x, sq_x, n)
        yy = _debiased_dot(yy, rows_y, rows_y, sq_y, sq_y, n)
    return _ratio(xy, (xx.clamp_min(0) * yy.clamp_min(0)).sqrt())


@register_metric("cka", comparative=True, data_types=("activations",))
def cka(
    x, y, kernel: str = "linear", debiased: bool = False, sigma: float = 1.0, dtype: torch.dtype | None = None
) -> float:
    """Centred kernel alignment (Kornblith et al. 2019) of activations x (n, p) and y (n, q)."""
    if kernel not in ("linear", "rbf"):
        raise AnalysisError(f"cka: kernel must be 'linear' or 'rbf', got {kernel!r}")
    if not sigma > 0:
        raise AnalysisError(f"cka: sigma must be positive, got {sigma!r}")
    x, y = checked_pair(x, y, "cka")
    (n, p), q = x.shape, y.shape[1]
    if debiased and n < 4:
        raise AnalysisError(f"cka: debiased=True needs at least 4 samples, got x {tuple(x.shape)}")
    dtype = compute_dtype(x, dtype)
    x, y = centred(x, dtype), centred(y.to(x.device), dtype)  # scale-invariant: scaled to max|entry| ~ 1
    if x is None or y is None:
        return math.nan
    if kernel == "linear" and n * (p * q + p * p + q * q) <= n * n * (p + q):
        return _linear_cka_features(x, y, debiased)
    if kernel == "linear":
        k, l = x @ x.T, y @ y.T  # (n, n) Gram matrices, already centred
    else:
        k, l = _rbf_gram(x, sigma), _rbf_gram(y, sigma)
        if k is None or l is None:
            return math.nan
    if debiased:
        k, l = _u_centre_gram(k), _u_centre_gram(l)
    elif kernel == "rbf":
        k, l = _centre_gram(k), _centre_gram(l)
    return _ratio(_inner(k, l), (sum_sq(k) * sum_sq(l)).sqrt())
