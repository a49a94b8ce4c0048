"""The neural combiner's model: an MLP on per-pair features with fused numba kernels for its forward
and backward passes, and the leave-one-out reconstruction objective it is trained on
(:mod:`loramix.weights.combiner` trains and exports it)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# numba is imported on the first use of a training kernel, never at import: a trained combiner runs
# in ONNX Runtime, so generating with the neural pipeline needs no numba (the `train` extra).
nb = None
TRAIN_EXTRA = "pip install 'loramix[train]'"


def require_numba():
    """The numba module, imported now; a clear error naming the extra when it is not installed."""
    global nb
    if nb is None:
        try:
            import numba
        except ImportError:
            raise ImportError("training the neural combiner (loramix bank train-combiner, train_combiner) "
                              f"needs numba, which is not installed: {TRAIN_EXTRA}") from None
        nb = numba
    return nb


_JIT: dict = {}


def _jit(fn):
    """``fn`` compiled by numba (parallel, fastmath, cached on disk), once per process."""
    k = _JIT.get(fn.__name__)
    if k is None:
        k = _JIT[fn.__name__] = require_numba().njit(parallel=True, fastmath=True, cache=True)(fn)
    return k


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


_NCHUNKS = 32  # fixed partial-sum chunks: gradients do not depend on the thread count


def _mlp_forward_kernel(Z, W1, b1, w2, skip, Hbuf, s):  # pragma: no cover - compiled
    M, F = Z.shape
    H = W1.shape[1]
    for m in nb.prange(M):
        acc = 0.0
        for f in range(F):
            acc += Z[m, f] * skip[f]
        for h in range(H):
            Hbuf[m, h] = b1[h]
        for f in range(F):
            z = Z[m, f]
            for h in range(H):
                Hbuf[m, h] += z * W1[f, h]
        for h in range(H):
            a = Hbuf[m, h]
            t = a / (1.0 + abs(a))
            Hbuf[m, h] = t
            acc += t * w2[h]
        s[m] = acc


def _mlp_backward_kernel(Z, Hbuf, ds, w2, gW1, gb1, gw2, gskip):  # pragma: no cover - compiled
    # gW1 (C, F, H), gb1 (C, H), gw2 (C, H), gskip (C, F): per-chunk partials, summed by the caller
    M, F = Z.shape
    H = Hbuf.shape[1]
    C = gW1.shape[0]
    for c in nb.prange(C):
        lW1 = np.zeros((F, H))
        lb1 = np.zeros(H)
        lw2 = np.zeros(H)
        lsk = np.zeros(F)
        da = np.empty(H)
        for m in range(c * M // C, (c + 1) * M // C):
            d = ds[m]
            if d == 0.0:
                continue
            for h in range(H):
                t = Hbuf[m, h]
                lw2[h] += d * t
                u = 1.0 - abs(t)  # softsign'(a) = 1 / (1 + |a|)^2 = (1 - |t|)^2
                da[h] = d * w2[h] * u * u
                lb1[h] += da[h]
            for f in range(F):
                z = Z[m, f]
                lsk[f] += d * z
                for h in range(H):
                    lW1[f, h] += da[h] * z
        gW1[c] = lW1
        gb1[c] = lb1
        gw2[c] = lw2
        gskip[c] = lsk


class Objective:
    """Relative loss Σ_{i∈rows} ℓ_i / energy over a fixed set of target rows, and its gradient.

    The standardized features and the hidden-activation buffer are computed/allocated once;
    the per-pair MLP runs in fused numba kernels (no N²×H temporaries per epoch)."""

    def __init__(self, p: MLPParams, X: np.ndarray, ex: np.ndarray, G: np.ndarray, rows: np.ndarray, energy: float,
                 gram_dtype=np.float64):
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
        self.H = np.empty((R * N, p.W1.shape[1]), np.float64)
        self.s = np.empty(R * N, np.float64)

    def __call__(self, p: MLPParams, need_grad: bool = True):
        _jit(_mlp_forward_kernel)(self.Z, p.W1, p.b1, p.w2, p.skip, self.H, self.s)
        W = softmax_rows(self.s.reshape(self.shape), self.ex)
        GW = (W.astype(self.Gmul.dtype) @ self.Gmul).astype(np.float64)
        per_row = np.einsum("qn,qn->q", GW, W) - 2.0 * np.einsum("qn,qn->q", W, self.Gt) + self.Gdiag
        loss = per_row.sum() / self.energy
        if not need_grad:
            return loss, None
        dW = 2.0 * (GW - self.Gt) / self.energy
        ds = W * (dW - np.einsum("qn,qn->q", W, dW)[:, None])  # softmax backward; 0 where excluded
        F, Hd = p.W1.shape
        C = _NCHUNKS
        gW1, gb1, gw2, gskip = np.zeros((C, F, Hd)), np.zeros((C, Hd)), np.zeros((C, Hd)), np.zeros((C, F))
        _jit(_mlp_backward_kernel)(self.Z, self.H, np.ascontiguousarray(ds.reshape(-1)), p.w2, gW1, gb1, gw2, gskip)
        return loss, {"W1": gW1.sum(0), "b1": gb1.sum(0), "w2": gw2.sum(0), "skip": gskip.sum(0)}


def loss_and_grad(p: MLPParams, X: np.ndarray, ex: np.ndarray, G: np.ndarray, rows: np.ndarray,
                   energy: float, need_grad: bool = True):
    """Relative loss Σ_{i∈rows} ℓ_i / energy and its gradient w.r.t. the trainable parameters.

    X: (R, N, F) raw features of the rows (targets = ``rows``); ex: (R, N) exclusions."""
    return Objective(p, X, ex, G, rows, energy)(p, need_grad)
