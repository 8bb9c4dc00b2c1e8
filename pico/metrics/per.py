"""Proportional effective rank (Roy & Vetterli 2007) of a matrix."""

import torch

from pico.metrics._common import SingularValues, svd_for
from pico.metrics.registry import register_metric


@register_metric("per")
def per(w, dtype: torch.dtype | None = None, sv: SingularValues | None = None) -> float:
    """Proportional effective rank: exp(H(sigma / sum sigma)) / min(m, n) (Roy & Vetterli 2007)."""
    s = svd_for(w, "per", dtype, sv).scaled  # (min(m, n),) descending, NaN for non-finite w
    if s.sum().item() == 0:
        return 0.0
    p = s / s.sum()
    entropy = -torch.special.xlogy(p, p).sum()  # 0 log 0 = 0
    return (entropy.exp() / s.numel()).item()
