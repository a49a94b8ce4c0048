"""From distances to mixing weights: metrics and pipelines, one source of truth per formula.

A *metric* maps query profiles (Q rows) and bank profiles (N rows) to a distance matrix (Q, N);
a *pipeline* maps one distance row (restricted to the members allowed for that query) to
weights. Both are plain functions registered by name, so other modules can add one:

    @register_pipeline("neural")
    def neural(d: np.ndarray, *, temperature: float = 1.0, **options) -> np.ndarray: ...

    register_metric("cosine", fn, kind="embedding")   # fn(datasets, bank, *, fields, split, ...) -> (Q, N)

A pipeline registered with ``input="matrices"`` (the ``neural`` one) gets every query row at once
and several distance matrices: ``fn(distances: dict[metric, (Q, N)], *, exclude (Q, N) bool,
temperature, **options) -> (Q, N)``; its ``prepare(bank, metric, options) -> (metrics, options, metric_options)``
says which metrics generate must compute (it may load a model into the options).

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

#: loramix's defaults for generating an adapter (``loramix generate``): the ``hybrid`` metric (token
#: histograms + the datasets' instructions), standardized, at a temperature that keeps the few
#: nearest members (docs/evaluation.md: chosen on the mini bank's valid split, checked on real tasks).
DEFAULT_PIPELINE = "normalized"
DEFAULT_METRIC = "hybrid"
DEFAULT_TEMPERATURE = 0.25
#: the paper's best pipeline, exactly: ``--pipeline normalized --metric js --temperature 1``
PAPER_DEFAULTS = {"pipeline": "normalized", "metric": "js", "temperature": 1.0}

PipelineFn = Callable[..., np.ndarray]
PIPELINES: dict[str, PipelineFn] = {}
PIPELINE_INPUT: dict[str, str] = {}        # name -> "row" (one distance row) | "matrices"
PIPELINE_PREPARE: dict[str, Callable] = {}  # name -> prepare(bank, metric, options) (see above)
METRICS: dict[str, tuple[Callable, str]] = {}
METRIC_RESOLVE: dict[str, Callable] = {}   # name -> resolve(metric_options) -> the metric really used


class WeightsError(ValueError):
    """Weights that cannot be used (NaN, all zero, nothing left to mix)."""


def register_pipeline(name: str, *, input: str = "row", prepare: Callable | None = None):
    """Register a pipeline. ``input="row"``: ``fn(d_row, *, temperature, **options) -> weights``
    on the allowed members of one row. ``input="matrices"``: see the module docstring."""
    if input not in ("row", "matrices"):
        raise ValueError("input must be 'row' or 'matrices'")

    def deco(fn: PipelineFn) -> PipelineFn:
        PIPELINES[name] = fn
        PIPELINE_INPUT[name] = input
        if prepare is not None:
            PIPELINE_PREPARE[name] = prepare
        return fn
    return deco


def register_metric(name: str, fn: Callable, kind: str = "histogram", *, resolve: Callable | None = None) -> Callable:
    """Register a distance.

    ``resolve(metric_options) -> name``: the metric a run with these options really computes (a
    metric that needs something optional may fall back to another one, and says so once);
    :func:`resolve_metric` asks it, so that the provenance names what was computed.

    ``kind="histogram"``: ``fn(query_counts (Q, V), bank_counts (N, V)) -> (Q, N)`` on token
    profiles (dense or CSR). Any other kind (e.g. ``"embedding"`` for a cosine metric on
    sentence embeddings): ``fn(datasets, bank, *, fields, split, cache=None, **metric_options)
    -> (Q, N)``, given the query datasets as passed to :func:`loramix.pipeline.generate`, the
    opened bank and its ``profile_cache`` folder, so it can compute and cache its own features.
    """
    METRICS[name] = (fn, kind)
    if resolve is not None:
        METRIC_RESOLVE[name] = resolve
    return fn


def resolve_metric(name: str, metric_options: dict | None = None) -> str:
    """The metric a run of ``name`` with ``metric_options`` really computes (``name`` itself unless
    the metric registered a ``resolve`` hook that falls back, e.g. ``hybrid`` without an encoder)."""
    fn = METRIC_RESOLVE.get(name)
    return fn(dict(metric_options or {})) if fn is not None else name


def softmin(d: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``exp(-d/T) / Σ exp(-d/T)``, shifted by the row minimum for stability."""
    if not temperature > 0:
        raise WeightsError(f"temperature must be > 0, got {temperature}")
    x = -np.asarray(d, dtype=np.float64) / temperature
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def standardize(d: np.ndarray, exclude=None) -> np.ndarray:
    """Row-wise ``(d - mean) / std`` with the population std; a constant row (sklearn's test,
    which also catches rounding-level spreads) gets std 1, as sklearn's ``StandardScaler`` does.

    ``exclude`` (a boolean mask broadcastable to ``d``): those entries stay out of each row's
    mean and std and come out as 0. The one implementation of the paper's standardization: the
    normalized pipeline and the neural combiner's features both use it.
    """
    d = np.asarray(d, dtype=np.float64)
    if exclude is None:
        mu = d.mean(axis=-1, keepdims=True)
        var = d.var(axis=-1, keepdims=True)
        n = d.shape[-1]
    else:
        keep = ~np.broadcast_to(np.asarray(exclude, bool), d.shape)
        n = keep.sum(axis=-1, keepdims=True)
        mu = np.where(keep, d, 0.0).sum(axis=-1, keepdims=True) / np.maximum(n, 1)
        var = np.where(keep, (d - mu) ** 2, 0.0).sum(axis=-1, keepdims=True) / np.maximum(n, 1)
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mu * eps) ** 2   # sklearn's test for a constant feature
    sd = np.where(constant, 1.0, np.sqrt(var))
    z = (d - mu) / sd
    return z if exclude is None else np.where(keep, z, 0.0)


