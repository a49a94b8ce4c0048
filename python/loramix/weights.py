"""From distances to mixing weights: metrics and pipelines, one source of truth per formula.

A *metric* maps query profiles (Q rows) and bank profiles (N rows) to a distance matrix (Q, N);
a *pipeline* maps one distance row (restricted to the members allowed for that query) to
weights. Both are plain functions registered by name, so other modules can add one:

    @register_pipeline("neural")
    def neural(d: np.ndarray, *, temperature: float = 1.0, **options) -> np.ndarray: ...

    register_metric("cosine", fn, kind="embedding")   # fn(query_features, bank_features) -> (Q, N)

:func:`mixing_weights` applies a pipeline row by row, with leave-one-out exclusion (excluded
members get weight 0 and do not enter the row's statistics), then top-k (keep the k nearest by
distance and renormalize their weights to sum 1), and checks the result.

The paper's pipelines, in float64:
- ``attentional``: ``softmin(d / T)`` = ``exp(-d/T) / Σ exp(-d/T)`` (torch ``nn.Softmin``).
- ``normalized``: ``z = (d - mean(d)) / std(d)`` with the population std (sklearn
  ``StandardScaler`` on the row as one feature; a zero std counts as 1, as sklearn does), then
  ``softmin(z / T)``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

PipelineFn = Callable[..., np.ndarray]
PIPELINES: dict[str, PipelineFn] = {}
METRICS: dict[str, tuple[Callable, str]] = {}


class WeightsError(ValueError):
    """Weights that cannot be used (NaN, all zero, nothing left to mix)."""


def register_pipeline(name: str):
    def deco(fn: PipelineFn) -> PipelineFn:
        PIPELINES[name] = fn
        return fn
    return deco


def register_metric(name: str, fn: Callable, kind: str = "histogram") -> Callable:
    """Register a distance.

    ``kind="histogram"``: ``fn(query_counts (Q, V), bank_counts (N, V)) -> (Q, N)`` on token
    profiles (dense or CSR). Any other kind (e.g. ``"embedding"`` for a cosine metric on
    sentence embeddings): ``fn(datasets, bank, *, fields, split) -> (Q, N)``, given the query
    datasets as passed to :func:`loramix.generate.generate` and the opened bank, so it can
    compute and cache its own features.
    """
    METRICS[name] = (fn, kind)
    return fn


def softmin(d: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``exp(-d/T) / Σ exp(-d/T)``, shifted by the row minimum for stability."""
    if not temperature > 0:
        raise WeightsError(f"temperature must be > 0, got {temperature}")
    x = -np.asarray(d, dtype=np.float64) / temperature
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def standardize(d: np.ndarray) -> np.ndarray:
    """Row-wise ``(d - mean) / std`` with the population std; a zero std counts as 1 (sklearn)."""
    d = np.asarray(d, dtype=np.float64)
    mu = d.mean(axis=-1, keepdims=True)
    var = d.var(axis=-1, keepdims=True)
    n, eps = d.shape[-1], np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mu * eps) ** 2   # sklearn's test for a constant feature
    sd = np.where(constant, 1.0, np.sqrt(var))
    return (d - mu) / sd


@register_pipeline("attentional")
def attentional(d: np.ndarray, *, temperature: float = 1.0, **_) -> np.ndarray:
    return softmin(d, temperature)


@register_pipeline("normalized")
def normalized(d: np.ndarray, *, temperature: float = 1.0, **_) -> np.ndarray:
    return softmin(standardize(d), temperature)


def mixing_weights(distances, pipeline: str = "normalized", *, temperature: float = 1.0,
                   top_k: int | None = None, exclude=None, **options) -> np.ndarray:
    """Weights (Q, N) from distances (Q, N) (a 1-D row gives a 1-D result).

    ``exclude``: a boolean mask (Q, N) or (N,) of members left out (leave-one-out).
    """
    if pipeline not in PIPELINES:
        raise WeightsError(f"unknown pipeline {pipeline!r}; known: {', '.join(sorted(PIPELINES))}")
    d = np.asarray(distances, dtype=np.float64)
    one = d.ndim == 1
    d = np.atleast_2d(d)
    q, n = d.shape
    if n == 0:
        raise WeightsError("the bank has no members to mix")
    if not np.all(np.isfinite(d)):
        raise WeightsError("distances hold NaN or infinity")
    mask = np.zeros((q, n), bool) if exclude is None else np.broadcast_to(np.asarray(exclude, bool), (q, n))
    fn = PIPELINES[pipeline]
    w = np.zeros((q, n))
    for i in range(q):
        keep = np.flatnonzero(~mask[i])
        if keep.size == 0:
            raise WeightsError("every member is excluded; nothing left to mix")
        w[i, keep] = fn(d[i, keep], temperature=temperature, **options)
        if top_k is not None:
            w[i] = _top_k(d[i], w[i], keep, top_k)
    check_weights(w)
    return w[0] if one else w


def _top_k(d_row, w_row, keep, k):
    if k < 1:
        raise WeightsError(f"top_k must be >= 1, got {k}")
    if k >= keep.size:
        return w_row
    order = keep[np.argsort(d_row[keep], kind="stable")[:k]]
    out = np.zeros_like(w_row)
    out[order] = w_row[order]
    s = out.sum()
    if not s > 0:
        raise WeightsError("the top-k weights sum to zero")
    return out / s


def check_weights(w) -> np.ndarray:
    """Raise :class:`WeightsError` for NaN/inf weights or a row of all zeros."""
    w = np.atleast_2d(np.asarray(w, dtype=np.float64))
    if not np.all(np.isfinite(w)):
        raise WeightsError("weights hold NaN or infinity")
    zero = np.flatnonzero(~np.any(w != 0, axis=1))
    if zero.size:
        raise WeightsError(f"weights of target {int(zero[0])} are all zero")
    return w


# ---------------------------------------------------------------- metrics

def _core_metric(name):
    def fn(p, r, **kw):
        from .divergence import divergence

        return divergence(p, r, metric=name, **kw)
    fn.__name__ = f"{name}_distance"
    fn.__doc__ = f"``{name}`` from the compiled core (:func:`loramix.divergence.divergence`)."
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
    import scipy.fft as sfft

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


def distances(query, bank_profiles, metric: str = "js", **kw) -> np.ndarray:
    """Distance matrix (Q, N) of ``metric`` between query rows and bank rows."""
    if metric not in METRICS:
        raise WeightsError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
    fn, _ = METRICS[metric]
    d = np.asarray(fn(query, bank_profiles, **kw), dtype=np.float64)
    if not np.all(np.isfinite(d)):
        raise WeightsError(f"metric {metric} gave NaN or infinite distances")
    return d
