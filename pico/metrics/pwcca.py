"""Projection-weighted CCA (Morcos et al. 2018) of two activation matrices (samples, features)."""

import math

import torch

from pico.errors import AnalysisError
from pico.metrics._common import centred, checked_pair, compute_dtype
from pico.metrics.registry import register_metric


def _whiten(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a covariance c = V diag(lam) V^T (p, p): (V lam^-1/2, V lam^1/2) over numerically nonzero lam."""
    lam, v = torch.linalg.eigh(c)  # ascending
    keep = lam > lam[-1].clamp_min(0) * c.shape[0] * torch.finfo(c.dtype).eps
    return v[:, keep] * lam[keep].rsqrt(), v[:, keep] * lam[keep].sqrt()  # (p, r), (p, r)


@register_metric("pwcca", comparative=True, data_types=("activations",))
def pwcca(x, y, dtype: torch.dtype | None = None) -> float:
    """Projection-weighted CCA (Morcos et al. 2018) of x (n, p) and y (n, q); weights come from x."""
    x, y = checked_pair(x, y, "pwcca")
    if x.shape[0] <= max(x.shape[1], y.shape[1]):
        raise AnalysisError(
            f"pwcca: needs more samples than features, got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    dtype = compute_dtype(x, dtype)
    x, y = centred(x, dtype), centred(y.to(x.device), dtype)  # scale-invariant: scaled to max|entry| ~ 1
    if x is None or y is None:
        return math.nan
    cxx, cyy, cxy = x.T @ x, y.T @ y, x.T @ y  # (p, p), (q, q), (p, q)
    if cxx.abs().max().item() == 0 or cyy.abs().max().item() == 0:
        return math.nan
    wx, root_x = _whiten(cxx)  # (p, rx): h = x @ wx is an orthonormal basis of x's column space
    wy, _ = _whiten(cyy)  # (q, ry)
    u, rho, _ = torch.linalg.svd(wx.T @ cxy @ wy, full_matrices=False)  # (rx, k), (k,) canonical correlations
    # canonical variates of x: h = x wx u (n, k), orthonormal; h^T x = u^T wx^T cxx = u^T root_x^T (k, p)
    alpha = (u.T @ root_x.T).abs().sum(dim=1)  # (k,) sum_j |<h_i, x_j>| over x's centred neurons
    return ((alpha / alpha.sum()) * rho.clamp(0, 1)).sum().item()
