"""Independent float64 NumPy computations of every metric, written from the papers' formulas."""

import math

import numpy as np

RTOL = 1e-6


def np_hsic(k, l):
    """Biased HSIC (Gretton et al. 2005) up to the 1/(n-1)^2 factor: tr(K H L H)."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h)


def np_hsic_unbiased(k, l):
    """Unbiased HSIC (Song et al. 2012, eq. 5)."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (
        np.trace(k @ l)
        + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one @ k @ l @ one
    ) / (n * (n - 3))


def np_rbf(x, sigma=1.0):
    """Median heuristic with the lower median of all n^2 squared distances."""
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    lower_median = np.sort(d2.ravel())[(d2.size - 1) // 2]
    return np.exp(-d2 / (2 * sigma**2 * lower_median))


def np_cka(x, y, kernel="linear", debiased=False):
    """CKA (Kornblith et al. 2019): HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    if kernel == "linear":
        x, y = x - x.mean(0), y - y.mean(0)
        k, l = x @ x.T, y @ y.T
    else:
        k, l = np_rbf(x), np_rbf(y)
    hsic = np_hsic_unbiased if debiased else np_hsic
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def np_inv_sqrt(s):
    """S^(-1/2) of a symmetric positive definite S."""
    w, v = np.linalg.eigh(s)
    return v @ np.diag(w**-0.5) @ v.T


def np_pwcca(x, y):
    """PWCCA (Morcos et al. 2018): CCA by whitening the covariances, alpha_i = sum_j |<h_i, x_j>|."""
    x, y = x - x.mean(0), y - y.mean(0)
    sxx_is, syy_is = np_inv_sqrt(x.T @ x), np_inv_sqrt(y.T @ y)
    u, rho, _ = np.linalg.svd(sxx_is @ (x.T @ y) @ syy_is)
    k = min(x.shape[1], y.shape[1])
    h = x @ sxx_is @ u[:, :k]  # canonical variates of x, unit norm
    h /= np.linalg.norm(h, axis=0)
    alpha = np.abs(h.T @ x).sum(1)
    return float((alpha / alpha.sum()) @ rho[:k])


def np_per(w):
    """exp(entropy of sigma / sum sigma) / min(m, n) (Roy & Vetterli 2007)."""
    s = np.linalg.svd(w, compute_uv=False)
    p = s / s.sum()
    return np.exp(-(p * np.log(p)).sum()) / min(w.shape)


def np_gini(w):
    """Hurley & Rickard (2009): 1 - 2 sum_k (c_(k) / |c|_1) (N - k + 1/2) / N."""
    c = np.sort(np.abs(w.ravel()))
    n = c.size
    k = np.arange(1, n + 1)
    return 1 - 2 * np.sum(c / c.sum() * (n - k + 0.5) / n)


def np_hoyer(w):
    """(sqrt(N) - |w|_1 / |w|_2) / (sqrt(N) - 1) (Hoyer 2004)."""
    n = w.size
    return (np.sqrt(n) - np.abs(w).sum() / np.sqrt((w**2).sum())) / (np.sqrt(n) - 1)


def np_norm(w, kind):
    """The five norms of docs/metrics.md, by their definitions."""
    s = np.linalg.svd(w, compute_uv=False)
    return {
        "fro": np.sqrt((w**2).sum()),
        "nuc": s.sum(),
        "spectral": s[0],
        "inf": np.abs(w).sum(axis=1).max(),
        "max": np.abs(w).max(),
    }[kind]


def close(a, b, rtol=RTOL):
    """a and b equal to a relative tolerance (1e-12 absolute near zero)."""
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)


def orthogonal(n, rng):
    """A random n x n orthogonal matrix."""
    return np.linalg.qr(rng.standard_normal((n, n)))[0]
