"""Metrics for learning dynamics. Each takes torch tensors or numpy arrays and returns a Python float.

Computation runs on the input's device, in float64 on CPU and float32 elsewhere unless `dtype=` is given.
Formulas and the behaviour on degenerate input are listed in docs/metrics.md.
"""

from pico.metrics.registry import DATA_TYPES, METRICS, Metric, get_metric, register_metric
from pico.metrics.similarity import cka, pwcca
from pico.metrics.sparsity import gini, hoyer
from pico.metrics.spectral import NORMS, condition_number, norm, per

__all__ = ["DATA_TYPES", "METRICS", "NORMS", "Metric", "cka", "condition_number", "get_metric", "gini", "hoyer",
           "norm", "per", "pwcca", "register_metric"]
