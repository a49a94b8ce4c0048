"""Does the similarity step find the right adapters? Retrieval scores of every metric x pipeline.

Each task of a labelled set is held out in turn as the query; the other tasks are the bank. A bank
member is *relevant* when it shares the query's main category (the first of its ``categories``);
members sharing any of the query's ``sources`` (the same underlying texts) are left out of the
ranking and of the weights, as is the query itself, so that near-copies cannot make it trivial.
Queries whose category has no member left are skipped (they still serve as bank members).

Scores, per query, then averaged over queries (overall and per category):

- ``p1``: the nearest member is relevant; ``p5``: the fraction of the 5 nearest that are relevant;
  ``mrr``: 1 / rank of the nearest relevant member (rankings by distance, ties in bank order);
- ``same_weight``: the pipeline's weight on relevant members (uniform weights give the fraction of
  relevant members, reported as ``chance``);
- ``effective``: the effective number of members ``1 / Σ w²``.

Only profiles are needed, no adapters: token histograms under any tokenizer (the shipped mini
bank's by default) and, for embedding metrics, dataset sentence embeddings (ONNX Runtime). Or
the members of an opened :class:`~loramix.bank.Bank` with their stored profiles.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from loramix import weights as wts
from loramix.data import readers as ds
from loramix.profiles import tokens as prof

#: metrics on features other than token histograms: name -> fn(features) -> (N, N) distances
FEATURE_METRICS: dict[str, Callable] = {}
SKIP_PIPELINES = ("neural",)   # needs a combiner trained on adapters: not a profile-only score


class RetrievalError(ValueError):
    """A labelled task set that cannot be scored (no labels, no queries)."""


def shipped_tokenizer() -> Path:
    """The shipped mini bank's ``tokenizer.json`` (the default tokenizer of :func:`evaluate_retrieval`)."""
    return Path(__file__).resolve().parents[1] / "minibank" / "shipped" / "base" / "tokenizer.json"


@dataclass
class TaskSet:
    """Labelled tasks: names, main categories, source sets, and their profile features."""

    names: list
    categories: list
    sources: list
    counts: object                      # (N, V) csr_array of token counts
    paths: list = field(default_factory=list)   # dataset files (for embeddings); may hold None
    embed_options: dict = field(default_factory=dict)
    bank: object = None
    _cache: dict = field(default_factory=dict)

    def instructions(self) -> np.ndarray:
        """(N, d) instruction embeddings (:mod:`loramix.profiles.instruction`), computed once."""
        if "instr" not in self._cache:
            from loramix.profiles import instruction as ins

            opts = {k: v for k, v in self.embed_options.items() if k in ("encoder", "quantize", "threads")}
            if self.bank is not None:
                self._cache["instr"] = ins.bank_instructions(self.bank, **opts)
            else:
                self._cache["instr"] = np.stack([ins.compute_instruction_embedding(p, **opts)[0]
                                                 for p in self.paths]).astype(np.float64)
        return self._cache["instr"]

    def embeddings(self) -> np.ndarray:
        """(N, d) dataset sentence embeddings (computed once, ONNX Runtime)."""
        if "emb" not in self._cache:
            from loramix.profiles import embeddings as semantic

            opts = dict(self.embed_options)
            if self.bank is not None:
                self._cache["emb"] = semantic.bank_embeddings(self.bank, **opts)
            else:
                from loramix.profiles import encoder as embed

                cap = opts.pop("cap", semantic.DEFAULT_CAP)
                seed = opts.pop("seed", semantic.DEFAULT_SEED)
                rows = []
                for p in self.paths:
                    texts = (t for b in ds.iter_texts(p, ds.DEFAULT_FIELDS) for t in b)
                    rows.append(embed.dataset_embedding(texts, cap=cap, seed=seed,
                                                        model=opts.get("encoder"),
                                                        **{k: v for k, v in opts.items() if k != "encoder"}))
                self._cache["emb"] = np.stack(rows).astype(np.float64)
        return self._cache["emb"]


