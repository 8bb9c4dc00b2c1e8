"""Student's t tail and quantiles against scipy.stats.t (pico computes them without scipy)."""

import math

import pytest
from scipy import stats

from pico.analysis import AnalysisError, t_ppf, t_sf

DFS = [*range(1, 31), 40, 50, 100, 1000, 10**4, 10**6, 0.5, 1.5, 2.5, 7.25]
PS = [1e-12, 1e-6, 1e-3, 0.025, 0.05, 0.1, 0.3, 0.4999, 0.5, 0.6, 0.9, 0.95, 0.975, 0.995, 1 - 1e-6]
PS += [1 - 1e-12]


@pytest.mark.parametrize("df", DFS)
def test_t_ppf_equals_scipy(df):
    # near p = 0.5, where |t| is small, the bound is absolute: there scipy itself is off by ~1e-9 relative
    # (df = 4, p = 0.4999: scipy -2.6666667103737794e-4, a 40-digit computation -2.66666670617180e-4)
    for p in PS:
        ours, ref = t_ppf(p, df), stats.t.ppf(p, df)
        assert abs(ours - ref) <= 1e-10 * max(1.0, abs(ref)), (p, df, ours, ref)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 29, 30, 100, 10**4, 0.5])
def test_t_sf_equals_scipy(df):
    # for |t| < 1 the bound is absolute: scipy's sf(1e-6, 1) is 0.4999996816759652, 0.5 - atan(1e-6)/π is
    # 0.49999968169011381 (ours, test_t_sf_closed_forms)
    for t in [-40.0, -2.0, -0.1, 0.0, 1e-6, 0.3, 1.0, 2.0, 4.3, 12.7, 1e3, 1e8]:
        ours, ref = t_sf(t, df), stats.t.sf(t, df)
        assert abs(ours - ref) <= (1e-12 * ref if abs(t) >= 1 else 1e-10), (t, df, ours, ref)


def test_t_sf_closed_forms():
    """df = 1: 1/2 - atan(t)/π; df = 2: 1/2 - t / (2 sqrt(2 + t²)); both in the upper tail as written
    without cancellation."""
    for t in [1e-9, 1e-6, 0.3, 1.0, 2.0, 12.7]:
        assert t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-14)
        assert t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-14)
    for t in [10.0, 1e3, 1e8]:
        assert t_sf(t, 1) == pytest.approx(math.atan(1 / t) / math.pi, rel=1e-14)
        assert t_sf(t, 2) == pytest.approx(1 / (math.sqrt(2 + t * t) * (t + math.sqrt(2 + t * t))), rel=1e-13)


def test_t_ppf_closed_forms():
    """df = 1 is Cauchy, tan(π(p - 1/2)); df = 2 is (2p - 1) / sqrt(2p(1 - p)); symmetric about p = 1/2."""
    for p in (0.6, 0.9, 0.975, 0.999):
        assert t_ppf(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-13)
        assert t_ppf(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-13)
        assert t_ppf(1 - p, 5) == -t_ppf(p, 5)
    assert t_ppf(0.5, 3) == 0.0
    assert t_ppf(0.975, 2) == pytest.approx(4.302652729749464, rel=1e-15)  # the textbook table's 4.303


@pytest.mark.parametrize(
    "p, df, match",
    [
        (0.0, 3, "needs 0 < p < 1"),
        (1.0, 3, "needs 0 < p < 1"),
        (math.nan, 3, "needs 0 < p < 1"),
        (0.9, 0, "df > 0"),
        (0.975, 1e-3, "beyond ±1e150"),  # the true quantile is about 10^1200
    ],
)
def test_t_ppf_bad_input(p, df, match):
    with pytest.raises(AnalysisError, match=match):
        t_ppf(p, df)
