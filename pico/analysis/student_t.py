"""Student's t distribution: its tail and its quantiles, for confidence intervals without scipy.

The tail is the regularized incomplete beta function, P(T > t) = I_x(ν/2, 1/2) / 2 with x = ν / (ν + t²)
(Abramowitz & Stegun 26.7.1 and 26.5.27), evaluated by its continued fraction (A&S 26.5.8) with the modified
Lentz method; the quantile is the t where that tail equals 1 - p, found by bisection to the last bit.
For 0.5 ≤ df ≤ 10^6 and 1e-12 ≤ p ≤ 1 - 1e-12 it is within 1e-10 · max(1, |t|) of scipy.stats.t.ppf
(tests/analysis/test_student_t.py).
"""

import functools
import math

from pico.errors import AnalysisError

_TINY = 1e-300  # keeps Lentz's ratios away from division by zero
_MAX_TERMS = 100_000  # a bound: t_ppf(0.975, df) needs at most 51 terms for df from 10 to 10^8


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (A&S 26.5.8) by the modified Lentz method, converging for
    x < (a + 1) / (a + b + 2)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_TERMS):
        for coeff in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # the even term d_2m
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),  # the odd term d_2m+1
        ):
            d = 1.0 + coeff * d
            c = 1.0 + coeff / c
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise AnalysisError(f"incomplete beta I_{x}({a}, {b}): continued fraction did not converge")


def _log_beta(a: float, b: float) -> float:
    """log B(a, b); for a large argument through Stirling's series of lgamma(x) - lgamma(x + s), which keeps
    the digits that lgamma(x) - lgamma(x + s) loses to cancellation (at x = 10^5, about 6)."""
    small, x = sorted((a, b))
    if x < 20.0:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    def series(z):  # lgamma(z) - (z - 1/2) log z + z - log(2π)/2, to z^-7 (the next term < 2e-15 at z = 20)
        return (1 / 12 - (1 / 360 - (1 / 1260 - 1 / (1680 * z * z)) / (z * z)) / (z * z)) / z

    diff = -small * math.log(x) - (x + small - 0.5) * math.log1p(small / x) + small  # lgamma(x) - lgamma(x+s)
    return math.lgamma(small) + diff + series(x) - series(x + small)


def _betainc(a: float, b: float, x: float, y: float, log_x: float, log_y: float) -> float:
    """The regularized incomplete beta function I_x(a, b), given x, y = 1 - x and their logarithms, each
    computed apart so that none loses digits to a subtraction."""
    if x > (a + 1.0) / (
        a + b + 2.0
    ):  # the fraction converges fast on the other side: I_x(a,b) = 1 - I_y(b,a)
        return 1.0 - _betainc(b, a, y, x, log_y, log_x)
    return math.exp(a * log_x + b * log_y - _log_beta(a, b)) / a * _continued_fraction(a, b, x)


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    if t < 0:
        return 1.0 - t_sf(-t, df)
    if t == 0:
        return 0.5
    if t * t <= df:  # x = ν / (ν + t²) = 1 / (1 + s) and y = 1 - x, with s = t² / ν
        s = t * t / df
        x, y, log_x, log_y = 1.0 / (1.0 + s), s / (1.0 + s), -math.log1p(s), math.log(s) - math.log1p(s)
    else:  # the same with r = ν / t² = 1 / s
        r = df / t / t
        x, y, log_x, log_y = r / (1.0 + r), 1.0 / (1.0 + r), math.log(r) - math.log1p(r), -math.log1p(r)
    return 0.5 * _betainc(df / 2.0, 0.5, x, y, log_x, log_y)


@functools.lru_cache(maxsize=1024)
def t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (scipy.stats.t.ppf), 0 < p < 1, df > 0."""
    if not 0.0 < p < 1.0 or not df > 0.0:
        raise AnalysisError(f"t quantile: needs 0 < p < 1 and df > 0, got p={p!r}, df={df!r}")
    if p == 0.5:
        return 0.0
    tail = 1.0 - p if p > 0.5 else p  # exact for p > 0.5 (Sterbenz); the quantile is ±t with P(T > t) = tail
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > tail:
        if hi > 1e150:  # beyond here ν / t² underflows (for ν > 1e-8); no confidence level gets near it
            raise AnalysisError(f"t quantile: p={p!r} with df={df!r} lies beyond ±1e150")
        lo, hi = hi, 2.0 * hi
    while lo < (mid := 0.5 * (lo + hi)) < hi:  # bisect until lo and hi are neighbouring floats
        lo, hi = (mid, hi) if t_sf(mid, df) > tail else (lo, mid)
    return hi if p > 0.5 else -hi
