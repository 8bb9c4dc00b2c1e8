"""Standard errors of accuracies (`<metric>_stderr`), as lm-evaluation-harness reports them.

A document-level metric's stderr is the sample standard deviation over documents / sqrt(n) (the harness's
`mean_stderr`); a group score that is the unweighted mean of k subtask means (BLiMP's fields and overall
accuracy) has stderr sqrt(Σ stderr_i²) / k (its `unweighted_mean_stderr`). Fewer than two documents have no
stderr (None; the harness writes "N/A"), and neither has a group with such a subtask.
"""

from __future__ import annotations

import math

import numpy as np


def mean_stderr(values) -> float | None:
    """Sample standard deviation (ddof 1) of per-document values / sqrt(n); None for fewer than two."""
    values = np.asarray(values, dtype=np.float64)  # (n,)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def unweighted_mean_stderr(stderrs: list[float | None]) -> float | None:
    """The stderr of an unweighted mean of k independent subtask means: sqrt(Σ stderr²) / k."""
    if not stderrs or any(s is None for s in stderrs):
        return None
    return math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)


def with_stderr(name: str, values) -> dict:
    """{name: mean of the per-document values, name_stderr: its standard error}."""
    values = np.asarray(values, dtype=np.float64)  # (n,)
    return {name: float(values.mean()), f"{name}_stderr": mean_stderr(values)}
