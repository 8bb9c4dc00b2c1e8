"""Norms of weights, gradients or activations: Frobenius, nuclear, induced infinity, spectral, max."""

import math

import torch

from pico.errors import AnalysisError
from pico.metrics._common import SingularValues, checked, normalised, sum_sq, svd_for, times_pow2
from pico.metrics.registry import register_metric

NORMS = ("fro", "nuc", "inf", "spectral", "max")


@register_metric("norm")
def norm(w, kind: str = "fro", dtype: torch.dtype | None = None, sv: SingularValues | None = None) -> float:
    """fro: sqrt(sum w^2); nuc: sum sigma; inf: max_i sum_j |w_ij|; spectral: sigma_max; max: max |w_ij|."""
    if kind not in NORMS:
        raise AnalysisError(f"norm: kind must be one of {NORMS}, got {kind!r}")
    w = checked(w, "norm")
    if kind in ("nuc", "inf", "spectral") and w.dim() != 2:
        raise AnalysisError(f"norm: kind={kind!r} needs a 2-D matrix, got shape {tuple(w.shape)}")
    if kind in ("nuc", "spectral"):
        s = svd_for(w, "norm", dtype, sv)
        top = s.scaled.sum(dtype=torch.float64) if kind == "nuc" else s.scaled[0]
        return times_pow2(top.item(), s.exponent)
    u, e = normalised(w, dtype)  # w = u * 2**e, max|u| in [0.5, 1): no overflow or underflow in between
    if u is None:
        return math.nan
    if kind == "fro":
        return times_pow2(math.sqrt(sum_sq(u).item()), e)
    if kind == "max":
        return times_pow2(u.abs().max().item(), e)
    return times_pow2(u.abs().sum(dim=1, dtype=torch.float64).max().item(), e)  # largest absolute row sum
