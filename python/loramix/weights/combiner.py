"""The neural combiner: a small MLP maps per-pair features to a logit; softmax over each bank row
gives the mixing weights (the paper's "neural" pipeline), trained without torch and run in ONNX Runtime.

Training objective (the paper's MSE, leave-one-out): mixing the *other* members of the bank with
the combiner's weights should reconstruct each member,

    L = Σ_i ‖Σ_j w_ij x_j − x_i‖²  =  Σ_i (w_iᵀ G w_i − 2 w_iᵀ G[:, i] + G[i, i]),   w_ii = 0,

so the bank enters only through its Gram matrix G (N×N): in factor space (``factors`` mode) the
inner products of the members' flattened tensors (:func:`loramix.weights.gram.factor_gram`), in delta space
(``concat`` / ``svd`` modes) ``G[i,j] = Σ_modules s_i s_j trace((B_iᵀB_j)(A_j A_iᵀ))``
(:func:`loramix.weights.gram.delta_gram`, from r×r products only). Training then costs nothing that grows with the
adapters' size: full-batch L-BFGS (or Adam) on analytic gradients (numpy + the core's MLP kernels), with a validation split of
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

The Gram matrices themselves are computed in :mod:`loramix.weights.gram`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from loramix.weights import pipelines as wts
from loramix.weights import mlp
from loramix.weights.mlp import MLPParams, softmax_rows  # noqa: F401  (softmax_rows: part of this module's API)

log = logging.getLogger("loramix.weights.combiner")

FORMAT_VERSION = "1"

__all__ = [
    "NeuralCombiner", "StaleCombinerError", "train_combiner", "pair_features", "normalized_weights",
    "softmax_rows", "reconstruction_loss",
]


class StaleCombinerError(ValueError):
    """The saved combiner was trained on another bank (its bank hash differs)."""


# ------------------------------------------------------------------------------------------------
# features and the non-learned pipelines
# ------------------------------------------------------------------------------------------------

def normalized_weights(D: np.ndarray, *, exclude=None, temperature: float = 1.0) -> np.ndarray:
    """The paper's normalized pipeline on every row of ``D`` (Q, N) with ``exclude`` masked out:
    :func:`loramix.weights.mixing_weights` itself (one source of truth for the formula)."""
    D = np.asarray(D, np.float64)
    ex = mlp.exclude_mask(exclude, D.shape)
    return wts.mixing_weights(D, "normalized", temperature=float(temperature), exclude=ex)


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
    ex = mlp.exclude_mask(exclude, shape)
    for name, D in items:
        D = np.asarray(D, np.float64)
        if D.shape != shape or D.ndim != 2:
            raise ValueError(f"{name}: shape {D.shape}, expected {shape} (Q, N)")
        if not np.all(np.isfinite(D[~ex])):
            raise ValueError(f"{name}: NaN or inf among the included pairs")
        cols.append(np.where(ex, 0.0, D))
        names.append(name)
        if row_standardize:
            cols.append(wts.standardize(D, exclude=ex))
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
        ex = mlp.exclude_mask(exclude_mask, X.shape[:2])
        if not np.all(np.isfinite(np.where(ex[..., None], 0.0, X))):
            raise ValueError("features have NaN or inf among the included pairs")
        return X, ex

    def forward(self, features: np.ndarray, exclude_mask=None) -> tuple[np.ndarray, np.ndarray]:
        """(logits, weights), float64 numpy (the training-time pass)."""
        X, ex = self._check(features, exclude_mask)
        s, _, _ = mlp.forward(self.params, np.where(ex[..., None], 0.0, X.astype(np.float64)))
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
        from loramix.profiles.encoder import save_onnx

        path = Path(path)
        model = self.onnx_model(bank_hash, pipeline)
        save_onnx(model, path)
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
    try:
        from scipy.optimize import minimize
    except ImportError:
        raise ImportError("training the neural combiner needs scipy, which is not installed: "
                          "pip install 'loramix[train]'") from None

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


def _one_blas_thread():
    """A context in which numpy's BLAS runs on one thread (threadpoolctl), or nothing without it."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def train_combiner(features: np.ndarray, gram: np.ndarray, *, hidden: int = 32, val_frac: float = 0.2,
                   seed: int = 0, max_epochs: int = 2000, patience: int = 100, lr: float = 0.01,
                   weight_decay: float = 0.0, feature_names: Sequence[str] | None = None,
                   baseline_feature: int | None = None, log_every: int = 0,
                   optimizer: str = "lbfgs", precision: str = "float32", min_delta: float = 1e-4,
                   threads: int | None = None) -> tuple[NeuralCombiner, History]:
    """Train the combiner leave-one-out on the bank's own members.

    ``features[i, j]`` (N, N, F): features of the pair (target member i, source member j) —
    e.g. :func:`pair_features` of the bank's N×N distance matrices; the diagonal is ignored.
    ``gram`` (N, N): the bank's Gram matrix (:func:`factor_gram` or :func:`delta_gram`).
    Members are split (seeded) into train and validation targets; every row mixes all *other*
    members. Full-batch optimization of the relative loss: ``optimizer="lbfgs"`` (scipy's L-BFGS-B;
    the net has ~F·H parameters, so quasi-Newton steps converge in tens to hundreds of
    iterations) or ``"adam"`` (``lr``, ``weight_decay``). An "epoch" is one iteration; early
    stopping on the validation loss after ``patience`` epochs without an improvement of at least
    ``min_delta`` (relative) over the loss that last reset the count — L-BFGS keeps finding
    improvements of 1e-9 near its minimum, which would restart the count again and again
    (``val_frac=0``: no validation, runs ``max_epochs``); the best parameters seen are kept.
    ``precision``: dtype of the per-epoch ``W @ G`` product (the rest is float64). ``log_every > 0`` logs the curve to the ``loramix.weights.combiner`` logger.
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
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', not {optimizer!r}")
    from loramix.core import default_threads

    nthreads = int(threads or default_threads())
    obj_train = mlp.Objective(p, Xt, ext, G, train_rows, e_train, gd, nthreads)
    obj_val = mlp.Objective(p, Xv, exv, G, val_rows, e_val, gd, nthreads) if n_val else None
    state = {"best": p.copy(), "best_loss": np.inf, "mark": np.inf, "since": 0, "epoch": 0}

    def record(loss, vloss) -> bool:
        """Log one epoch; True when early stopping says stop."""
        e = state["epoch"]
        hist.epoch.append(e)
        hist.train_loss.append(float(loss))
        hist.val_loss.append(float(vloss))
        if log_every and e % log_every == 0:
            log.info("epoch %d  train %.6g  val %.6g", e, loss, vloss)
        state["epoch"] += 1
        bl, mark = state["best_loss"], state["mark"]
        if not np.isfinite(bl) or vloss < bl - 1e-12 * abs(bl):
            state.update(best=p.copy(), best_loss=vloss)
            hist.best_epoch, hist.best_val_loss, hist.best_train_loss = e, float(vloss), float(loss)
        if not np.isfinite(mark) or vloss < mark - min_delta * abs(mark):
            state.update(mark=vloss, since=0)
            return False
        state["since"] += 1
        if n_val and state["since"] >= patience:
            hist.stopped_early = True
            return True
        return False

    # The per-epoch W @ G is small (R x N x N): one BLAS thread runs it in a few milliseconds,
    # while BLAS worker threads that wait for each other on a loaded machine made it 10-60x slower.
    with _one_blas_thread():
        if optimizer == "lbfgs":
            _fit_lbfgs(p, obj_train, obj_val, record, max_epochs)
        else:
            _fit_adam(p, obj_train, obj_val, record, max_epochs, lr, weight_decay)
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
