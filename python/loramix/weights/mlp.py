"""The neural combiner's model: an MLP on per-pair features, and the leave-one-out reconstruction
objective it is trained on (:mod:`loramix.weights.combiner` trains and exports it). The per-pair
forward and backward passes run in the compiled core (``loramix._core.mlp_forward`` /
``mlp_backward``, ``cpp/src/mlp.cpp``): no JIT compilation in a fresh process, gradients that do
not depend on the thread count; :func:`forward` is the numpy reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loramix import _core


def exclude_mask(exclude, shape) -> np.ndarray:
    """``exclude`` as a boolean mask of ``shape`` (all False for None); a row with nothing left is an error."""
    if exclude is None:
        return np.zeros(shape, bool)
    ex = np.broadcast_to(np.asarray(exclude, bool), shape)
    if np.any(ex.all(axis=-1)):
        raise ValueError("exclude leaves a row with no bank member")
    return ex


def softmax_rows(s: np.ndarray, exclude=None) -> np.ndarray:
    """Softmax over the last axis; excluded entries get weight exactly 0."""
    s = np.asarray(s, np.float64)
    ex = exclude_mask(exclude, s.shape)
    s = np.where(ex, -np.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class MLPParams:
    mean: np.ndarray  # (F,) feature standardization
    std: np.ndarray   # (F,)
    W1: np.ndarray    # (F, H)
    b1: np.ndarray    # (H,)
    w2: np.ndarray    # (H,)
    skip: np.ndarray  # (F,)

    TRAINABLE = ("W1", "b1", "w2", "skip")

    def copy(self) -> "MLPParams":
        return MLPParams(*(np.array(getattr(self, k), np.float64) for k in ("mean", "std", "W1", "b1", "w2", "skip")))


def softsign(a):
    return a / (1.0 + np.abs(a))


def forward(p: MLPParams, X: np.ndarray):
    Z = (X - p.mean) / p.std
    Hh = softsign(Z @ p.W1 + p.b1)
    s = Hh @ p.w2 + Z @ p.skip
    return s, Z, Hh


class Objective:
    """Relative loss Σ_{i∈rows} ℓ_i / energy over a fixed set of target rows, and its gradient.

    The standardized features are computed once; each call runs the MLP over the R·N pairs in
    the core (forward, then a backward pass that recomputes the hidden layer instead of keeping
    an R·N×H buffer) on ``threads`` threads."""

    def __init__(self, p: MLPParams, X: np.ndarray, ex: np.ndarray, G: np.ndarray, rows: np.ndarray, energy: float,
                 gram_dtype=np.float64, threads: int = 1):
        R, N, F = X.shape
        # W @ G is the one O(R N^2) product; float32 there is 4x faster and plenty for training
        # (the loss is reported from the same product; the oracle tests use float64)
        self.Gmul = np.ascontiguousarray(G, gram_dtype)
        self.shape = (R, N)
        self.Z = np.ascontiguousarray(((X - p.mean) / p.std).reshape(R * N, F), np.float64)
        self.ex = ex
        self.G = G
        self.rows = rows
        self.Gt = np.ascontiguousarray(G[:, rows].T)  # (R, N): G[t_q, :]
        self.Gdiag = G[rows, rows]
        self.energy = energy
        self.s = np.empty(R * N, np.float64)
        self.threads = max(1, int(threads))

    def __call__(self, p: MLPParams, need_grad: bool = True):
        f64 = lambda a: np.ascontiguousarray(a, np.float64)  # noqa: E731  (no copy when already so)
        W1, b1, w2 = f64(p.W1), f64(p.b1), f64(p.w2)
        _core.mlp_forward(self.Z, W1, b1, w2, f64(p.skip), self.s, self.threads)
        W = softmax_rows(self.s.reshape(self.shape), self.ex)
        GW = (W.astype(self.Gmul.dtype) @ self.Gmul).astype(np.float64)
        per_row = np.einsum("qn,qn->q", GW, W) - 2.0 * np.einsum("qn,qn->q", W, self.Gt) + self.Gdiag
        loss = per_row.sum() / self.energy
        if not need_grad:
            return loss, None
        dW = 2.0 * (GW - self.Gt) / self.energy
        ds = W * (dW - np.einsum("qn,qn->q", W, dW)[:, None])  # softmax backward; 0 where excluded
        gW1, gb1, gw2, gskip = _core.mlp_backward(self.Z, W1, b1, w2, np.ascontiguousarray(ds.reshape(-1)),
                                                  self.threads)
        return loss, {"W1": gW1, "b1": gb1, "w2": gw2, "skip": gskip}


def loss_and_grad(p: MLPParams, X: np.ndarray, ex: np.ndarray, G: np.ndarray, rows: np.ndarray,
                   energy: float, need_grad: bool = True):
    """Relative loss Σ_{i∈rows} ℓ_i / energy and its gradient w.r.t. the trainable parameters.

    X: (R, N, F) raw features of the rows (targets = ``rows``); ex: (R, N) exclusions."""
    return Objective(p, X, ex, G, rows, energy)(p, need_grad)
