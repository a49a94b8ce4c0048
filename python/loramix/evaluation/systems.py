"""The systems of the leave-one-out table (every registered pipeline x metric, the neural combiner
with K-fold training, uniform, nearest, base, task LoRA) and their leave-one-out weights."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from loramix import weights as wts
from loramix.bank.bank import Bank
from loramix.evaluation.bankpaths import train_split

DEFAULT_PIPELINE = "normalized"
DEFAULT_METRIC = "js"
MODES = ("factors", "concat", "svd")
NEURAL_METRICS = ("js",)   # feature sets of the neural systems (``+`` joins metrics)
NEURAL_FOLDS = 6
_PIPELINE_ORDER = ("attentional", "normalized", "neural")
_METRIC_ORDER = ("js", "kl", "wd", "mmd", "cosine", "instruction", "hybrid")


# --------------------------------------------------------------------------- systems

@dataclass(frozen=True)
class System:
    """One row of the comparison. ``kind``: ``base``, ``task`` (own LoRA), ``mix`` (pipeline
    weights), ``uniform`` or ``nearest``; mixed kinds have a ``mode``."""

    name: str
    kind: str   # base, task, mix, neural, uniform, nearest
    pipeline: str | None = None
    metric: str | None = None
    mode: str | None = None
    temperature: float | None = None   # None: the run's temperature

    @property
    def mixed(self) -> bool:
        return self.kind in ("mix", "neural", "uniform", "nearest")


def _ordered(names, order) -> list[str]:
    return [n for n in order if n in names] + sorted(n for n in names if n not in order)


def available_pipelines() -> list[str]:
    return _ordered(wts.PIPELINES, _PIPELINE_ORDER)


def available_metrics() -> list[str]:
    return _ordered(wts.METRICS, _METRIC_ORDER)


def plan_systems(pipelines: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                 modes: Sequence[str] = MODES, *, default_pipeline: str = DEFAULT_PIPELINE,
                 default_metric: str = DEFAULT_METRIC, baselines: bool = True,
                 temperatures: Sequence[float] = (),
                 neural_metrics: Sequence[str] | None = NEURAL_METRICS) -> list[System]:
    """The systems compared: base, task LoRA, baselines, every pipeline × metric (``factors``),
    the other modes and any extra ``temperatures`` (``<p>-<m>-T<t>``) for the default pair (here
    the paper's, normalized-js), and loramix's generate default (``normalized-hybrid-T0.25``) when its
    metric and pipeline are among those planned.
    The ``neural`` pipeline is not crossed with every metric: it gets one system per feature set
    in ``neural_metrics`` (``neural-js``, ``neural-js+cosine``; fold-trained combiners, see
    :func:`neural_loo_weights`), when it is among the pipelines."""
    explicit = bool(pipelines)
    pipelines = list(pipelines) if pipelines else available_pipelines()
    metrics = list(metrics) if metrics else available_metrics()
    out = [System("base", "base"), System("task-lora", "task")]
    if baselines:
        out.append(System("uniform", "uniform", mode="factors"))
        out.append(System(f"nearest-{default_metric}", "nearest", metric=default_metric, mode="factors"))
    for p in pipelines:
        if p == "neural":
            continue
        for m in metrics:
            out.append(System(f"{p}-{m}", "mix", p, m, "factors"))
    if "neural" in pipelines or (not explicit and neural_metrics):
        for spec in neural_metrics or ():
            parts = neural_parts(spec)
            out.append(System(f"neural-{'+'.join(parts)}", "neural", "neural", "+".join(parts), "factors"))
    for mode in modes:
        if mode != "factors":
            out.append(System(f"{default_pipeline}-{default_metric}-{mode}", "mix",
                              default_pipeline, default_metric, mode))
    for t in temperatures:
        out.append(System(f"{default_pipeline}-{default_metric}-T{t:g}", "mix", default_pipeline,
                          default_metric, "factors", temperature=float(t)))
    # loramix's own default (``loramix generate`` without options), at its temperature
    dp, dm, dt = wts.DEFAULT_PIPELINE, wts.DEFAULT_METRIC, wts.DEFAULT_TEMPERATURE
    if dp in pipelines and dm in metrics and all(s.name != f"{dp}-{dm}-T{dt:g}" for s in out):
        out.append(System(f"{dp}-{dm}-T{dt:g}", "mix", dp, dm, "factors", temperature=dt))
    return out


# --------------------------------------------------------------------------- weights

def _distances(bank: Bank, rows: list[int], metric: str, train_paths: list) -> np.ndarray:
    fn, kind = wts.METRICS[metric]
    if kind == "histogram":
        bm = bank.profiles()
        return wts.distances(bm[rows], bm, metric)
    D = np.atleast_2d(np.asarray(fn(train_paths, bank, fields=bank.fields, split="train"), np.float64))
    if D.shape != (len(rows), len(bank.members)) or not np.all(np.isfinite(D)):
        raise wts.WeightsError(f"metric {metric} gave distances of shape {D.shape} or non-finite ones")
    return D


def neural_parts(spec: str) -> list[str]:
    """The metrics of a neural system's feature set (``js+cosine`` -> ``['js', 'cosine']``)."""
    parts = [x for x in re.split(r"[+,]", str(spec)) if x]
    if not parts:
        raise ValueError(f"empty neural feature set {spec!r}")
    return parts


def fold_assignment(tasks: Sequence[str], k: int = NEURAL_FOLDS, *, seed: int = 0,
                 families: dict | None = None) -> dict[str, int]:
    """Task → fold (0..k-1), seeded. Stratified by family where families are known: the tasks
    are shuffled, grouped by family, and dealt round-robin, so each family is spread across the
    folds and a fold's combiner has trained on the held-out task's siblings — as the paper's
    leave-one-out training (and a bank that gets one new dataset) does. ``k >= len(tasks)``:
    one task per fold (leave-one-out)."""
    tasks = list(tasks)
    k = max(1, min(int(k), len(tasks)))
    rng = np.random.default_rng(seed)
    order = [tasks[i] for i in rng.permutation(len(tasks))]
    if families:
        fam_rank = {}
        for t in order:
            fam_rank.setdefault(families.get(t) or "", len(fam_rank))
        order = sorted(order, key=lambda t: fam_rank[families.get(t) or ""])   # stable: shuffled within
    return {t: j % k for j, t in enumerate(order)}


def fold_members(bank: Bank, tasks: Sequence[str], fold_of: dict, sources: dict | None = None) -> list[dict]:
    """Per fold: its held-out tasks and the members its combiner may train on — every member but
    the held-out tasks and those trained on the same data as one of them (:func:`exclusion_mask`)."""
    mask = exclusion_mask(bank, [bank.index(t) for t in tasks], sources)
    out = []
    for f in range(max(fold_of.values()) + 1):
        q = [k for k, t in enumerate(tasks) if fold_of[t] == f]
        train = np.flatnonzero(~mask[q].any(axis=0))
        out.append({"held_out": [tasks[k] for k in q], "train_members": [bank.names[i] for i in train]})
    return out


def neural_loo_weights(bank: Bank, tasks: Sequence[str], systems: Sequence[System], *, folds: int = NEURAL_FOLDS,
                       seed: int = 0, hidden: int = 16, families: dict | None = None, gram=None,
                       metric_options: dict | None = None, threads=None, sources: dict | None = None,
                       log: Callable[[str], None] | None = None) -> tuple[dict, dict, dict]:
    """Weights of the ``neural`` systems with K-fold combiners: ``(weights, errors, info)``.

    The tasks are split into ``folds`` (:func:`fold_assignment`). For each fold, a combiner is
    trained (:func:`loramix.weights.neural.fit_combiner`, seed ``seed``) on the bank-vs-bank distances and
    the Gram matrix restricted to the fold's *training members*: every member except the fold's
    held-out tasks and any member trained on the same data as one of them (same dataset hash,
    :func:`exclusion_mask`). Each held-out task then gets the combiner's weights over the whole
    bank, its own adapter and same-data members excluded — exactly ``generate(...,
    pipeline="neural", exclude=[task])`` with that fold's combiner. The Gram matrix (factor space,
    as the ``factors`` mix) is computed once and sliced per fold. ``info``: folds, training
    members per fold, feature names, training summaries and the combiners themselves."""
    from loramix.weights import gram as gram_mod
    from loramix.weights import neural

    log = log or (lambda m: None)
    todo = [s for s in systems if s.kind == "neural"]
    W, errors = {}, {}
    info = {"folds": int(folds), "seed": int(seed), "hidden": int(hidden), "space": "factors", "systems": {}}
    if not todo:
        return W, errors, info
    rows = [bank.index(t) for t in tasks]
    mask = exclusion_mask(bank, rows, sources)
    fold_of = fold_assignment(tasks, folds, seed=seed, families=families)
    info["fold_of"] = fold_of
    nf = max(fold_of.values()) + 1
    try:
        G = np.asarray(gram if gram is not None else gram_mod.bank_gram(bank, "factors", threads), np.float64)
    except Exception as e:   # noqa: BLE001
        return W, {s.name: f"{type(e).__name__}: {e}" for s in todo}, info
    D: dict[str, np.ndarray] = {}
    folds_doc = info["fold_members"] = fold_members(bank, tasks, fold_of, sources)
    for s in todo:
        parts = neural_parts(s.metric)
        try:
            for m in parts:
                if m not in D:
                    D.update(neural.distance_matrices(bank, [m], metric_options=metric_options))
            dists = {m: D[m] for m in parts}
            w = np.zeros((len(rows), len(bank.members)))
            combs, hists = [], []
            for f in range(nf):
                q = [k for k, t in enumerate(tasks) if fold_of[t] == f]
                train = np.array([bank.index(n) for n in folds_doc[f]["train_members"]], dtype=np.int64)
                comb, hist, fnames = neural.fit_combiner(dists, G, train, hidden=hidden, seed=seed + f,
                                                         threads=threads)
                qr = [rows[k] for k in q]
                X, xnames = neural.features_from({m: dists[m][qr] for m in parts}, exclude=mask[q])
                if xnames != comb.feature_names:
                    raise wts.WeightsError(f"features {xnames} differ from the combiner's {comb.feature_names}")
                w[q] = comb.weights(X, mask[q])
                combs.append(comb)
                hists.append({"epochs": len(hist.epoch), "best_epoch": hist.best_epoch,
                              "best_val_loss": hist.best_val_loss, "normalized_val_loss": hist.baseline_val_loss,
                              "seconds": round(hist.seconds, 2)})
                log(f"{s.name}: fold {f + 1}/{nf}: trained on {len(train)} members, held out {len(q)}; "
                    f"val loss {hist.best_val_loss:.4f} (normalized pipeline {hist.baseline_val_loss:.4f})")
            wts.check_weights(w)
            W[s.name] = {t: w[k] for k, t in enumerate(tasks)}
            info["systems"][s.name] = {"metrics": parts, "features": fnames, "training": hists,
                                       "combiners": combs}
        except Exception as e:   # noqa: BLE001 - one broken system must not end the run
            errors[s.name] = f"{type(e).__name__}: {e}"
    return W, errors, info


def exclusion_mask(bank: Bank, rows: list[int], sources: dict | None = None) -> np.ndarray:
    """Per held-out task: the task itself and every member trained on the same data — the same
    dataset hash, or (``sources``: name -> set of source datasets, e.g. from ``tasks.json``) a
    shared underlying source, whose texts would make the neighbour trivially close."""
    hashes = np.array([m.info.get("dataset_hash", "") for m in bank.members])
    src = [frozenset((sources or {}).get(n, ())) for n in bank.names]
    mask = np.zeros((len(rows), len(bank.members)), bool)
    for q, i in enumerate(rows):
        mask[q, i] = True
        if hashes[i]:
            mask[q, hashes == hashes[i]] = True
        if src[i]:
            mask[q, [bool(src[i] & x) for x in src]] = True
    return mask


def loo_weights(bank: Bank, tasks: Sequence[str], systems: Sequence[System], *,
                temperature: float = 1.0, top_k: int | None = None,
                pipeline_options: dict | None = None, protocol: str = "loramix",
                sources: dict | None = None) -> tuple[dict, dict, dict]:
    """``(weights, distances, errors)``: ``weights[system][task]`` (N,) for every mixed system,
    ``distances[metric]`` (T, N), and ``errors[system]`` for systems that could not be computed
    (e.g. a pipeline that needs options it was not given): those are skipped, not fatal.
    ``protocol``: how excluded members enter the row statistics (see :func:`loramix.weights.mixing_weights`);
    ``sources``: also exclude members sharing a source dataset (:func:`exclusion_mask`)."""
    rows = [bank.index(t) for t in tasks]
    train = [train_split(bank.members[i].path) for i in rows]
    mask = exclusion_mask(bank, rows, sources)
    D, W, errors = {}, {}, {}
    for s in systems:
        if not s.mixed or s.kind == "neural":
            continue
        try:
            if s.kind == "uniform":
                w = (~mask).astype(np.float64)
                w /= w.sum(axis=1, keepdims=True)
            else:
                if s.metric not in D:
                    D[s.metric] = _distances(bank, rows, s.metric, train)
                d = D[s.metric]
                if s.kind == "nearest":
                    w = np.zeros_like(d)
                    dd = np.where(mask, np.inf, d)
                    w[np.arange(len(rows)), np.argmin(dd, axis=1)] = 1.0
                else:
                    w = wts.mixing_weights(d, s.pipeline, top_k=top_k,
                                           temperature=s.temperature or temperature,
                                           exclude=mask, protocol=protocol, **(pipeline_options or {}))
            wts.check_weights(w)
            W[s.name] = {t: w[q] for q, t in enumerate(tasks)}
        except Exception as e:   # noqa: BLE001 - one broken system must not end the run
            errors[s.name] = f"{type(e).__name__}: {e}"
    return W, D, errors


def weight_stats(w: np.ndarray, members: Sequence[str], task: str, families: dict | None) -> dict:
    """Top-1 weight, effective number of members ``1/Σw²``, and (for a mini bank) the weight on
    the held-out task's own family."""
    out = {"top1": float(w.max()), "effective_members": float(1.0 / np.sum(w * w))}
    if families and task in families:
        fam = families[task]
        out["family_mass"] = float(sum(x for m, x in zip(members, w) if families.get(m) == fam))
    return out
