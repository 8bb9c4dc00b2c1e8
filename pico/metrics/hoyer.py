"""Hoyer's sparsity measure (Hoyer 2004) of any tensor, flattened."""

import math

import torch

from pico.metrics._common import checked, normalised, sum_sq
from pico.metrics.registry import register_metric


@register_metric("hoyer")
def hoyer(w, dtype: torch.dtype | None = None) -> float:
    """Hoyer sparsity (Hoyer 2004): (sqrt(N) - |w|_1 / |w|_2) / (sqrt(N) - 1)."""
    u, _ = normalised(checked(w, "hoyer"), dtype)  # scale-invariant: scaled to max|entry| in [0.5, 1)
    if u is None:
        return math.nan
    n = u.numel()
    l2 = math.sqrt(sum_sq(u).item())
    if n == 1 or l2 == 0:
        return math.nan
    l1 = u.abs().sum(dtype=torch.float64).item()  # float64 accumulation: float32 sums drift on large tensors
    return (math.sqrt(n) - l1 / l2) / (math.sqrt(n) - 1)