def read_labels(path) -> dict:
    """``tasks.json`` (a list of ``{"name", "categories", "sources"}``) as name -> (category, sources)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RetrievalError(f"labels {path}: unreadable ({e}); expected a JSON list of "
                             "{'name', 'categories', 'sources'}") from None
    if isinstance(doc, dict):
        doc = doc.get("tasks", doc.get("members", []))
    out = {}
    for i, t in enumerate(doc if isinstance(doc, list) else []):
        if not isinstance(t, dict) or not t.get("name") or not t.get("categories"):
            raise RetrievalError(f"labels {path}: entry {i} lacks 'name' or 'categories' (expected "
                                 "{'name': str, 'categories': [str, ...], 'sources': [str, ...]})")
        out[t["name"]] = (str(t["categories"][0]), frozenset(map(str, t.get("sources") or ())))
    if not out:
        raise RetrievalError(f"labels {path}: no tasks listed (expected a JSON list of task entries)")
    return out


def load_tasks(tasks_dir, labels=None, *, tokenizer=None, fields: Sequence[str] = ds.DEFAULT_FIELDS,
               names: Sequence[str] | None = None, embed_options: dict | None = None) -> TaskSet:
    """Profile every labelled task file of ``tasks_dir`` (``<name>.jsonl`` etc.) with ``tokenizer``
    (default: :func:`shipped_tokenizer`). ``labels``: a ``tasks.json`` path (default:
    ``tasks_dir/../tasks.json`` or ``tasks_dir/tasks.json``) or a dict from :func:`read_labels`."""
    tasks_dir = Path(tasks_dir)
    if labels is None:
        cands = [tasks_dir / "tasks.json", tasks_dir.parent / "tasks.json"]
        labels = next((c for c in cands if c.is_file()), None)
        if labels is None:
            raise RetrievalError(f"{tasks_dir}: no tasks.json here or one folder up; pass the labels file")
    lab = labels if isinstance(labels, dict) else read_labels(labels)
    files = {ds.dataset_name(f): f for f in sorted(tasks_dir.iterdir())
             if f.is_file() and f.suffix in ds.DATA_SUFFIXES and f.name != "tasks.json"}
    keep = [n for n in (names or sorted(files)) if n in lab]
    missing = [n for n in (names or []) if n not in files]
    if missing:
        raise RetrievalError(f"{tasks_dir}: no data file for task(s) {', '.join(missing[:5])}")
    if not keep:
        raise RetrievalError(f"{tasks_dir}: none of its data files is named in the labels")
    tok = tokenizer or shipped_tokenizer()
    profiles = [prof.build_profile(files[n], tok, fields=fields) for n in keep]
    return TaskSet(names=keep, categories=[lab[n][0] for n in keep], sources=[lab[n][1] for n in keep],
                   counts=prof.stack(profiles), paths=[files[n] for n in keep],
                   embed_options=dict(embed_options or {}))


def bank_tasks(bank, labels, *, embed_options: dict | None = None) -> TaskSet:
    """The labelled members of an opened bank (``loramix.bank.Bank`` or its folder), from their
    stored profiles; ``labels`` as in :func:`load_tasks` (members without a label are dropped)."""
    from loramix.bank.bank import Bank

    bank = Bank.coerce(bank)
    lab = labels if isinstance(labels, dict) else read_labels(labels)
    idx = [i for i, n in enumerate(bank.names) if n in lab]
    if not idx:
        raise RetrievalError(f"bank {bank.path}: no member is named in the labels")
    counts = bank.profiles()[idx]
    ts = TaskSet(names=[bank.names[i] for i in idx], categories=[lab[bank.names[i]][0] for i in idx],
                 sources=[lab[bank.names[i]][1] for i in idx], counts=counts,
                 embed_options=dict(embed_options or {}))
    if len(idx) == len(bank.names):
        ts.bank = bank
    return ts


def masks(categories, sources) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(relevant, excluded, queries): ``relevant[q, j]`` same main category; ``excluded[q, j]`` the
    query itself or a member sharing a source; ``queries[q]``: some relevant member is left."""
    cat = np.asarray(categories, dtype=object)
    n = len(cat)
    rel = cat[:, None] == cat[None, :]
    excl = np.eye(n, dtype=bool)
    for i in range(n):
        for j in range(n):
            if sources[i] & sources[j]:
                excl[i, j] = True
    return rel, excl, (rel & ~excl).any(axis=1)


