"""Evaluation primitives: greedy generation with transformers + peft on CPU, per-example scores,
per-task means, bootstrap confidence intervals, resumable result tables.

Scores per example (against every reference; the best one counts):
- ``rougeL``: Rouge-L F exactly as ``rouge_score`` (``loramix.evaluation.rouge``), max over references as in
  ``RougeScorer.score_multi``;
- ``exact``: normalized prediction equals a normalized reference;
- ``subseq``: a normalized reference occurs in the normalized prediction (on word boundaries).
Normalization: lowercase, every character outside ``[a-z0-9]`` a space, whitespace collapsed.

Aggregates:
- ``bootstrap_ci(values)``: mean and percentile CI from resampling the values (seeded). Applied to
  per-task means it is the project's headline interval ("mean over tasks, 95 % CI over tasks").
- ``evaluate_style_ci(per_example)``: what HF ``evaluate``'s ``strategy="bootstrap"`` reports:
  ``scipy.stats.bootstrap`` (BCa, 9,999 resamples, 0.95) over *examples* pooled across tasks,
  statistic = the mean. It ignores that examples cluster by task, so it is narrower; labelled so.

Needs torch, transformers and peft (the ``eval`` extra).
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from loramix.evaluation.rouge import rouge_l_multi

__all__ = ["load_base", "load_examples", "generate", "score", "evaluate_adapter", "bootstrap_ci",
           "evaluate_style_ci", "summarize", "ResultsTable", "normalize"]

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def normalize(text: str) -> str:
    return " ".join(_NON_ALNUM.sub(" ", text.lower()).split())


def _base_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / "base" if (p / "base" / "config.json").exists() else p


def load_base(model_dir: str | os.PathLike, *, threads: int | None = None):
    """``(model, tokenizer)``: a causal LM in float32, eval mode, and its tokenizer set to left
    padding. ``model_dir`` is a model folder or a mini-bank folder (its ``base/`` is used)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    d = _base_dir(model_dir)
    tok = AutoTokenizer.from_pretrained(d)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    return model, tok


def load_examples(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Lots-of-LoRAs jsonl: ``{"input": str, "output": [str, ...]}`` per line (a bare string
    output counts as one reference)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                r = json.loads(line)
                out = r["output"]
                rows.append({"input": r["input"], "output": [out] if isinstance(out, str) else list(out)})
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def _encode_prompts(tok, prompts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids per prompt, cut to ``max_prompt_tokens`` by tokens: the *end* of the prompt is kept
    (the question and the answer cue sit there) and the BOS token, if the tokenizer adds one,
    stays first."""
    out = []
    bos = tok.bos_token_id
    for p in prompts:
        ids = tok(p, add_special_tokens=True)["input_ids"]
        if len(ids) > max_prompt_tokens:
            head = [bos] if bos is not None and ids and ids[0] == bos else []
            ids = head + ids[len(ids) - (max_prompt_tokens - len(head)):]
        out.append(ids)
    return out


def generate(model, tok, prompts: Sequence[str], *, max_new_tokens: int = 32,
             max_prompt_tokens: int = 512, batch_size: int = 32,
             adapter_names: Sequence[str] | None = None) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped, stripped), batched with left
    padding; batches are formed from prompts sorted by length to waste little padding.

    ``adapter_names`` (one per prompt, ``"__base__"`` for the bare model) routes each row of a
    batch through its own adapter of a PeftModel, so several systems share one decoding loop."""
    import torch

    enc = _encode_prompts(tok, prompts, max_prompt_tokens)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    res: list[str] = [""] * len(enc)
    pad = tok.pad_token_id
    eos = tok.eos_token_id
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        L = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), L), pad, dtype=torch.long)
        att = torch.zeros((len(idx), L), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, L - len(enc[i]):] = torch.tensor(enc[i])
            att[r, L - len(enc[i]):] = 1
        kw = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in idx]}
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos, **kw)
        for r, i in enumerate(idx):
            res[i] = tok.decode(gen[r, L:], skip_special_tokens=True).strip()
    return res


def score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """Per-example ``rougeL`` (F), ``exact`` and ``subseq`` (0/1 floats)."""
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    f = rouge_l_multi(predictions, refs)[2]
    exact = np.zeros(len(refs))
    sub = np.zeros(len(refs))
    for k, (p, rs) in enumerate(zip(predictions, refs)):
        np_ = normalize(p)
        nrs = [normalize(r) for r in rs]
        exact[k] = float(any(np_ == r for r in nrs))
        sub[k] = float(any(r and f" {r} " in f" {np_} " for r in nrs))
    return {"rougeL": f, "exact": exact, "subseq": sub}


