"""Sparsity of any tensor, flattened: Gini index and Hoyer's measure."""

import math

import torch

from pico.metrics.inputs import all_finite, as_tensor
from pico.metrics.registry import register_metric


@register_metric("gini")
def gini(w, dtype: torch.dtype | None = None) -> float:
    """Gini index (Hurley & Rickard 2009): 1 - 2 sum_k (c_k / |c|_1) (N - k + 1/2) / N, c = sorted |w|."""
    w = as_tensor(w, "gini", dtype)
    if not all_finite(w):
        return math.nan
    c = w.abs().flatten()  # (N,)
    # Non-negative floats order like their bit patterns read as signed integers, which torch sorts far faster.
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[c.element_size()]
    c = c.view(as_int).sort(stable=True).values.view(c.dtype)  # ascending
    if c.sum().item() == 0:
        return math.nan
    n = c.numel()
    k = torch.arange(1, n + 1, device=c.device, dtype=c.dtype)
    return (1 - 2 * ((c / c.sum()) * ((n - k + 0.5) / n)).sum()).item()


@register_metric("hoyer")
def hoyer(w, dtype: torch.dtype | None = None) -> float:
    """Hoyer sparsity (Hoyer 2004): (sqrt(N) - |w|_1 / |w|_2) / (sqrt(N) - 1)."""
    w = as_tensor(w, "hoyer", dtype)
    if not all_finite(w):
        return math.nan
    n = w.numel()
    l2 = torch.linalg.vector_norm(w)
    if n == 1 or l2.item() == 0:
        return math.nan
    l1 = torch.linalg.vector_norm(w, 1)
    return ((math.sqrt(n) - l1 / l2) / (math.sqrt(n) - 1)).item()
