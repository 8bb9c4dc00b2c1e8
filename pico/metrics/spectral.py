"""Matrix metrics of weights and gradients (out_features, in_features): PER, condition number, norms."""

import math

import torch

from pico.metrics.inputs import all_finite, as_matrix, as_tensor
from pico.metrics.registry import register_metric

NORMS = ("fro", "nuc", "inf", "spectral", "max")


def svdvals(w: torch.Tensor) -> torch.Tensor:
    """Singular values, descending. A wide matrix is passed transposed: same values, and LAPACK is far faster."""
    return torch.linalg.svdvals(w if w.shape[0] >= w.shape[1] else w.T)


@register_metric("per")
def per(w, dtype: torch.dtype | None = None) -> float:
    """Proportional effective rank: exp(H(sigma / sum sigma)) / min(m, n) (Roy & Vetterli 2007)."""
    w = as_matrix(w, "per", dtype)
    if not all_finite(w):
        return math.nan
    s = svdvals(w)  # (min(m, n),)
    if s.sum().item() == 0:
        return 0.0
    p = s / s.sum()
    entropy = -torch.special.xlogy(p, p).sum()  # 0 log 0 = 0
    return (entropy.exp() / min(w.shape)).item()


@register_metric("condition_number", data_types=("gradients", "weights"))
def condition_number(w, dtype: torch.dtype | None = None) -> float:
    """sigma_max / sigma_min over the min(m, n) singular values; inf when sigma_min is exactly 0."""
    w = as_matrix(w, "condition_number", dtype)
    if not all_finite(w):
        return math.nan
    s = svdvals(w)  # descending
    return math.inf if s[-1].item() == 0 else (s[0] / s[-1]).item()


@register_metric("norm")
def norm(w, kind: str = "fro", dtype: torch.dtype | None = None) -> float:
    """fro: sqrt(sum w^2); nuc: sum sigma; inf: max_i sum_j |w_ij|; spectral: sigma_max; max: max |w_ij|."""
    if kind not in NORMS:
        raise ValueError(f"norm: kind must be one of {NORMS}, got {kind!r}")
    w = as_tensor(w, "norm", dtype)
    if kind in ("nuc", "inf", "spectral") and w.dim() != 2:
        raise ValueError(f"norm: kind={kind!r} needs a 2-D matrix, got shape {tuple(w.shape)}")
    if not all_finite(w):
        return math.nan
    if kind == "fro":
        return torch.linalg.vector_norm(w).item()
    if kind == "max":
        return torch.linalg.vector_norm(w, math.inf).item()
    if kind == "inf":
        return torch.linalg.matrix_norm(w, math.inf).item()
    s = svdvals(w)
    return (s.sum() if kind == "nuc" else s[0]).item()
