"""Shared by the metric modules: input checks, exact power-of-two scaling, and the shared singular values."""

import math
from dataclasses import dataclass

import numpy as np
import torch

from pico.errors import AnalysisError


def checked(x, metric: str, matrix: bool = False) -> torch.Tensor:
    """`x` as a detached tensor after every metric's checks: type, real, non-empty, 2-D if `matrix`."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        # Not a TypeError: every bad input to a metric raises the one documented exception type
        got = type(x).__name__
        raise AnalysisError(f"{metric}: expected a torch.Tensor or numpy.ndarray, got {got}")  # noqa: TRY004
    if x.is_complex():
        raise AnalysisError(f"{metric}: complex input of shape {tuple(x.shape)} is not supported")
    if x.numel() == 0:
        raise AnalysisError(f"{metric}: empty input of shape {tuple(x.shape)}")
    if matrix and x.dim() != 2:
        raise AnalysisError(f"{metric}: expected a 2-D matrix, got shape {tuple(x.shape)}")
    return x.detach()


def checked_pair(x, y, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two checked (samples, features) matrices with the same number of samples."""
    x, y = checked(x, metric, matrix=True), checked(y, metric, matrix=True)
    if x.shape[0] != y.shape[0]:
        raise AnalysisError(
            f"{metric}: x and y need the same number of samples (rows), "
            f"got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    return x, y


def compute_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """`dtype` when given, else float64 on CPU and float32 elsewhere."""
    if dtype is not None:
        return dtype
    return torch.float64 if t.device.type == "cpu" else torch.float32


def times_pow2(x, e: int):
    """x * 2**e for a tensor or float, exact unless the result leaves the dtype's range (two factors)."""
    if e == 0:
        return x
    half = e // 2
    return x * 2.0**half * 2.0 ** (e - half)


def normalised(t: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor | None, int]:
    """(u, e): t = u * 2**e exactly, max|u| in [0.5, 1) or u = 0, in compute dtype; u None for NaN/inf."""
    dtype = compute_dtype(t, dtype)
    if not t.is_floating_point():
        t = t.to(dtype)
    low, high = torch.stack(torch.aminmax(t)).tolist()  # min and max propagate NaN and ±inf
    if not (math.isfinite(low) and math.isfinite(high)):
        return None, 0
    e = math.frexp(max(-low, high))[1]  # scaling in t's own dtype first: no overflow or underflow there
    return times_pow2(t, -e).to(dtype), e


def centred(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """t (samples, features) centred per feature, `normalised` before and after; None if t has NaN/inf."""
    u, _ = normalised(t, dtype)
    return None if u is None else normalised(u - u.mean(dim=0, keepdim=True))[0]


def sum_sq(t: torch.Tensor) -> torch.Tensor:
    """Sum of squares of all entries, accumulated in float64."""
    return (t * t).sum(dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class SingularValues:
    """Singular values of a matrix of `shape`, descending, as `scaled * 2**exponent` so none overflows."""

    shape: tuple[int, int]
    scaled: torch.Tensor
    exponent: int

    @property
    def values(self) -> torch.Tensor:
        """The singular values themselves (inf or 0 where they leave the dtype's range)."""
        return times_pow2(self.scaled, self.exponent)


def singular_values(w, dtype: torch.dtype | None = None) -> SingularValues:
    """Singular values of matrix `w`, computed once and passed as `sv=` to per, condition_number and norm."""
    return svd_for(w, "singular_values", dtype)


def svd_for(
    w, metric: str, dtype: torch.dtype | None = None, sv: SingularValues | None = None
) -> SingularValues:
    """`sv` checked against w's shape, else w's singular values (all NaN when w has a non-finite entry)."""
    w = checked(w, metric, matrix=True)
    shape = tuple(w.shape)
    if sv is not None:
        if not isinstance(sv, SingularValues) or sv.shape != shape:
            got = f"those of a {sv.shape} matrix" if isinstance(sv, SingularValues) else type(sv).__name__
            raise AnalysisError(f"{metric}: sv must be singular_values(w) of this {shape} matrix, got {got}")
        return sv
    u, e = normalised(w, dtype)
    if u is None:  # never hand a non-finite matrix to LAPACK
        nan = torch.full((min(shape),), math.nan, dtype=compute_dtype(w, dtype), device=w.device)
        return SingularValues(shape, nan, 0)
    # A wide matrix is passed transposed: same values, and LAPACK is far faster.
    return SingularValues(shape, torch.linalg.svdvals(u if u.shape[0] >= u.shape[1] else u.T), e)
