"""The ``neural`` pipeline: train a bank's combiner (:mod:`loramix.weights.combiner`) and mix with it.

``train_bank_combiner(bank, metrics=("js",), cosine=False, space="factors", hidden=16)``:
the bank's N×N distance matrices per metric (diagonal excluded) → :func:`combiner.pair_features`;
the Gram matrix from one streamed pass over the bank (``factors``: the members' A and s·B factors,
lower ranks zero-padded as the ``factors`` mix pads them, via the core's ``gram``; ``delta``:
module by module from r×r products); :func:`combiner.train_combiner`; saved as
``BANK/combiner.onnx`` tagged with the bank hash and the feature recipe.

``generate(..., pipeline="neural")`` loads it (a combiner of another bank hash is stale: retrain),
computes the same metrics for the queries, the same features, and the weights in ONNX Runtime.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from loramix.weights import gram
from loramix.weights import metrics as metrics_mod
from loramix.weights import pipelines as wts
from loramix.weights.gram import SPACES  # noqa: F401  re-exported: the spaces train_bank_combiner accepts

COMBINER_NAME = "combiner.onnx"
COSINE = "cosine"


def combiner_path(bank) -> Path:
    return Path(bank.path) / COMBINER_NAME


def distance_matrices(bank, metrics: Sequence[str], *, queries=None, fields=None, split="train",
                      cache=None, metric_options: dict | None = None) -> dict[str, np.ndarray]:
    """Distances per metric: queries (datasets) vs the bank, or the bank vs itself (``queries=None``)."""
    from loramix.profiles import embeddings as semantic

    out = {}
    mo = dict(metric_options or {})
    for m in metrics:
        if m not in wts.METRICS:
            raise wts.WeightsError(f"unknown metric {m!r}; known: {', '.join(sorted(wts.METRICS))}")
        if m == COSINE and queries is None:
            from loramix.profiles import encoder as embed
            E = semantic.bank_embeddings(bank, **mo)
            out[m] = 1.0 - embed.cosine_scores(E, E)
        elif queries is None:
            bm = bank.profiles()
            out[m] = metrics_mod.distances(bm, bm, m)
        else:
            raise ValueError("query distances are computed by loramix.pipeline")
    return out


def features_from(dists: dict[str, np.ndarray], exclude=None):
    """:func:`combiner.pair_features` of a dict of distances; ``cosine`` enters as ``cos = 1 - d``."""
    from loramix.weights import combiner

    d = {k: v for k, v in dists.items() if k != COSINE}
    cos = 1.0 - np.asarray(dists[COSINE], np.float64) if COSINE in dists else None
    return combiner.pair_features(d, exclude=exclude, embedding_cos=cos)


def feature_names_for(names: Sequence[str]) -> list[str]:
    """The feature names :func:`features_from` gives for these metrics (``cosine`` last, as ``cos``)."""
    out = []
    for m in [m for m in names if m != COSINE] + ([COSINE] if COSINE in names else []):
        b = "cos" if m == COSINE else m
        out += [b, b + ":z"]
    return out


def fit_combiner(dists: dict[str, np.ndarray], gram: np.ndarray, members=None, *, hidden: int = 16,
                 seed: int = 0, max_epochs: int = 500, patience: int = 50, val_frac: float = 0.2,
                 threads=None):
    """Train a combiner on the bank-vs-bank distances ``dists`` (N×N per metric) and Gram matrix
    (N×N), restricted to the bank rows ``members`` (indices; default all): both are sliced to that
    subset before any feature is computed, so nothing of the other members is seen.
    Returns ``(combiner, history, feature_names)``."""
    from loramix.weights import combiner

    n = np.asarray(gram).shape[0]
    idx = np.arange(n) if members is None else np.asarray(members, dtype=np.int64)
    sub = np.ix_(idx, idx)
    D = {k: np.asarray(v, np.float64)[sub] for k, v in dists.items()}
    X, fnames = features_from(D, exclude=np.eye(len(idx), dtype=bool))
    comb, hist = combiner.train_combiner(X, np.asarray(gram, np.float64)[sub], hidden=hidden, seed=seed,
                                         max_epochs=max_epochs, patience=patience, val_frac=val_frac,
                                         feature_names=fnames, threads=threads)
    return comb, hist, fnames


def train_bank_combiner(bank, metrics: Sequence[str] = ("js",), *, cosine: bool = False, space: str = "factors",
                        hidden: int = 16, encoder=None, quantize=None, seed: int = 0, max_epochs: int = 500,
                        patience: int = 50, val_frac: float = 0.2, out=None, threads=None) -> dict:
    """Train and save the bank's combiner; returns a summary (path, features, training curve)."""
    from loramix.bank.bank import Bank

    bank = bank if isinstance(bank, Bank) else Bank.open(bank)
    metrics = [m for m in metrics if m != COSINE]
    if not metrics and not cosine:
        raise ValueError("the combiner needs at least one metric or --cosine")
    if cosine and not metrics:
        raise ValueError("pass at least one token metric with --cosine (e.g. --metric js)")
    names = list(metrics) + ([COSINE] if cosine else [])
    mo = {"encoder": str(encoder) if encoder else None, "quantize": quantize}
    D = distance_matrices(bank, names, metric_options=mo)
    G = gram.bank_gram(bank, space, threads)
    comb, hist, fnames = fit_combiner(D, G, hidden=hidden, seed=seed, max_epochs=max_epochs, patience=patience,
                                      val_frac=val_frac, threads=threads)
    recipe = {"metrics": names, "space": space, "mode": "factors" if space == "factors" else "concat",
              "encoder": mo["encoder"], "quantize": quantize, "hidden": hidden}
    path = Path(out) if out else combiner_path(bank)
    comb.save(path, bank_hash=bank.hash, pipeline=recipe)
    return {"combiner": str(path), "bank_hash": bank.hash, "features": fnames, **recipe,
            "epochs": len(hist.epoch), "best_epoch": hist.best_epoch,
            "best_train_loss": hist.best_train_loss, "best_val_loss": hist.best_val_loss,
            "normalized_val_loss": hist.baseline_val_loss, "first_train_loss": hist.train_loss[0],
            "stopped_early": hist.stopped_early, "seconds": hist.seconds,
            "train_members": hist.train_members, "val_members": hist.val_members}


