"""Generate a LoRA adapter for a new dataset from a bank: profile → distances → weights → mix.

:func:`generate` is the API behind ``loramix generate``. Several datasets are mixed in one pass
over the bank. Outputs are PEFT adapter folders written atomically: everything goes to a
temporary folder next to the output, which is renamed into place; an existing output is
refused unless ``overwrite=True``, and then swapped, never half-overwritten.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import datasets as ds
from . import mix as mixmod
from . import peft_io
from . import profile as prof
from . import weights as wts
from .bank import Bank

PROVENANCE_NAME = "loramix.json"


class OutputError(ValueError):
    pass


@dataclass
class GenerateResult:
    """One generated adapter: where it is, and how it was mixed."""

    out: Path
    members: list[str]
    weights: np.ndarray
    distances: np.ndarray | None = None
    pipeline: str | None = None
    metric: str | None = None
    mode: str = "factors"
    dataset: str | None = None
    ranks: dict = field(default_factory=dict)

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        order = np.argsort(-self.weights, kind="stable")[:k]
        return [(self.members[i], float(self.weights[i])) for i in order if self.weights[i] != 0]

    def to_dict(self) -> dict:
        return {
            "out": str(self.out), "dataset": self.dataset, "pipeline": self.pipeline,
            "metric": self.metric, "mode": self.mode,
            "weights": {m: float(w) for m, w in zip(self.members, self.weights)},
            "distances": None if self.distances is None else
            {m: float(d) for m, d in zip(self.members, self.distances)},
            "top": [[m, w] for m, w in self.top(10)],
            "rank": max(self.ranks.values()) if self.ranks else None,
        }


def _version() -> str:
    try:
        from . import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def _as_bank(bank) -> Bank:
    return bank if isinstance(bank, Bank) else Bank.open(bank)


def check_output(out, bank: Bank, overwrite: bool) -> Path:
    out = Path(os.path.abspath(out))
    if bank.contains(out):
        raise OutputError(f"output {out} is inside the bank {bank.path}; choose a folder outside it")
    if os.path.abspath(bank.path).startswith(str(out) + os.sep):
        raise OutputError(f"output {out} contains the bank {bank.path}")
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    return out


def _stage(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    return rc == 0


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place. An existing output is swapped with it in one
    atomic step where the OS allows (then the old one, now at ``tmp``, is removed); elsewhere
    the old output is moved aside first and removed last."""
    if out.exists() and _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def mix_adapters(bank, weights, outs: Sequence, *, mode: str = "factors", rank: int | None = None,
                 dtype: str | None = None, overwrite: bool = False, provenance: Sequence[dict] | None = None,
                 progress: bool = False) -> list[GenerateResult]:
    """Mix ``bank`` with explicit ``weights`` (Q, N), or a dict name → weight for one output,
    into PEFT adapter folders ``outs`` (one per row). The lower layer of :func:`generate`."""
    bank = _as_bank(bank)
    if isinstance(weights, dict):
        w = np.zeros(len(bank.members))
        for name, v in weights.items():
            w[bank.index(name)] = v
        weights = w
    W = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if isinstance(outs, (str, os.PathLike)):
        outs = [outs]
    if W.shape != (len(outs), len(bank.members)):
        raise wts.WeightsError(f"weights have shape {W.shape}, expected ({len(outs)}, {len(bank.members)})")
    wts.check_weights(W)
    outs = [check_output(o, bank, overwrite) for o in outs]
    if len(set(outs)) != len(outs):
        raise OutputError("two outputs share one path")
    dtype_name = mixmod.normalize_dtype(dtype, bank.dtype)
    mixmod.plan(bank, W, mode, rank)   # fail on a bad mode/rank before anything is created
    stages = []
    try:
        stages = [_stage(o) for o in outs]
        md = {"loramix_version": _version(), "loramix_mode": mode, "loramix_bank_hash": bank.hash}
        infos = mixmod.mix_to_files(bank, W, [s / peft_io.WEIGHTS_NAME for s in stages], mode,
                                    rank=rank, dtype=dtype_name, metadata=md, progress=progress)
        results = []
        for q, (stage, out, info) in enumerate(zip(stages, outs, infos)):
            used = [bank.members[i].spec for i in info.members]
            used_with_modules = [s for s in used if any(m in info.ranks for m in s.modules)]
            tm = peft_io.target_modules_for(list(info.ranks), used_with_modules)
            task = used[0].raw_config.get("task_type", "CAUSAL_LM") if used else "CAUSAL_LM"
            cfg = peft_io.output_config(bank.base_model, info.ranks, tm, task_type=task)
            (stage / peft_io.CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
            extra = dict((provenance or [{}] * len(outs))[q] or {})
            res = GenerateResult(out=out, members=bank.names, weights=W[q], mode=mode,
                                 ranks=info.ranks, pipeline=extra.get("pipeline"),
                                 metric=extra.get("metric"), dataset=extra.get("dataset"),
                                 distances=extra.get("distances"))
            prov = _provenance(res, bank, dtype_name, extra)
            (stage / PROVENANCE_NAME).write_text(json.dumps(prov, indent=1) + "\n")
            (stage / "README.md").write_text(_card(prov))
            results.append(res)
        for stage, out in zip(stages, outs):
            _swap_in(stage, out)
            stages = [s for s in stages if s != stage]
        return results
    finally:
        for s in stages:
            shutil.rmtree(s, ignore_errors=True)


def _provenance(res: GenerateResult, bank: Bank, dtype: str, extra: dict) -> dict:
    d = res.to_dict()
    d.pop("out")
    d.update({
        "loramix_version": _version(), "dtype": dtype, "bank": str(bank.path),
        "bank_hash": bank.hash, "base_model": bank.base_model,
        "temperature": extra.get("temperature"), "top_k": extra.get("top_k"),
        "exclude": extra.get("exclude"), "ranks": sorted(set(res.ranks.values())),
    })
    return d


def _card(p: dict) -> str:
    rows = "\n".join(f"| {i} | {m} | {w:.6f} |" for i, (m, w) in enumerate(p["top"], 1))
    what = {"factors": "A and B mixed separately with the same weights (the paper's mix)",
            "concat": "exact weighted sum of the members' updates (rank = sum of ranks)",
            "svd": "best low-rank approximation of the exact weighted sum"}.get(p["mode"], p["mode"])
    return f"""---
library_name: peft
base_model: {p.get('base_model')}
tags:
- lora
- loramix
---

# LoRA adapter generated by loramix

Mixed from a bank of LoRA adapters without gradient training (arXiv 2507.01806).

- dataset: `{p.get('dataset')}`
- pipeline: `{p.get('pipeline')}`, metric: `{p.get('metric')}`, temperature: {p.get('temperature')}, top-k: {p.get('top_k')}
- mode: `{p['mode']}` — {what}
- rank(s): {p.get('ranks')}, dtype: {p.get('dtype')}
- bank: `{p.get('bank')}` (hash `{p.get('bank_hash')}`)
- loramix version: {p.get('loramix_version')}

## Top contributors

| # | member | weight |
|---|---|---|
{rows}

All weights are in `{PROVENANCE_NAME}`.
"""


def _profile_query(d, bank: Bank, fields, split, progress, cache) -> prof.Profile:
    if isinstance(d, prof.Profile):
        d.check_tokenizer(bank.tokenizer_hash, d.source or "given profile")
        return d
    path = Path(d)
    if path.suffix == ".npz":
        p = prof.Profile.load(path)
        p.check_tokenizer(bank.tokenizer_hash, str(path))
        return p
    c = None   # no profile is written next to the user's data unless a cache folder is given
    if cache:
        c = Path(cache) / f"{ds.dataset_name(path)}.{prof.tokenizer_hash(bank.tokenizer_path)[:12]}.npz"
    return prof.profile_dataset(path, bank.tokenizer_path, cache=c, fields=fields, split=split,
                                progress=progress)


def _dataset_hash(item, query, fields, split) -> str:
    if query is not None:
        return query.dataset_hash
    if isinstance(item, prof.Profile):
        return item.dataset_hash
    if Path(item).suffix == ".npz":
        return prof.Profile.load(item).dataset_hash
    return ds.content_hash(item, split, fields)


def generate(dataset, bank, out, pipeline: str = "normalized", metric: str = "js",
             mode: str = "factors", top_k: int | None = None, temperature: float = 1.0,
             dtype: str | None = None, *, rank: int | None = None, exclude: Sequence = (),
             leave_one_out: bool = False, fields: Sequence[str] | None = None, split: str = "train",
             overwrite: bool = False,
             profile_cache=None, progress: bool = False, pipeline_options: dict | None = None):
    """Generate adapter(s) for ``dataset`` from ``bank`` into ``out``.

    ``dataset``: a path (file/folder, or a saved profile ``.npz``), a :class:`Profile`, or a list
    of them; with a list, ``out`` is a folder that receives one adapter per dataset (named after
    it) and all are mixed in one pass over the bank. ``exclude``: member names left out, for
    every dataset, or one list of names per dataset. ``leave_one_out``: also leave out every
    member trained on the very same data (same dataset content hash, as recorded in bank.json),
    as the paper does when it evaluates on the bank's own tasks.
    Returns a :class:`GenerateResult` (a list for a list of datasets).
    """
    bank = _as_bank(bank)
    many = isinstance(dataset, (list, tuple))
    items = list(dataset) if many else [dataset]
    if not items:
        raise ValueError("no datasets given")
    out = Path(out)
    if many:
        names = [it.source and ds.dataset_name(it.source) if isinstance(it, prof.Profile)
                 else ds.dataset_name(it) for it in items]
        names = [n or f"dataset{i}" for i, n in enumerate(names)]
        if len(set(names)) != len(names):
            names = [f"{i:03d}-{n}" for i, n in enumerate(names)]
        outs = [out / n for n in names]
    else:
        outs = [out]
    for o in outs:   # refuse early: before any tokenizing
        check_output(o, bank, overwrite)
    fields = tuple(fields) if fields else bank.fields
    if metric not in wts.METRICS:
        raise wts.WeightsError(f"unknown metric {metric!r}; known: {', '.join(sorted(wts.METRICS))}")
    if pipeline not in wts.PIPELINES:
        raise wts.WeightsError(f"unknown pipeline {pipeline!r}; known: {', '.join(sorted(wts.PIPELINES))}")
    queries = None
    if metric in wts.METRICS and wts.METRICS[metric][1] != "histogram":
        # a metric on other features (e.g. sentence embeddings): it gets the datasets and the bank
        fn = wts.METRICS[metric][0]
        D = np.atleast_2d(np.asarray(fn(items, bank, fields=fields, split=split), dtype=np.float64))
    else:
        queries = [_profile_query(d, bank, fields, split, progress, profile_cache) for d in items]
        v = max([bank.vocab_size] + [q.vocab_size for q in queries])
        qm = prof.stack(queries, v)
        bm = bank.profiles()
        if bm.shape[1] != v:
            import scipy.sparse as sp
            bm = sp.csr_array((bm.data, bm.indices, bm.indptr), shape=(bm.shape[0], v))
        D = wts.distances(qm, bm, metric)
    per_dataset = bool(exclude) and all(isinstance(e, (list, tuple)) for e in exclude)
    if per_dataset and len(exclude) != len(items):
        raise ValueError(f"{len(exclude)} exclude lists for {len(items)} datasets")
    names_q = [list(exclude[q]) if per_dataset else list(exclude or ()) for q in range(len(items))]
    excl = np.zeros((len(items), len(bank.members)), bool)
    for q, names in enumerate(names_q):
        for name in names:
            excl[q, bank.index(name)] = True
    if leave_one_out:
        member_hashes = np.array([m.info.get("dataset_hash", "") for m in bank.members])
        for q, item in enumerate(items):
            h = _dataset_hash(item, queries[q] if queries else None, fields, split)
            hit = np.flatnonzero(member_hashes == h) if h else []
            excl[q, hit] = True
            names_q[q] += [bank.names[i] for i in hit if bank.names[i] not in names_q[q]]
    W = wts.mixing_weights(D, pipeline, temperature=temperature, top_k=top_k, exclude=excl,
                           **(pipeline_options or {}))
    if many:
        out.mkdir(parents=True, exist_ok=True)
    prov = [{"pipeline": pipeline, "metric": metric, "temperature": temperature, "top_k": top_k,
             "exclude": names_q[q], "distances": D[q],
             "dataset": str(items[q].source if isinstance(items[q], prof.Profile) else items[q])}
            for q in range(len(items))]
    results = mix_adapters(bank, W, outs, mode=mode, rank=rank, dtype=dtype, overwrite=overwrite,
                           provenance=prov, progress=progress)
    return results if many else results[0]
