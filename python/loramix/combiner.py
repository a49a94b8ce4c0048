"""The neural combiner: a small MLP maps per-pair features to a logit; softmax over each bank row
gives the mixing weights (the paper's "neural" pipeline), trained without torch and run in ONNX Runtime.

Training objective (the paper's MSE, leave-one-out): mixing the *other* members of the bank with
the combiner's weights should reconstruct each member,

    L = Σ_i ‖Σ_j w_ij x_j − x_i‖²  =  Σ_i (w_iᵀ G w_i − 2 w_iᵀ G[:, i] + G[i, i]),   w_ii = 0,

so the bank enters only through its Gram matrix G (N×N): in factor space (``factors`` mode) the
inner products of the members' flattened tensors (:func:`factor_gram`), in delta space
(``concat`` / ``svd`` modes) ``G[i,j] = Σ_modules s_i s_j trace((B_iᵀB_j)(A_j A_iᵀ))``
(:func:`delta_gram`, from r×r products only). Training then costs nothing that grows with the
adapters' size: full-batch L-BFGS (or Adam) on analytic gradients (numpy + numba kernels), with a validation split of
members and early stopping. The reported loss is relative: Σ ℓ_i / Σ G_ii over the rows.

Model: features f (F) → standardize (train-set mean/std) → z;
``logit = w2 · softsign(z W1 + b1) + skip · z`` (softsign(a) = a / (1 + |a|): bounded like
tanh, eight times cheaper without a vector math library); ``weights = softmax(logit)`` over the row, excluded
members at exactly 0. The linear ``skip`` term lets the net express the normalized pipeline
(``logit = −z``) and the hidden layer bends it.

Public API::

    pair_features(distances: dict[str, (Q,N)], *, exclude=None, embedding_cos=None,
                  row_standardize=True) -> (features (Q,N,F) float64, names list[str])
    normalized_weights(D (Q,N), *, exclude=None, temperature=1.0) -> (Q,N)
    reconstruction_loss(W (Q,N), G (N,N), targets (Q,)) -> (Q,) per-row losses
    train_combiner(features (N,N,F), gram (N,N), *, hidden=32, val_frac=0.2, seed=0,
                   max_epochs=2000, patience=100, optimizer="lbfgs", lr=0.01, ...
                   feature_names=None, log_every=0) -> (NeuralCombiner, history)
    NeuralCombiner.weights(features (Q,N,F), exclude_mask=None) -> (Q,N) float64  [ONNX Runtime]
    NeuralCombiner.forward(features, exclude_mask=None) -> (logits, weights)         [numpy float64]
    NeuralCombiner.save(path, *, bank_hash, pipeline=None) / NeuralCombiner.load(path, expected_bank_hash=None)
    delta_gram(modules, n) -> (N,N);  delta_gram_module(As, Bs, scales=None) -> (N,N)
    factor_gram(tensor_groups, n=None, *, scales=None, threads=None) -> (N,N)
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numba as nb
import numpy as np

log = logging.getLogger("loramix.combiner")

FORMAT_VERSION = "1"

__all__ = [
    "NeuralCombiner", "StaleCombinerError", "train_combiner", "pair_features", "normalized_weights",
    "softmax_rows", "reconstruction_loss", "delta_gram", "delta_gram_module", "factor_gram",
]


class StaleCombinerError(ValueError):
    """The saved combiner was trained on another bank (its bank hash differs)."""


# ------------------------------------------------------------------------------------------------
# features and the non-learned pipelines
# ------------------------------------------------------------------------------------------------

def _exclude_mask(exclude, shape) -> np.ndarray:
    if exclude is None:
        return np.zeros(shape, bool)
    ex = np.broadcast_to(np.asarray(exclude, bool), shape)
    if np.any(ex.all(axis=-1)):
        raise ValueError("exclude leaves a row with no bank member")
    return ex


def softmax_rows(s: np.ndarray, exclude=None) -> np.ndarray:
    """Softmax over the last axis; excluded entries get weight exactly 0."""
    s = np.asarray(s, np.float64)
    ex = _exclude_mask(exclude, s.shape)
    s = np.where(ex, -np.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def _row_standardize(D: np.ndarray, ex: np.ndarray) -> np.ndarray:
    keep = ~ex
    n = keep.sum(axis=-1, keepdims=True)
    mean = np.where(keep, D, 0.0).sum(axis=-1, keepdims=True) / n
    var = np.where(keep, (D - mean) ** 2, 0.0).sum(axis=-1, keepdims=True) / n
    std = np.sqrt(var)
    return np.where(keep, (D - mean) / np.where(std > 0, std, 1.0), 0.0)


def normalized_weights(D: np.ndarray, *, exclude=None, temperature: float = 1.0) -> np.ndarray:
    """The paper's normalized pipeline: standardize each distance row over the members that are
    not excluded (zero mean, unit variance, population std), then softmin at ``temperature``."""
    D = np.asarray(D, np.float64)
    ex = _exclude_mask(exclude, D.shape)
    return softmax_rows(-_row_standardize(D, ex) / float(temperature), ex)


def pair_features(distances: Mapping[str, np.ndarray], *, exclude=None, embedding_cos: np.ndarray | None = None,
                  row_standardize: bool = True) -> tuple[np.ndarray, list[str]]:
    """Per-pair features for the combiner from one or more (Q, N) distance matrices.

    For each metric (in the mapping's order): the raw distance ``name``, and, with
    ``row_standardize``, the row-standardized one ``name:z`` (standardized over non-excluded
    members, as the normalized pipeline does). ``embedding_cos`` (Q, N) adds ``cos`` (and
    ``cos:z``). Returns ``(features (Q, N, F) float64, names)``; pass the same names to training
    and the saved combiner checks them at inference.
    """
    cols, names = [], []
    items = list(distances.items())
    if embedding_cos is not None:
        items.append(("cos", embedding_cos))
    if not items:
        raise ValueError("pair_features needs at least one distance matrix")
    shape = np.asarray(items[0][1]).shape
    ex = _exclude_mask(exclude, shape)
    for name, D in items:
        D = np.asarray(D, np.float64)
        if D.shape != shape or D.ndim != 2:
            raise ValueError(f"{name}: shape {D.shape}, expected {shape} (Q, N)")
        if not np.all(np.isfinite(D[~ex])):
            raise ValueError(f"{name}: NaN or inf among the included pairs")
        cols.append(np.where(ex, 0.0, D))
        names.append(name)
        if row_standardize:
            cols.append(_row_standardize(D, ex))
            names.append(name + ":z")
    return np.stack(cols, axis=-1), names


def reconstruction_loss(W: np.ndarray, G: np.ndarray, targets: Sequence[int] | None = None) -> np.ndarray:
    """Per-row ‖Σ_j W[q,j] x_j − x_{t_q}‖² from the Gram matrix: wᵀGw − 2 wᵀG[:,t] + G[t,t].

    ``targets[q]`` is the bank member row q should reconstruct (default: row q ↔ member q).
    """
    W = np.asarray(W, np.float64)
    G = np.asarray(G, np.float64)
    t = np.arange(W.shape[0]) if targets is None else np.asarray(targets)
    GW = W @ G  # (Q, N); G symmetric
    return np.einsum("qn,qn->q", GW, W) - 2.0 * np.einsum("qn,nq->q", W, G[:, t]) + G[t, t]


# ------------------------------------------------------------------------------------------------
# the MLP
# ------------------------------------------------------------------------------------------------

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


def _softsign(a):
    return a / (1.0 + np.abs(a))


def _forward(p: MLPParams, X: np.ndarray):
    Z = (X - p.mean) / p.std
    Hh = _softsign(Z @ p.W1 + p.b1)
    s = Hh @ p.w2 + Z @ p.skip
    return s, Z, Hh


_NCHUNKS = 32  # fixed partial-sum chunks: gradients do not depend on the thread count


@nb.njit(parallel=True, fastmath=True, cache=True)
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


@nb.njit(parallel=True, fastmath=True, cache=True)
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


class _Objective:
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
        _mlp_forward_kernel(self.Z, p.W1, p.b1, p.w2, p.skip, self.H, self.s)
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
        _mlp_backward_kernel(self.Z, self.H, np.ascontiguousarray(ds.reshape(-1)), p.w2, gW1, gb1, gw2, gskip)
        return loss, {"W1": gW1.sum(0), "b1": gb1.sum(0), "w2": gw2.sum(0), "skip": gskip.sum(0)}


def _loss_and_grad(p: MLPParams, X: np.ndarray, ex: np.ndarray, G: np.ndarray, rows: np.ndarray,
                   energy: float, need_grad: bool = True):
    """Relative loss Σ_{i∈rows} ℓ_i / energy and its gradient w.r.t. the trainable parameters.

    X: (R, N, F) raw features of the rows (targets = ``rows``); ex: (R, N) exclusions."""
    return _Objective(p, X, ex, G, rows, energy)(p, need_grad)


# ------------------------------------------------------------------------------------------------
# ONNX export and the combiner object
# ------------------------------------------------------------------------------------------------

def _build_onnx(p: MLPParams, metadata: Mapping[str, str]):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    F, H = p.W1.shape
    f32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(f32(p.mean), "mean"), numpy_helper.from_array(f32(p.std), "std"),
        numpy_helper.from_array(f32(p.W1), "W1"), numpy_helper.from_array(f32(p.b1), "b1"),
        numpy_helper.from_array(f32(p.w2.reshape(H, 1)), "w2"),
        numpy_helper.from_array(f32(p.skip.reshape(F, 1)), "skip"),
        numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
        numpy_helper.from_array(np.array(-np.inf, np.float32), "neg_inf"),
    ]
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centered"]),
        helper.make_node("Div", ["centered", "std"], ["z"]),
        helper.make_node("MatMul", ["z", "W1"], ["a0"]),
        helper.make_node("Add", ["a0", "b1"], ["a"]),
        helper.make_node("Softsign", ["a"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["s_hidden"]),
        helper.make_node("MatMul", ["z", "skip"], ["s_skip"]),
        helper.make_node("Add", ["s_hidden", "s_skip"], ["s3"]),
        helper.make_node("Squeeze", ["s3", "last_axis"], ["logits"]),
        helper.make_node("Where", ["exclude", "neg_inf", "logits"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["weights"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "loramix_neural_combiner",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["Q", "N", F]),
         helper.make_tensor_value_info("exclude", TensorProto.BOOL, ["Q", "N"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["Q", "N"]),
         helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["Q", "N"])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="loramix")
    model.ir_version = 8
    helper.set_model_props(model, dict(metadata))
    onnx.checker.check_model(model)
    return model


class NeuralCombiner:
    """A trained combiner. Inference (:meth:`weights`) runs in ONNX Runtime; :meth:`forward` is the
    float64 numpy pass used in training."""

    def __init__(self, params: MLPParams, feature_names: Sequence[str] | None = None,
                 metadata: Mapping[str, str] | None = None, threads: int | None = 1):
        self.params = params
        F = params.W1.shape[0]
        self.feature_names = list(feature_names) if feature_names is not None else [f"f{i}" for i in range(F)]
        if len(self.feature_names) != F:
            raise ValueError(f"{len(self.feature_names)} feature names for {F} features")
        self.metadata = dict(metadata or {})
        self.threads = threads
        self._session = None

    @property
    def n_features(self) -> int:
        return self.params.W1.shape[0]

    @property
    def hidden(self) -> int:
        return self.params.W1.shape[1]

    def _check(self, features, exclude_mask):
        X = np.asarray(features)
        if X.ndim == 2:
            X = X[None]
        if X.ndim != 3 or X.shape[-1] != self.n_features:
            raise ValueError(f"features must be (Q, N, {self.n_features}), got {np.shape(features)}")
        ex = _exclude_mask(exclude_mask, X.shape[:2])
        if not np.all(np.isfinite(np.where(ex[..., None], 0.0, X))):
            raise ValueError("features have NaN or inf among the included pairs")
        return X, ex

    def forward(self, features: np.ndarray, exclude_mask=None) -> tuple[np.ndarray, np.ndarray]:
        """(logits, weights), float64 numpy (the training-time pass)."""
        X, ex = self._check(features, exclude_mask)
        s, _, _ = _forward(self.params, np.where(ex[..., None], 0.0, X.astype(np.float64)))
        return s, softmax_rows(s, ex)

    def onnx_model(self, bank_hash: str = "", pipeline: Mapping | None = None):
        meta = dict(self.metadata)
        meta.update({
            "loramix.kind": "neural_combiner", "loramix.format": FORMAT_VERSION,
            "loramix.bank_hash": bank_hash or meta.get("loramix.bank_hash", ""),
            "loramix.feature_names": json.dumps(self.feature_names),
        })
        if pipeline is not None:
            meta["loramix.pipeline"] = json.dumps(pipeline, sort_keys=True)
        return _build_onnx(self.params, meta)

    def _sess(self):
        if self._session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            if self.threads:
                so.intra_op_num_threads = int(self.threads)
            so.inter_op_num_threads = 1
            self._session = ort.InferenceSession(self.onnx_model().SerializeToString(), so,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def weights(self, features: np.ndarray, exclude_mask=None) -> np.ndarray:
        """Mixing weights (Q, N) float64 from features (Q, N, F) (or (N, F) → (1, N)), run in
        ONNX Runtime. ``exclude_mask`` (Q, N) bool: members left out (weight exactly 0)."""
        X, ex = self._check(features, exclude_mask)
        X = np.where(ex[..., None], 0.0, X).astype(np.float32)
        w = self._sess().run(["weights"], {"features": X, "exclude": np.ascontiguousarray(ex)})[0]
        w = w.astype(np.float64)
        return w / w.sum(axis=1, keepdims=True)

    def save(self, path: str | os.PathLike, *, bank_hash: str, pipeline: Mapping | None = None) -> Path:
        """Write the combiner as an .onnx file (atomic) whose metadata carry the bank hash, the
        feature names and the pipeline description."""
        if not bank_hash:
            raise ValueError("bank_hash is required: it is how a stale combiner is detected")
        from .embed import _atomic_save

        path = Path(path)
        model = self.onnx_model(bank_hash, pipeline)
        _atomic_save(model, path)
        self.metadata = {p.key: p.value for p in model.metadata_props}
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expected_bank_hash: str | None = None,
             threads: int | None = 1) -> "NeuralCombiner":
        """Read a saved combiner. With ``expected_bank_hash``, a combiner trained on another bank
        raises :class:`StaleCombinerError` (retrain it)."""
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        meta = {p.key: p.value for p in model.metadata_props}
        if meta.get("loramix.kind") != "neural_combiner":
            raise ValueError(f"{path}: not a loramix neural combiner")
        if meta.get("loramix.format") != FORMAT_VERSION:
            raise ValueError(f"{path}: combiner format {meta.get('loramix.format')!r}, this loramix reads "
                             f"{FORMAT_VERSION!r}; retrain it")
        if expected_bank_hash is not None and meta.get("loramix.bank_hash") != expected_bank_hash:
            raise StaleCombinerError(
                f"{path}: neural combiner is stale: trained on bank {meta.get('loramix.bank_hash')!r}, "
                f"the bank is now {expected_bank_hash!r}; retrain it (loramix bank train-combiner BANK)")
        t = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
        params = MLPParams(t["mean"], t["std"], t["W1"], t["b1"], t["w2"].reshape(-1), t["skip"].reshape(-1))
        return cls(params, json.loads(meta["loramix.feature_names"]), meta, threads=threads)

    @property
    def bank_hash(self) -> str | None:
        return self.metadata.get("loramix.bank_hash")

    @property
    def pipeline(self) -> dict | None:
        p = self.metadata.get("loramix.pipeline")
        return json.loads(p) if p else None


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------

@dataclass
class History:
    """The training curve: one entry per epoch (relative losses), plus the outcome."""
    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = float("nan")
    best_train_loss: float = float("nan")
    baseline_val_loss: float = float("nan")  # normalized pipeline (first feature, T=1), for reference
    train_members: list[int] = field(default_factory=list)
    val_members: list[int] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _fit_adam(p, obj_train, obj_val, record, max_epochs, lr, weight_decay):
    m = {k: np.zeros_like(getattr(p, k)) for k in MLPParams.TRAINABLE}
    v = {k: np.zeros_like(getattr(p, k)) for k in MLPParams.TRAINABLE}
    b1_, b2_, eps = 0.9, 0.999, 1e-8
    for epoch in range(1, max_epochs + 1):
        loss, grad = obj_train(p)
        vloss = obj_val(p, need_grad=False)[0] if obj_val is not None else loss
        if record(loss, vloss):
            return
        for k in MLPParams.TRAINABLE:
            g = grad[k] + (weight_decay * getattr(p, k) if weight_decay and k != "b1" else 0.0)
            m[k] = b1_ * m[k] + (1 - b1_) * g
            v[k] = b2_ * v[k] + (1 - b2_) * g * g
            mh = m[k] / (1 - b1_ ** epoch)
            vh = v[k] / (1 - b2_ ** epoch)
            setattr(p, k, getattr(p, k) - lr * mh / (np.sqrt(vh) + eps))


def _fit_lbfgs(p, obj_train, obj_val, record, max_epochs):
    from scipy.optimize import minimize

    keys = MLPParams.TRAINABLE
    shapes = [getattr(p, k).shape for k in keys]
    sizes = [int(np.prod(sh)) for sh in shapes]

    def unpack(theta):
        o = 0
        for k, sh, n in zip(keys, shapes, sizes):
            setattr(p, k, theta[o:o + n].reshape(sh).copy())
            o += n

    def fun(theta):
        unpack(theta)
        loss, g = obj_train(p)
        return loss, np.concatenate([g[k].ravel() for k in keys])

    def callback(intermediate_result):
        unpack(intermediate_result.x)
        loss = float(intermediate_result.fun)
        vloss = obj_val(p, need_grad=False)[0] if obj_val is not None else loss
        if record(loss, vloss):
            raise StopIteration

    theta0 = np.concatenate([getattr(p, k).ravel() for k in keys])
    loss0 = fun(theta0)[0]
    if record(loss0, obj_val(p, need_grad=False)[0] if obj_val is not None else loss0):
        return
    minimize(fun, theta0, jac=True, method="L-BFGS-B", callback=callback,
             options={"maxiter": max(0, max_epochs - 1), "maxcor": 20, "ftol": 1e-12, "gtol": 1e-10})


def train_combiner(features: np.ndarray, gram: np.ndarray, *, hidden: int = 32, val_frac: float = 0.2,
                   seed: int = 0, max_epochs: int = 2000, patience: int = 100, lr: float = 0.01,
                   weight_decay: float = 0.0, feature_names: Sequence[str] | None = None,
                   baseline_feature: int | None = None, log_every: int = 0,
                   optimizer: str = "lbfgs", precision: str = "float32",
                   threads: int | None = None) -> tuple[NeuralCombiner, History]:
    """Train the combiner leave-one-out on the bank's own members.

    ``features[i, j]`` (N, N, F): features of the pair (target member i, source member j) —
    e.g. :func:`pair_features` of the bank's N×N distance matrices; the diagonal is ignored.
    ``gram`` (N, N): the bank's Gram matrix (:func:`factor_gram` or :func:`delta_gram`).
    Members are split (seeded) into train and validation targets; every row mixes all *other*
    members. Full-batch optimization of the relative loss: ``optimizer="lbfgs"`` (scipy's L-BFGS-B;
    the net has ~F·H parameters, so quasi-Newton steps converge in tens to hundreds of
    iterations) or ``"adam"`` (``lr``, ``weight_decay``). An "epoch" is one iteration; early
    stopping on the validation loss after ``patience`` epochs without improvement
    (``val_frac=0``: no validation, runs ``max_epochs``); the best parameters are kept.
    ``precision``: dtype of the per-epoch ``W @ G`` product (the rest is float64). ``log_every > 0`` logs the curve to the ``loramix.combiner`` logger.
    Returns ``(combiner, history)``.
    """
    t0 = time.perf_counter()
    X = np.asarray(features, np.float64)
    G = np.asarray(gram, np.float64)
    if X.ndim != 3 or X.shape[0] != X.shape[1]:
        raise ValueError(f"features must be (N, N, F), got {X.shape}")
    N, _, F = X.shape
    if G.shape != (N, N):
        raise ValueError(f"gram must be ({N}, {N}), got {G.shape}")
    if N < 3:
        raise ValueError("need at least 3 bank members")
    if not (np.all(np.isfinite(G)) and np.allclose(G, G.T, rtol=1e-9, atol=1e-12 * np.abs(G).max())):
        raise ValueError("gram must be finite and symmetric")
    if not 0 <= val_frac < 1:
        raise ValueError("val_frac must be in [0, 1)")
    G = 0.5 * (G + G.T)
    ex_all = np.eye(N, dtype=bool)
    X = np.where(ex_all[..., None], 0.0, X)
    if not np.all(np.isfinite(X)):
        raise ValueError("features have NaN or inf off the diagonal")

    rng = np.random.default_rng(seed)
    perm = rng.permutation(N)
    n_val = int(round(val_frac * N)) if val_frac > 0 else 0
    if val_frac > 0:
        n_val = min(max(n_val, 1), N - 2)
    val_rows, train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])

    off = ~ex_all[train_rows]
    vals = X[train_rows][off]  # (pairs, F)
    mean = vals.mean(axis=0)
    std = vals.std(axis=0)
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    p = MLPParams(mean=mean, std=std,
                  W1=rng.standard_normal((F, hidden)) / np.sqrt(F),
                  b1=0.1 * rng.standard_normal(hidden),
                  w2=0.1 * rng.standard_normal(hidden) / np.sqrt(hidden),
                  skip=np.zeros(F))

    Xt, ext = X[train_rows], ex_all[train_rows]
    Xv, exv = X[val_rows], ex_all[val_rows]
    e_train = float(G[train_rows, train_rows].sum())
    e_val = float(G[val_rows, val_rows].sum()) if n_val else 1.0
    if e_train <= 0:
        raise ValueError("gram has a non-positive diagonal on the training members")

    hist = History(train_members=train_rows.tolist(), val_members=val_rows.tolist())
    bf = 0 if baseline_feature is None else baseline_feature
    if n_val:
        Wb = normalized_weights(Xv[..., bf], exclude=exv)
        hist.baseline_val_loss = float(reconstruction_loss(Wb, G, val_rows).sum() / e_val)

    if precision not in ("float32", "float64"):
        raise ValueError("precision must be 'float32' or 'float64'")
    gd = np.float32 if precision == "float32" else np.float64
    obj_train = _Objective(p, Xt, ext, G, train_rows, e_train, gd)
    obj_val = _Objective(p, Xv, exv, G, val_rows, e_val, gd) if n_val else None
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', not {optimizer!r}")
    nthreads = threads or int(os.environ.get("LORAMIX_NUM_THREADS", "0") or 0) or nb.config.NUMBA_NUM_THREADS
    prev_threads = nb.get_num_threads()
    nb.set_num_threads(max(1, min(int(nthreads), nb.config.NUMBA_NUM_THREADS)))
    state = {"best": p.copy(), "best_loss": np.inf, "since": 0, "epoch": 0}

    def record(loss, vloss) -> bool:
        """Log one epoch; True when early stopping says stop."""
        e = state["epoch"]
        hist.epoch.append(e)
        hist.train_loss.append(float(loss))
        hist.val_loss.append(float(vloss))
        if log_every and e % log_every == 0:
            log.info("epoch %d  train %.6g  val %.6g", e, loss, vloss)
        state["epoch"] += 1
        bl = state["best_loss"]
        if not np.isfinite(bl) or vloss < bl - 1e-12 * abs(bl):
            state.update(best=p.copy(), best_loss=vloss, since=0)
            hist.best_epoch, hist.best_val_loss, hist.best_train_loss = e, float(vloss), float(loss)
            return False
        state["since"] += 1
        if n_val and state["since"] >= patience:
            hist.stopped_early = True
            return True
        return False

    try:
        if optimizer == "lbfgs":
            _fit_lbfgs(p, obj_train, obj_val, record, max_epochs)
        else:
            _fit_adam(p, obj_train, obj_val, record, max_epochs, lr, weight_decay)
    finally:
        nb.set_num_threads(prev_threads)
    best = state["best"]
    hist.seconds = time.perf_counter() - t0
    meta = {"loramix.hidden": str(hidden), "loramix.training": json.dumps({
        "best_epoch": hist.best_epoch, "best_val_loss": hist.best_val_loss,
        "best_train_loss": hist.best_train_loss, "baseline_val_loss": hist.baseline_val_loss,
        "n_members": N, "n_val": int(n_val), "seed": seed, "optimizer": optimizer,
        "epochs_run": len(hist.epoch)})}
    if log_every:
        log.info("best epoch %d: val %.6g (normalized pipeline %.6g), %.2fs",
                 hist.best_epoch, hist.best_val_loss, hist.baseline_val_loss, hist.seconds)
    return NeuralCombiner(best, feature_names, meta, threads=threads), hist


# ------------------------------------------------------------------------------------------------
# Gram matrices of the bank
# ------------------------------------------------------------------------------------------------

def delta_gram_module(As: Sequence[np.ndarray | None], Bs: Sequence[np.ndarray | None],
                      scales: Sequence[float] | None = None, *, block_rank: int = 2048,
                      dtype=np.float64) -> np.ndarray:
    """One module's contribution to the delta-space Gram:
    ``G[i,j] = s_i s_j <B_i A_i, B_j A_j>_F = s_i s_j trace((B_iᵀ B_j)(A_j A_iᵀ))``.

    ``As[i]`` (r_i, in), ``Bs[i]`` (out, r_i), ``scales[i]`` (alpha / r, or the rsLoRA scale);
    ``None`` for a member lacking the module (zero row and column). Ranks may differ. Computed
    from stacked-factor products ``BᵀB`` and ``AAᵀ`` in blocks of about ``block_rank`` stacked
    ranks — never an out×in matrix; cost O(R² (in + out)) for R = Σ r_i.
    """
    n = len(As)
    if len(Bs) != n:
        raise ValueError("As and Bs must have one entry per member")
    s = np.ones(n) if scales is None else np.asarray(scales, np.float64)
    if s.shape != (n,):
        raise ValueError("scales must have one entry per member")
    present = [i for i in range(n) if As[i] is not None]
    if any((As[i] is None) != (Bs[i] is None) for i in range(n)):
        raise ValueError("a member has A without B (or B without A)")
    G = np.zeros((n, n), np.float64)
    if not present:
        return G
    in_f = As[present[0]].shape[1]
    out_f = Bs[present[0]].shape[0]
    for i in present:
        A, B = As[i], Bs[i]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_f or B.shape[0] != out_f or A.shape[0] != B.shape[1]:
            raise ValueError(f"member {i}: A {A.shape} and B {B.shape} do not form a ({out_f}, {in_f}) delta")
    # blocks of members whose stacked ranks stay under block_rank
    blocks, cur, cur_r = [], [], 0
    for i in present:
        r = As[i].shape[0]
        if cur and cur_r + r > block_rank:
            blocks.append(cur)
            cur, cur_r = [], 0
        cur.append(i)
        cur_r += r
    blocks.append(cur)

    def stack(block):
        A = np.concatenate([np.asarray(As[i], dtype) * s[i] for i in block], axis=0)  # (R, in)
        B = np.concatenate([np.asarray(Bs[i], dtype) for i in block], axis=1)         # (out, R)
        starts = np.cumsum([0] + [As[i].shape[0] for i in block])[:-1]
        return A, B, starts

    stacked = [stack(b) for b in blocks]
    for bi, (Ai, Bi, si) in enumerate(stacked):
        for bj in range(bi, len(blocks)):
            Aj, Bj, sj = stacked[bj]
            M = (Bi.T @ Bj) * (Ai @ Aj.T)  # (Ri, Rj): [a, b] = (B_iᵀB_j)[a,b] (A_i A_jᵀ)[a,b]
            blk = np.add.reduceat(np.add.reduceat(M, si, axis=0), sj, axis=1)
            ii, jj = np.asarray(blocks[bi]), np.asarray(blocks[bj])
            G[np.ix_(ii, jj)] = blk
            if bj != bi:
                G[np.ix_(jj, ii)] = blk.T
    return G


def delta_gram(modules: Iterable, n: int, **kwargs) -> np.ndarray:
    """Delta-space Gram of a bank of N members, summed module by module.

    ``modules`` yields, per LoRA module (e.g. ``layers.3.self_attn.q_proj``), a tuple
    ``(As, Bs)`` or ``(As, Bs, scales)`` as :func:`delta_gram_module` takes them — so a bank can
    stream one module of every member at a time. Returns (N, N) float64.
    """
    G = np.zeros((n, n), np.float64)
    for item in modules:
        As, Bs, *rest = item
        if len(As) != n:
            raise ValueError(f"a module has {len(As)} members, expected {n}")
        G += delta_gram_module(As, Bs, rest[0] if rest else None, **kwargs)
    return G


def factor_gram(tensor_groups: Iterable[Sequence], n: int | None = None, *,
                scales: Iterable[Sequence[float] | None] | None = None, threads: int | None = None) -> np.ndarray:
    """Factor-space Gram (``factors`` mode): ``G[i,j] = Σ_tensors c_i c_j <T_i, T_j>`` over the
    members' flattened tensors.

    ``tensor_groups`` yields, per tensor name, a sequence of N sources (``TensorRef`` from
    ``SafetensorsFile.tensor`` or float32/float16 arrays; ``None`` for a member lacking it);
    ``scales`` (optional) yields per group N multipliers (the scale folded into that factor).
    Uses the core's ``loramix.tensors.gram`` (f64 accumulation, streamed); numpy if the core
    lacks it (arrays only).
    """
    try:
        from .tensors import gram as _gram
    except ImportError:  # core without tensors: numpy fallback
        _gram = None
    G = None
    scale_iter = iter(scales) if scales is not None else None
    for group in tensor_groups:
        group = list(group)
        if n is None:
            n = len(group)
        if len(group) != n:
            raise ValueError(f"a tensor group has {len(group)} members, expected {n}")
        if G is None:
            G = np.zeros((n, n), np.float64)
        c = next(scale_iter) if scale_iter is not None else None
        c = np.ones(n) if c is None else np.asarray(c, np.float64)
        idx = [i for i, t in enumerate(group) if t is not None]
        if not idx:
            continue
        srcs = [group[i] for i in idx]
        if _gram is not None:
            g = np.asarray(_gram(srcs, threads=threads), np.float64)
        else:
            M = np.stack([np.asarray(t, np.float64).reshape(-1) for t in srcs])
            g = M @ M.T
        ii = np.asarray(idx)
        G[np.ix_(ii, ii)] += g * np.outer(c[ii], c[ii])
    if G is None:
        if n is None:
            raise ValueError("factor_gram needs at least one tensor group (or n)")
        G = np.zeros((n, n))
    return G
