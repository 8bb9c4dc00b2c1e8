"""Metrics for learning dynamics. Each takes torch tensors or numpy arrays and returns a Python float.

One module per metric (`pico.metrics.cka`, `pico.metrics.per`, ...), each exposing its function; this package
exposes the functions themselves. Computation runs on the input's device, in float64 on CPU and float32
elsewhere unless `dtype=` is given. Formulas and the behaviour on degenerate input are in docs/metrics.md.
"""

# Importing a submodule for the first time sets the package attribute of its name to the module. Every metric
# module is imported here, before its function is bound to the same name, so that `pico.metrics.cka` is and
# stays the function whichever of `import pico.metrics.cka` and `from pico.metrics import cka` runs first.
from pico.metrics._common import SingularValues, singular_values
from pico.metrics.cka import cka
from pico.metrics.condition_number import condition_number
from pico.metrics.gini import gini
from pico.metrics.hoyer import hoyer
from pico.metrics.norm import NORMS, norm
from pico.metrics.per import per
from pico.metrics.pwcca import pwcca
from pico.metrics.registry import DATA_TYPES, METRICS, Metric, get_metric, register_metric

__all__ = [
    "DATA_TYPES",
    "METRICS",
    "NORMS",
    "Metric",
    "SingularValues",
    "cka",
    "condition_number",
    "get_metric",
    "gini",
    "hoyer",
    "norm",
    "per",
    "pwcca",
    "register_metric",
    "singular_values",
]