def combiner_status(bank) -> dict:
    """Whether ``BANK/combiner.onnx`` exists and was trained on this very bank (fresh)."""
    p = combiner_path(bank)
    if not p.is_file():
        return {"combiner": None}
    import onnx

    meta = {x.key: x.value for x in onnx.load(str(p)).metadata_props}
    return {"combiner": str(p), "combiner_fresh": meta.get("loramix.bank_hash") == bank.hash,
            "combiner_features": json.loads(meta.get("loramix.feature_names", "[]"))}


def _prepare(bank, metric, options: dict):
    """Load the bank's combiner (stale → StaleCombinerError); the metrics it needs."""
    from loramix.weights import combiner

    opts = dict(options)
    comb = opts.get("combiner")
    if comb is None or isinstance(comb, (str, Path)):
        path = Path(comb) if comb else combiner_path(bank)
        opts["combiner_path"] = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"no neural combiner at {path}; train one: loramix bank train-combiner {bank.path}")
        comb = combiner.NeuralCombiner.load(path, expected_bank_hash=bank.hash)
    elif comb.bank_hash != bank.hash:
        raise combiner.StaleCombinerError(f"neural combiner trained on bank {comb.bank_hash!r}, the bank is now "
                                          f"{bank.hash!r}; retrain it (loramix bank train-combiner)")
    recipe = comb.pipeline or {}
    opts["combiner"] = comb
    return list(recipe.get("metrics", ["js"])), opts, {"encoder": recipe.get("encoder"),
                                                      "quantize": recipe.get("quantize")}


@wts.register_pipeline("neural", input="matrices", prepare=_prepare)
def neural(distances: dict, *, exclude=None, combiner=None, temperature: float = 1.0, combiner_path=None,
           **_) -> np.ndarray:
    """Weights from the trained combiner on the features of ``distances`` (ONNX Runtime).
    ``temperature`` is not used (the combiner learned its own scale)."""
    if combiner is None:
        raise wts.WeightsError("the neural pipeline needs a combiner (pipeline_options={'combiner': ...})")
    X, names = features_from(distances, exclude=exclude)
    if names != combiner.feature_names:
        raise wts.WeightsError(f"features {names} differ from the combiner's {combiner.feature_names}")
    return combiner.weights(X, exclude)