def evaluate_adapter(model_dir, adapter_dir, examples: Sequence[dict], *, model=None, tokenizer=None,
                     max_new_tokens: int = 32, max_prompt_tokens: int = 512, batch_size: int = 32,
                     threads: int | None = None) -> dict:
    """Generate for ``examples`` with the base model (``adapter_dir=None``) or base + a PEFT
    adapter, and score. Pass ``model``/``tokenizer`` from ``load_base`` to reuse them across calls
    (the adapter is attached and removed again; the model is left as it was).
    Returns ``{"predictions": [...], "rougeL": arr, "exact": arr, "subseq": arr}``."""
    if model is None or tokenizer is None:
        model, tokenizer = load_base(model_dir, threads=threads)
    prompts = [e["input"] for e in examples]
    refs = [e["output"] for e in examples]
    if adapter_dir is None:
        preds = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                         max_prompt_tokens=max_prompt_tokens, batch_size=batch_size)
    else:
        from peft import PeftModel

        pm = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        try:
            preds = generate(pm, tokenizer, prompts, max_new_tokens=max_new_tokens,
                             max_prompt_tokens=max_prompt_tokens, batch_size=batch_size)
        finally:
            pm.unload()  # LoRA layers out again: `model` is the plain base once more
    return {"predictions": preds, **score(preds, refs)}


def bootstrap_ci(values: Iterable[float], *, n_resamples: int = 10_000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: percentile bootstrap of the mean (resampling the given values with
    replacement; numpy ``default_rng(seed)``). One value gives a zero-width interval; none: NaNs."""
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for s in range(0, n_resamples, 1000):  # chunks bound memory for long inputs
        n = min(1000, n_resamples - s)
        means[s:s + n] = v[rng.integers(0, v.size, size=(n, v.size))].mean(axis=1)
    a = (1 - confidence) / 2
    lo, hi = np.percentile(means, [100 * a, 100 * (1 - a)])
    return float(v.mean()), float(lo), float(hi)


def evaluate_style_ci(per_example: Iterable[float], *, n_resamples: int = 9999,
                      confidence: float = 0.95, seed: int | None = 0) -> tuple[float, float, float]:
    """``(mean, low, high)`` the way HF ``evaluate`` reports ``strategy="bootstrap"``:
    ``scipy.stats.bootstrap`` with its defaults (BCa) over the examples, statistic the mean."""
    from scipy import stats

    v = np.asarray(list(per_example), np.float64)
    if v.size < 2 or np.all(v == v[0]):
        m = float(v.mean()) if v.size else float("nan")
        return m, m, m
    bs = stats.bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                         method="BCa", vectorized=True, rng=np.random.default_rng(seed))
    return float(v.mean()), float(bs.confidence_interval.low), float(bs.confidence_interval.high)


def summarize(per_task: dict[str, dict[str, np.ndarray]], metric: str = "rougeL", *,
              seed: int = 0) -> dict:
    """From ``{task: per-example scores}``: per-task means, the mean over tasks with a bootstrap
    CI over tasks, and the ``evaluate``-style CI over pooled examples."""
    means = {t: float(np.mean(s[metric])) for t, s in per_task.items()}
    m, lo, hi = bootstrap_ci(list(means.values()), seed=seed)
    pooled = np.concatenate([np.asarray(s[metric], np.float64) for s in per_task.values()]) if per_task else []
    em, elo, ehi = evaluate_style_ci(pooled, seed=seed)
    return {"metric": metric, "per_task": means, "tasks": len(means),
            "mean_over_tasks": m, "ci95_over_tasks": [lo, hi],
            "evaluate_style": {"mean_over_examples": em, "ci95": [elo, ehi],
                               "method": "scipy.stats.bootstrap BCa over pooled examples (HF evaluate)"}}


class ResultsTable:
    """A resumable CSV of per-(task, system) results: one row per finished pair, appended and
    flushed as soon as it is done, so an interrupted run loses at most the pair in progress.
    Columns: task, system, n, rougeL, exact, subseq, plus any extra keys given to ``add``."""

    FIELDS = ["task", "system", "n", "rougeL", "exact", "subseq"]

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: dict[tuple[str, str], dict] = {}
        if self.path.exists():
            with open(self.path, newline="") as fh:
                for r in csv.DictReader(fh):
                    r = dict(r)
                    r["n"] = int(r["n"])
                    for k in ("rougeL", "exact", "subseq"):
                        r[k] = float(r[k])
                    self.rows[(r["task"], r["system"])] = r

    def done(self, task: str, system: str) -> bool:
        return (task, system) in self.rows

    def add(self, task: str, system: str, scores: dict) -> dict:
        row = {"task": task, "system": system, "n": len(scores["rougeL"]),
               **{k: float(np.mean(scores[k])) for k in ("rougeL", "exact", "subseq")}}
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)
            fh.flush()
            os.fsync(fh.fileno())
        self.rows[(task, system)] = row
        return row

    def get(self, task: str, system: str) -> dict | None:
        return self.rows.get((task, system))