def rank_scores(D: np.ndarray, relevant: np.ndarray, excluded: np.ndarray, q: int) -> tuple[float, float, float]:
    """(P@1, P@5, MRR) of query row ``q`` of the distance matrix ``D``."""
    keep = np.flatnonzero(~excluded[q])
    order = keep[np.argsort(D[q, keep], kind="stable")]
    hit = relevant[q, order]
    return float(hit[0]), float(hit[:5].mean()), float(1.0 / (np.argmax(hit) + 1))


def score(D: np.ndarray, W: np.ndarray | None, categories, sources) -> dict:
    """Scores of one distance matrix (N, N) and its weights (N, N) (rows = queries, excluded
    members at weight 0): ``{"overall": {...}, "categories": {cat: {...}}, "queries": n}``."""
    rel, excl, qok = masks(categories, sources)
    per = []
    for q in np.flatnonzero(qok):
        p1, p5, mrr = rank_scores(D, rel, excl, q)
        r = {"p1": p1, "p5": p5, "mrr": mrr,
             "chance": float(rel[q, ~excl[q]].mean())}
        if W is not None:
            w = W[q]
            r["same_weight"] = float(w[rel[q] & ~excl[q]].sum())
            r["effective"] = float(1.0 / np.sum(w * w))
        per.append((categories[q], r))
    if not per:
        raise RetrievalError("no query has a same-category member from another source: nothing to score")
    keys = per[0][1].keys()

    def mean(rows):
        return {k: float(np.mean([r[k] for r in rows])) for k in keys} | {"n": len(rows)}

    cats = {}
    for c, r in per:
        cats.setdefault(c, []).append(r)
    return {"overall": mean([r for _, r in per]), "categories": {c: mean(v) for c, v in sorted(cats.items())},
            "queries": len(per)}


def distance_matrix(ts: TaskSet, metric: str, **metric_options) -> np.ndarray:
    """All pairs (N, N) of ``metric`` among the tasks."""
    if metric in FEATURE_METRICS:
        return np.asarray(FEATURE_METRICS[metric](ts, **metric_options), dtype=np.float64)
    if metric not in wts.METRICS:
        raise wts.WeightsError(f"unknown metric {metric!r}; known: {', '.join(sorted(wts.METRICS))}")
    fn, kind = wts.METRICS[metric]
    if kind != "histogram":
        raise RetrievalError(f"metric {metric!r} works on {kind} features; retrieval scores it only "
                             f"through loramix.evaluation.retrieval.FEATURE_METRICS")
    return wts.distances(ts.counts, ts.counts, metric, **metric_options)


def _cosine(ts: TaskSet, **_) -> np.ndarray:
    from loramix.weights.cosine import cosine_distances

    E = ts.embeddings()
    return cosine_distances(E, E)


def _instruction(ts: TaskSet, **_) -> np.ndarray:
    from loramix.weights.cosine import cosine_distances

    E = ts.instructions()
    return cosine_distances(E, E)


def _hybrid(ts: TaskSet, **_) -> np.ndarray:
    from loramix.weights.hybrid import hybrid_distances

    return hybrid_distances(distance_matrix(ts, "js"), distance_matrix(ts, "instruction"))


FEATURE_METRICS["cosine"] = _cosine
FEATURE_METRICS["instruction"] = _instruction
FEATURE_METRICS["hybrid"] = _hybrid


