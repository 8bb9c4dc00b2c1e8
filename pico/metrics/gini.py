"""Gini index (Hurley & Rickard 2009) of any tensor, flattened."""

import math

import torch

from pico.metrics._common import checked, normalised
from pico.metrics.registry import register_metric


@register_metric("gini")
def gini(w, dtype: torch.dtype | None = None) -> float:
    """Gini index (Hurley & Rickard 2009): 1 - 2 sum_k (c_k / |c|_1) (N - k + 1/2) / N, c = sorted |w|."""
    u, _ = normalised(checked(w, "gini"), dtype)  # scale-invariant: scaled to max|entry| in [0.5, 1)
    if u is None:
        return math.nan
    c = u.abs().flatten()  # (N,)
    # Non-negative floats order like their bit patterns read as signed integers, which torch sorts far faster.
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[c.element_size()]
    c = c.view(as_int).sort(stable=True).values.view(c.dtype)  # ascending
    total = c.sum(dtype=torch.float64)
    if total.item() == 0:
        return math.nan
    n = c.numel()
    weights = torch.arange(n, 0, -1, dtype=torch.float64, device=c.device).sub_(0.5).div_(n)  # (N-k+1/2)/N
    return (1 - 2 * (c * weights).sum() / total).item()  # products and sums in float64
