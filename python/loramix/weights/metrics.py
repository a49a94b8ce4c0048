"""Histogram metrics on token profiles: ``js``, ``kl``, ``wd`` (the compiled core) and ``mmd``
(exact, by FFT), registered by name; :func:`distances` looks a metric up and checks its result.
"""
from __future__ import annotations

import numpy as np

from loramix.core.divergence import EPS, divergence
from loramix.weights.pipelines import METRICS, WeightsError, register_metric


def _core_metric(name):
    def fn(p, r, **kw):
        return divergence(p, r, metric=name, **kw)
    fn.__name__ = f"{name}_distance"
    fn.__doc__ = f"``{name}`` from the compiled core (:func:`loramix.core.divergence.divergence`)."
    return fn


for _m in ("js", "kl", "wd"):
    register_metric(_m, _core_metric(_m))

MMD_BANDWIDTHS = (0.2, 0.5, 0.9, 1.3)


def _dense_rows(x) -> np.ndarray:
    if hasattr(x, "toarray"):
        x = x.toarray()
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    s = x.sum(axis=1, keepdims=True)
    if np.any(s <= 0) or not np.all(np.isfinite(x)) or np.any(x < 0):
        raise WeightsError("mmd: each profile must have finite, non-negative counts and some tokens")
    return x / s


def mmd_distance(p, r, *, bandwidths=MMD_BANDWIDTHS, chunk: int = 64) -> np.ndarray:
    """Squared multiscale-kernel MMD between token-id distributions, exact.

    The paper (and LoraHub-style code) estimates ``mean(XX + YY - 2XY)`` with the kernel
    ``k(x, y) = Σ_a a² / (a² + (x - y)²)``, ``a ∈ {0.2, 0.5, 0.9, 1.3}``, on *sampled* token
    ids. Its expectation over the two token distributions ``p``, ``q`` (normalized histograms,
    no eps) is ``pᵀKp + qᵀKq − 2 pᵀKq``, which is what is returned (the squared MMD, as that
    code does; no sampling noise). ``K`` is Toeplitz over token ids, so ``K·q`` is a
    convolution of ``q`` with ``k(0..±(V-1))``: computed per histogram with a real FFT
    (O(V log V)), then the cross terms are one dense GEMM ``P @ (K R)ᵀ``.
    """
    try:
        import scipy.fft as sfft
    except ImportError:
        raise ImportError("metric mmd needs scipy, which is not installed: pip install 'loramix[scipy]'") from None

    P = _dense_rows(p)
    R = r if hasattr(r, "toarray") else np.atleast_2d(np.asarray(r, dtype=np.float64))
    if P.shape[1] != R.shape[1]:
        raise WeightsError(f"mmd: vocab widths differ ({P.shape[1]} vs {R.shape[1]})")
    v = P.shape[1]
    lag = np.arange(-(v - 1), v, dtype=np.float64)
    kern = np.zeros_like(lag)
    for a in bandwidths:
        kern += a * a / (a * a + lag * lag)
    n_fft = sfft.next_fast_len(3 * v - 2, real=True)
    kf = sfft.rfft(kern, n_fft)

    def apply_k(x):   # (m, v) -> (m, v): rows of x times K
        out = np.empty_like(x)
        for s in range(0, x.shape[0], chunk):
            y = sfft.irfft(sfft.rfft(x[s:s + chunk], n_fft, axis=1) * kf, n_fft, axis=1)
            out[s:s + chunk] = y[:, v - 1:2 * v - 1]
        return out

    kp = apply_k(P)
    pp = np.einsum("ij,ij->i", P, kp)
    out = np.empty((P.shape[0], R.shape[0]))
    for s in range(0, R.shape[0], chunk):   # bank rows densified a chunk at a time
        rc = _dense_rows(R[s:s + chunk])
        kr = apply_k(rc)
        rr = np.einsum("ij,ij->i", rc, kr)
        out[:, s:s + chunk] = pp[:, None] + rr[None, :] - 2.0 * (P @ kr.T)
    return np.maximum(out, 0.0)


register_metric("mmd", mmd_distance)


def bank_distances(query, bank, bank_profiles, metric: str = "js", **kw) -> np.ndarray:
    """:func:`distances` of ``query`` against a bank, for any histogram metric: through the bank's
    stored prepared index when it holds one for ``metric`` (``bank.prepared``, js at the default
    eps) as wide as ``query`` -- the same values bit for bit, without preparing the bank on every
    call -- else against ``bank_profiles``."""
    prep = getattr(bank, "prepared", None)
    if prep is not None and kw.get("eps", EPS) == EPS:
        stored = prep(metric, EPS)
        if stored is not None and stored.shape[1] == query.shape[1]:
            bank_profiles = stored
    return distances(query, bank_profiles, metric, **kw)


def distances(query, bank_profiles, metric: str = "js", **kw) -> np.ndarray:
    """Distance matrix (Q, N) of ``metric`` between query rows and bank rows."""
    if metric not in METRICS:
        raise WeightsError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
    fn, _ = METRICS[metric]
    d = np.asarray(fn(query, bank_profiles, **kw), dtype=np.float64)
    if not np.all(np.isfinite(d)):
        raise WeightsError(f"metric {metric} gave NaN or infinite distances")
    return d