@register_pipeline("attentional")
def attentional(d: np.ndarray, *, temperature: float = 1.0, **_) -> np.ndarray:
    return softmin(d, temperature)


@register_pipeline("normalized")
def normalized(d: np.ndarray, *, temperature: float = 1.0, **_) -> np.ndarray:
    return softmin(standardize(d), temperature)


PROTOCOLS = ("loramix", "paper")


def mixing_weights(distances, pipeline: str = "normalized", *, temperature: float = 1.0,
                   top_k: int | None = None, exclude=None, protocol: str = "loramix", **options) -> np.ndarray:
    """Weights (Q, N) from distances (Q, N) (a 1-D row gives a 1-D result).

    ``exclude``: a boolean mask (Q, N) or (N,) of members left out (leave-one-out).
    ``protocol`` (row pipelines): ``"loramix"`` (default) leaves excluded members out of the row
    before the pipeline sees it, so they do not enter its statistics (the right choice for a new
    dataset, whose row has no self-distance); ``"paper"`` does what the paper's code does in
    leave-one-out: the pipeline runs on the whole row (``normalized``: mean and std include the
    excluded members, e.g. the self-distance 0), then excluded members are set to infinite
    distance, i.e. their weights are dropped and the rest renormalized (softmin over the kept
    entries of the whole-row standardized distances).
    ``distances`` may be a dict metric name -> (Q, N): a ``"matrices"`` pipeline gets all of them,
    a row pipeline (and top-k) uses the first.
    """
    if pipeline not in PIPELINES:
        raise WeightsError(f"unknown pipeline {pipeline!r}; known: {', '.join(sorted(PIPELINES))}")
    if protocol not in PROTOCOLS:
        raise WeightsError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    mats = None
    if isinstance(distances, dict):
        if not distances:
            raise WeightsError("no distance matrices given")
        mats = {k: np.atleast_2d(np.asarray(v, dtype=np.float64)) for k, v in distances.items()}
        distances = next(iter(distances.values()))
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
    if PIPELINE_INPUT.get(pipeline, "row") == "matrices":
        if np.any(mask.all(axis=1)):
            raise WeightsError("every member is excluded; nothing left to mix")
        for k, m in (mats or {}).items():
            if m.shape != (q, n) or not np.all(np.isfinite(m)):
                raise WeightsError(f"distances {k!r}: shape {m.shape} (expected {(q, n)}) or NaN/inf")
        w = np.asarray(fn(mats or {"d": d}, exclude=np.array(mask), temperature=temperature, **options),
                       dtype=np.float64).reshape(q, n)
        w = np.where(mask, 0.0, w)
        for i in range(q):
            if top_k is not None:
                w[i] = _top_k(d[i], w[i], np.flatnonzero(~mask[i]), top_k)
        check_weights(w)
        return w[0] if one else w
    for i in range(q):
        keep = np.flatnonzero(~mask[i])
        if keep.size == 0:
            raise WeightsError("every member is excluded; nothing left to mix")
        if protocol == "paper" and keep.size < n:
            w[i, keep] = _paper_row(fn, d[i], keep, temperature, options)
        else:
            w[i, keep] = fn(d[i, keep], temperature=temperature, **options)
        if top_k is not None:
            w[i] = _top_k(d[i], w[i], keep, top_k)
    check_weights(w)
    return w[0] if one else w


def _paper_row(fn, d_row, keep, temperature, options):
    """The paper's leave-one-out: statistics over the whole row, excluded entries at infinity."""
    if fn is normalized:   # exact in the log domain: softmin of the whole-row z over the kept entries
        return softmin(standardize(d_row)[keep], temperature)
    w = np.asarray(fn(d_row, temperature=temperature, **options), dtype=np.float64)[keep]
    s = w.sum()
    if not s > 0:
        raise WeightsError("protocol paper: the kept members' weights underflow to zero; raise the temperature")
    return w / s


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
