"""Leave-one-out evaluation over a bank whose members carry a test split
(``loramix eval leave-one-out``), the paper's protocol (arXiv 2507.01806, Table 1).

For every task of the bank (or a chosen subset), its adapter and dataset are held out: every
member trained on that task's data (the task itself and any member with the same dataset hash)
gets weight 0, and an adapter is mixed from the rest for the task's train split. On the task's
test split (the first ``limit`` examples) it is compared with

- ``base``: the base model alone; ``task-lora``: the task's own adapter (the upper bound);
- ``<pipeline>-<metric>``: every registered pipeline × every registered metric (discovered
  from :mod:`loramix.weights` at run time; ``cosine`` comes from :mod:`loramix.profiles.embeddings`),
  ``factors`` mode (the paper's mix);
- ``neural-<metrics>``: the neural combiner, one system per feature set (``neural-js``,
  ``neural-js+cosine``), its combiners trained K-fold over the tasks so that none has seen the
  task it mixes for (:func:`neural_loo_weights`);
- ``<pipeline>-<metric>-<mode>``: the other mix modes (``concat``, ``svd``) for the default
  pipeline and metric;
- ``uniform`` (plain average of every other member) and ``nearest-<metric>`` (the single
  nearest member, weight 1).

How it runs: the base model is loaded once. Per held-out task the weights of every system are
computed together (the member profiles *are* the train-split profiles, so the distance rows
are those :func:`loramix.pipeline.generate` computes for ``train.jsonl`` with
``exclude=[task]``), every system of one mix mode is mixed in one pass over the bank
(:func:`loramix.mixing.local.mix_adapters`, one output per row), all adapters are attached to the
one model under their own names, and every system's predictions come from the same batched
greedy generation with PEFT's mixed-adapter batches (``adapter_names`` per row; ``__base__`` is
the bare model), which gives the same tokens as one adapter at a time at a fraction of the cost.

Outputs in ``out``: ``results.csv`` (one row per task × system: per-task means, appended and
flushed as each task finishes, so an interrupted run resumes where it stopped),
``examples.jsonl`` (per-example scores and predictions), ``weights.json`` (every system's
weights per task), ``run.json`` (the settings; a resume with other settings is refused),
``table.md`` and ``summary.json`` (means over tasks with bootstrap 95 % CIs over tasks, and the
HF-``evaluate``-style bootstrap over pooled examples, labelled as such).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from loramix.core.files import write_json_atomic
from loramix.bank.bank import Bank

from loramix.evaluation.bankpaths import (BankPaths, cache_root, default_bank_root, eval_split, index_in_cache,
                                          resolve_bank, test_split, train_split)
from loramix.evaluation.predict import AdapterSet, generate_mixed, load_base, predict_systems, quiet_hf
from loramix.evaluation.report import markdown_table, summarize_results
from loramix.evaluation.systems import (DEFAULT_METRIC, DEFAULT_PIPELINE, MODES, NEURAL_FOLDS, NEURAL_METRICS,
                                        System, available_metrics, available_pipelines, exclusion_mask,
                                        fold_assignment, fold_members, loo_weights, neural_loo_weights, neural_parts,
                                        plan_systems, weight_stats)

# the building blocks, re-exported: ``loramix.evaluation.loo`` is the one entry point of the run
__all__ = ["System", "BankPaths", "resolve_bank", "plan_systems", "loo_weights", "generate_mixed",
           "leave_one_out", "summarize_results", "markdown_table", "DEFAULT_PIPELINE", "DEFAULT_METRIC",
           "MODES", "NEURAL_FOLDS", "NEURAL_METRICS", "cache_root", "default_bank_root", "eval_split",
           "index_in_cache", "test_split", "train_split", "AdapterSet", "load_base", "predict_systems", "quiet_hf",
           "available_metrics", "available_pipelines", "exclusion_mask", "fold_assignment", "fold_members",
           "neural_loo_weights", "weight_stats"]


# --------------------------------------------------------------------------- the run

RESULT_KEYS = ("split", "limit", "temperature", "top_k", "max_new_tokens", "max_prompt_tokens", "bank_hash",
               "pipeline_options", "neural")


#: What a run writes into its folder besides run.json: a folder holding one of them but no
#: run.json is not a loramix results folder, and its files are not overwritten.
RUN_FILES = ("results.csv", "examples.jsonl", "weights.json", "neural.json", "summary.json", "table.md",
             "adapters")


def _check_run(out: Path, cfg: dict) -> None:
    f = out / "run.json"
    clash = [n for n in RUN_FILES if os.path.lexists(out / n)]
    if clash and not f.is_file():
        raise ValueError(f"{out} holds {', '.join(clash)} but no run.json: not a loramix results folder, "
                         "its files are not overwritten; use another --out folder")
    if f.is_file():
        old = json.loads(f.read_text())
        diff = {k: (old.get(k), cfg.get(k)) for k in RESULT_KEYS if old.get(k) != cfg.get(k)}
        if diff:
            raise ValueError(f"{out} holds results of a run with other settings "
                             f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                             "use another --out folder or remove it")
    write_json_atomic(f, cfg)


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def leave_one_out(bank, out, *, tasks: Sequence[str] | None = None, split: str = "test",
                  limit: int | None = 48, temperatures: Sequence[float] = (),
                  base=None, pipelines: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                  modes: Sequence[str] = MODES, systems: Sequence[str] | None = None,
                  temperature: float = 1.0, top_k: int | None = None, pipeline_options: dict | None = None,
                  max_new_tokens: int = 24, max_prompt_tokens: int = 512, batch_size: int = 512,
                  threads: int | None = None, keep_adapters: bool = False, cache=None,
                  neural_metrics: Sequence[str] | None = NEURAL_METRICS, neural_folds: int = NEURAL_FOLDS,
                  neural_seed: int = 0, neural_hidden: int = 16, protocol: str = "loramix",
                  labels=None, log: Callable[[str], None] | None = None) -> dict:
    """Run the leave-one-out comparison; returns the summary (also written to ``out``).

    ``protocol="paper"``: the held-out task's own distance (and its duplicates') enters the row
    statistics before it is excluded, as the paper's code does (:func:`loramix.weights.mixing_weights`).
    ``labels``: a ``tasks.json`` (name, categories, sources): members sharing a source dataset with
    the held-out task are left out too (their texts would make it trivially close)."""
    from loramix.evaluation import generation as ev
    from loramix.mixing.local import mix_adapters

    log = log or (lambda m: None)
    t0 = time.time()
    bp = resolve_bank(bank, base=base, cache=cache)
    if bp.base is None:
        raise FileNotFoundError("no base model folder found next to the bank; pass --base")
    b = Bank.open(bp.bank)
    with_test = [m.name for m in b.members if eval_split(m.path, split) is not None]
    if tasks:
        missing = [t for t in tasks if t not in b.names]
        if missing:
            raise ValueError(f"no such task(s) in the bank: {', '.join(missing)}")
        no_test = [t for t in tasks if t not in with_test]
        if no_test:
            raise ValueError(f"task(s) without a {split} split: {', '.join(no_test)}")
        tasks = list(tasks)
    else:
        tasks = with_test
    if not tasks:
        raise ValueError(f"bank {bp.members}: no member has a {split} split ({split}.jsonl ...)")
    plan = plan_systems(pipelines, metrics, modes, temperatures=temperatures, neural_metrics=neural_metrics)
    if systems:
        unknown = set(systems) - {s.name for s in plan}
        if unknown:
            raise ValueError(f"unknown system(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(s.name for s in plan)}")
        plan = [s for s in plan if s.name in systems or s.kind in ("base", "task")]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"bank": str(bp.members), "index": str(bp.bank), "base": str(bp.base), "bank_hash": b.hash,
           "split": split, "limit": limit, "temperature": temperature, "top_k": top_k,
           "max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens,
           "pipeline_options": pipeline_options or None,
           "tasks": tasks, "systems": [asdict(s) for s in plan]}
    if protocol != "loramix":   # only then: runs of the default protocol stay resumable
        cfg["protocol"] = protocol
    sources = None
    if labels is not None:
        from loramix.evaluation.retrieval import read_labels

        sources = {n: sorted(src) for n, (_, src) in read_labels(labels).items() if n in b.names}
        cfg["same_source_excluded"] = sources
        sources = {n: frozenset(v) for n, v in sources.items()}
    families = {t: v.get("family") for t, v in (bp.manifest or {}).get("tasks", {}).items()} or None
    neural_sys = [s for s in plan if s.kind == "neural"]
    if neural_sys:
        from loramix.weights.neural import feature_names_for

        fold_of = fold_assignment(tasks, neural_folds, seed=neural_seed, families=families)
        cfg["neural"] = {"folds": max(fold_of.values()) + 1, "seed": neural_seed, "hidden": neural_hidden,
                         "space": "factors", "stratified_by_family": bool(families),
                         "features": {s.name: feature_names_for(neural_parts(s.metric)) for s in neural_sys},
                         "fold_of": fold_of}
    _check_run(out, cfg)

    W, _, errors = loo_weights(b, tasks, plan, temperature=temperature, top_k=top_k,
                               pipeline_options=pipeline_options, protocol=protocol, sources=sources)
    if neural_sys:
        NW, nerr, ninfo = neural_loo_weights(b, tasks, neural_sys, folds=neural_folds, seed=neural_seed,
                                             hidden=neural_hidden, families=families, threads=threads,
                                             sources=sources, log=log)
        W.update(NW)
        errors.update(nerr)
        ndoc = {k: v for k, v in ninfo.items() if k != "systems"}
        ndoc["systems"] = {n: {k: v for k, v in d.items() if k != "combiners"} for n, d in ninfo["systems"].items()}
        (out / "neural.json").write_text(json.dumps(ndoc, indent=1) + "\n")
    for name, err in errors.items():
        log(f"skipping system {name}: {err}")
    plan = [s for s in plan if s.name not in errors]
    wdoc = {s: {t: [float(x) for x in w] for t, w in per.items()} for s, per in W.items()}
    (out / "weights.json").write_text(json.dumps({"members": b.names, "families": families,
                                                  "weights": wdoc}) + "\n")

    table = ev.ResultsTable(out / "results.csv")
    ex_file = out / "examples.jsonl"
    aset = tok = None
    adapters_root = out / "adapters" if keep_adapters else Path(tempfile.mkdtemp(prefix="loramix-loo-"))
    try:
        for k, task in enumerate(tasks, 1):
            todo = [s for s in plan if not table.done(task, s.name)]
            if not todo:
                continue
            tt = time.time()
            examples = ev.load_examples(eval_split(b.members[b.index(task)].path, split), limit=limit)
            adapters = {}
            tdir = adapters_root / task
            for mode in MODES:
                group = [s for s in todo if s.mixed and s.mode == mode]
                if group:
                    outs = [tdir / s.name for s in group]
                    mix_adapters(b, np.stack([W[s.name][task] for s in group]), outs, mode=mode,
                                 overwrite=True, provenance=[{"pipeline": s.pipeline, "metric": s.metric,
                                                              "temperature": s.temperature or temperature,
                                                              "top_k": top_k,
                                                              "dataset": task, "exclude": [task]}
                                                             for s in group])
                    adapters.update({s.name: o for s, o in zip(group, outs)})
            if any(s.kind == "task" for s in todo):
                adapters["task-lora"] = b.members[b.index(task)].path
            if aset is None:
                model, tok = load_base(bp.base, threads=threads)
                aset = AdapterSet(model)
            preds = aset.predict(tok, examples, adapters, with_base=any(s.kind == "base" for s in todo),
                                 max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                                 batch_size=batch_size)
            refs = [e["output"] for e in examples]
            lines, scores = [], {}
            for s in todo:
                sc = ev.score(preds[s.name], refs)
                scores[s.name] = sc
                lines.append({"task": task, "system": s.name,
                              **{m: [float(x) for x in v] for m, v in sc.items()},
                              "predictions": preds[s.name]})
            _append_jsonl(ex_file, lines)   # first the examples, then the row that marks them done
            for s in todo:
                table.add(task, s.name, scores[s.name])
            if not keep_adapters:
                shutil.rmtree(tdir, ignore_errors=True)
            show = [n for n in ("base", f"{DEFAULT_PIPELINE}-{DEFAULT_METRIC}", "task-lora") if n in scores]
            log(f"[{k}/{len(tasks)}] {task}: {len(todo)} systems x {len(examples)} examples in "
                f"{time.time() - tt:.1f}s; Rouge-L " + ", ".join(f"{n} {scores[n]['rougeL'].mean():.3f}"
                                                                 for n in show))
    finally:
        if not keep_adapters:
            shutil.rmtree(adapters_root, ignore_errors=True)
    summary = summarize_results(out, tasks=tasks, systems=[s.name for s in plan])
    summary["skipped_systems"] = errors
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