def evaluate_retrieval(ts: TaskSet, *, metrics: Sequence[str] | None = None,
                       pipelines: Sequence[str] | None = None, temperature: float | None = None,
                       top_k: int | None = None, systems: Sequence[tuple] | None = None,
                       default_system: bool = False, log: Callable | None = None) -> dict:
    """Score every metric x pipeline on the task set ``ts`` (:func:`load_tasks` / :func:`bank_tasks`).

    ``metrics`` default: every registered histogram metric and ``cosine``; ``pipelines`` default:
    every registered row pipeline (not ``neural``, which needs adapters). ``temperature`` /
    ``top_k``: for every pipeline (default: each pipeline's own default). ``systems``: extra
    ``(label, metric, pipeline, options)`` rows; ``default_system``: add loramix's generate default
    (``normalized-hybrid-T0.25``) when its metric is among ``metrics``. Returns
    ``{"systems": {label: scores}, ...}``.
    """
    if metrics is None:
        metrics = [m for m, (_, kind) in wts.METRICS.items() if kind == "histogram"] + \
                  [m for m in FEATURE_METRICS if m not in wts.METRICS or wts.METRICS[m][1] != "histogram"]
    if pipelines is None:
        pipelines = [p for p in wts.PIPELINES if wts.PIPELINE_INPUT.get(p, "row") == "row"
                     and p not in SKIP_PIPELINES]
    rows = [(f"{p}-{m}", m, p, {}) for m in metrics for p in pipelines] + list(systems or ())
    dp, dm, dt = wts.DEFAULT_PIPELINE, wts.DEFAULT_METRIC, wts.DEFAULT_TEMPERATURE
    if default_system and dm in metrics:
        rows.append((f"{dp}-{dm}-T{dt:g}", dm, dp, {"temperature": dt}))
    _, excl, _ = masks(ts.categories, ts.sources)
    Ds, out = {}, {}
    for label, m, p, opts in rows:
        if m not in Ds:
            if log:
                log(f"retrieval: distances {m}")
            Ds[m] = distance_matrix(ts, m)
        kw = dict(opts)
        if temperature is not None:
            kw.setdefault("temperature", temperature)
        if top_k is not None:
            kw.setdefault("top_k", top_k)
        W = wts.mixing_weights(Ds[m], p, exclude=excl, **kw)
        out[label] = {"metric": m, "pipeline": p, "options": {k: v for k, v in kw.items()},
                      **score(Ds[m], W, ts.categories, ts.sources)}
    first = next(iter(out.values()))
    return {"systems": out, "queries": first["queries"], "tasks": len(ts.names),
            "categories": sorted(set(ts.categories)),
            "protocol": "each task held out in turn; relevant = same main category; the query and "
                        "members sharing a source excluded from rankings and weights"}


def markdown_table(summary: dict, *, per_category: bool = True) -> str:
    """The overall table (one row per system) and, with ``per_category``, P@1 per category."""
    sy = summary["systems"]
    lines = [f"{summary['queries']} queries of {summary['tasks']} tasks (same-source members excluded)", "",
             "| system | P@1 | P@5 | MRR | same-category weight | effective members | chance |",
             "|---|---|---|---|---|---|---|"]
    for label, s in sy.items():
        o = s["overall"]
        lines.append(f"| {label} | {o['p1']:.3f} | {o['p5']:.3f} | {o['mrr']:.3f} | "
                     f"{o.get('same_weight', float('nan')):.3f} | {o.get('effective', float('nan')):.1f} | "
                     f"{o['chance']:.3f} |")
    if per_category:
        metrics = list(dict.fromkeys(s["metric"] for s in sy.values()))
        firsts = {m: next(s for s in sy.values() if s["metric"] == m) for m in metrics}
        cats = list(next(iter(sy.values()))["categories"])
        lines += ["", "P@1 by category (ranking depends on the metric only):", "",
                  "| category | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        for c in cats:
            n = firsts[metrics[0]]["categories"][c]["n"]
            lines.append(f"| {c} | {n} | " + " | ".join(f"{firsts[m]['categories'][c]['p1']:.2f}"
                                                        for m in metrics) + " |")
    return "\n".join(lines)


def write_summary(summary: dict, out) -> Path:
    """Write ``summary.json`` and ``table.md`` into the folder ``out``; returns it."""
    from loramix.core.files import atomic_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("summary.json", json.dumps(summary, indent=1) + "\n"),
                       ("table.md", markdown_table(summary) + "\n")):
        with atomic_path(out / name) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return out
