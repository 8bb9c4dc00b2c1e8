"""Condition number of a matrix: largest over smallest singular value."""

import math

import torch

from pico.metrics._common import SingularValues, svd_for
from pico.metrics.registry import register_metric


@register_metric("condition_number", data_types=("gradients", "weights"))
def condition_number(w, dtype: torch.dtype | None = None, sv: SingularValues | None = None) -> float:
    """sigma_max / sigma_min over the min(m, n) singular values; inf when sigma_min is exactly 0."""
    s = svd_for(w, "condition_number", dtype, sv).scaled  # descending, NaN for non-finite w
    return math.inf if s[-1].item() == 0 else s[0].item() / s[-1].item()  # Python floats: no float32 overflow
