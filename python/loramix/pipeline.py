"""Generate a LoRA adapter for a new dataset from a bank: profile → distances → weights → mix.

:func:`generate` is the API behind ``loramix generate`` and only orchestrates the stages, each
in its own package: :mod:`loramix.profiles` (token profiles), :mod:`loramix.weights` (metrics and
pipelines), :mod:`loramix.mixing` (modes, output folders, Dask). Several datasets are mixed in
one pass over the bank.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from loramix.core import default_threads
from loramix.core.divergence import METRICS as CORE_METRICS
from loramix.core.files import missing_dirs, remove_empty_dirs
from loramix.data import readers as ds
from loramix.profiles import tokens as prof
from loramix import weights as wts
from loramix.bank import integrity
from loramix.bank.bank import Bank, BankError
from loramix.mixing.local import mix_adapters
from loramix.mixing.modes import check_rank
from loramix.mixing.output import GenerateResult, OutputError, check_output
from loramix.bank.baseref import resolve_base_model
from loramix.mixing.output import output_names, resumable

__all__ = ["generate", "GenerateResult", "OutputError", "mix_adapters"]

def _recipe(items, bank, pipeline, mode, top_k, temperature, dtype, rank, fields, split, base, exclude,
            asked) -> dict | None:
    """What ``loramix generate --from OUT/loramix.json`` needs to make the batch again: the
    arguments of this call, with every path absolute and the final exclusions per dataset (the
    leave-one-out ones included). None when a dataset was an in-memory profile, or an option an
    object that cannot be written down."""
    import os

    datasets = []
    for it in items:
        src = it.source if isinstance(it, prof.Profile) else it
        if isinstance(it, prof.Profile) or not src:
            return None
        datasets.append(os.path.abspath(src))
    opts = {}
    for k in ("metric_options", "pipeline_options"):
        d = asked[k]
        if not all(isinstance(v, (str, int, float, bool, type(None), os.PathLike)) for v in d.values()):
            return None
        opts[k] = {kk: (os.fspath(v) if isinstance(v, os.PathLike) else v) for kk, v in d.items()}
    for k in ("encoder", "combiner"):   # folders and files: absolute, to replay from anywhere
        for d in opts.values():
            if isinstance(d.get(k), str) and os.path.exists(d[k]):
                d[k] = os.path.abspath(d[k])
    return {"datasets": datasets, "bank": os.path.abspath(bank.path), "bank_hash": bank.hash,
            "pipeline": pipeline, "metric": asked["metric"], "mode": mode, "top_k": top_k,
            "temperature": temperature, "dtype": dtype, "rank": rank, "fields": list(fields), "split": split,
            "exclude": [list(e) for e in exclude], "base_model": base, **opts}


def _takes(fn, name: str) -> bool:
    """Whether a registered metric accepts keyword ``name`` (older ones may not take ``progress``)."""
    import inspect

    try:
        ps = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in ps or any(p.kind is p.VAR_KEYWORD for p in ps.values())


def _query_profiles(items, bank, **kw) -> list:
    """The token profiles of the datasets, several at once in threads (the tokenizer releases
    the GIL; reading and counting one dataset overlaps another's encoding): as many threads as
    ``LORAMIX_NUM_THREADS`` or cores. Results and errors come in the datasets' order."""
    n = min(len(items), default_threads())
    if n < 2:
        return [prof.query_profile(d, bank, **kw) for d in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=n) as ex:
        return list(ex.map(lambda d: prof.query_profile(d, bank, **kw), items))


class _Ahead:
    """Work the call needs later, done in a background thread while the datasets are profiled and
    the weights computed (the tokenizer and the core release the GIL): ``tasks``, callables run in
    order (see :func:`_ahead_tasks`). The first that fails ends the thread: whoever needs its result
    does it again and reports the error. :meth:`stop`: no task starts after it returns (a task done
    twice is harmless: the same result, one kept)."""

    def __init__(self, tasks):
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(tasks,), name="loramix-ahead", daemon=True)
        self._thread.start()

    def _run(self, tasks) -> None:
        for task in tasks:
            if self._stop.is_set():
                return
            try:
                task()
            except Exception:  # noqa: BLE001 - done again, and reported, where it is needed
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _ahead_tasks(bank, metrics, top_k):
    """What :class:`_Ahead` does for ``generate``: the loramix version (written into the outputs;
    ``importlib.metadata``, ~15 ms), the bank's stored js index (~8 ms), and, without ``top_k``
    (every member is mixed), each member's weight file opened (``Member.file``: mapped, header
    validated; ~0.3-0.5 ms a member, paid in the mix's first module otherwise)."""
    from loramix.core.divergence import EPS
    from loramix.version import version

    tasks = [version]
    if "js" in metrics:
        tasks.append(lambda: bank.prepared("js", EPS))
    if top_k is None:
        tasks += [lambda m=m: m.file for m in bank.members]
    return tasks


def _dataset_hash(item, query, fields, split) -> str:
    if query is not None:
        return query.dataset_hash
    if isinstance(item, prof.Profile):
        return item.dataset_hash
    if Path(item).suffix == ".npz":
        return prof.Profile.load(item).dataset_hash
    return ds.content_hash(item, split, fields)


def _weights(items, bank, metrics, mopts, popts, pipeline, temperature, top_k, exclude, leave_one_out, fields,
             split, profile_cache, progress, protocol):
    """Profiles (or other features), distances and mixing weights of the datasets: ``(W, D,
    names_q)``, ``D`` the first metric's distances, ``names_q`` the final exclusions per dataset."""
    queries = None
    Ds = {}
    for m in metrics:
        if m not in wts.METRICS:
            raise wts.WeightsError(f"unknown metric {m!r}; known: {', '.join(sorted(wts.METRICS))}")
        if wts.METRICS[m][1] != "histogram":
            # a metric on other features (e.g. sentence embeddings): it gets the datasets and the bank
            fn = wts.METRICS[m][0]
            prog = {"progress": progress} if _takes(fn, "progress") else {}
            Ds[m] = np.atleast_2d(np.asarray(fn(items, bank, fields=fields, split=split, cache=profile_cache,
                                                **prog, **mopts), dtype=np.float64))
            continue
        if queries is None:
            queries = _query_profiles(items, bank, fields=fields, split=split, cache=profile_cache,
                                      progress=progress)
            # the compiled metrics take the core's CSR: no scipy import on their path
            qm, bm = prof.stack_against(queries, bank, core=all(x in CORE_METRICS for x in metrics))
        Ds[m] = wts.bank_distances(qm, bank, bm, m)
    D = Ds[metrics[0]]
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
    W = wts.mixing_weights(Ds if len(Ds) > 1 or wts.PIPELINE_INPUT.get(pipeline) == "matrices" else D,
                           pipeline, temperature=temperature, top_k=top_k, exclude=excl, protocol=protocol, **popts)
    return W, D, names_q


def generate(dataset, bank, out, pipeline: str = wts.DEFAULT_PIPELINE, metric: str = wts.DEFAULT_METRIC,
             mode: str = "factors", top_k: int | None = None, temperature: float = wts.DEFAULT_TEMPERATURE,
             dtype: str | None = None, *, rank: int | None = None, exclude: Sequence = (),
             leave_one_out: bool = False, fields: Sequence[str] | None = None, split: str = "train",
             overwrite: bool = False,
             profile_cache=None, progress: bool = False, pipeline_options: dict | None = None,
             metric_options: dict | None = None, scheduler=None, client=None, distributed_options: dict | None = None,
             verify: bool = False, base_model: str | None = None, protocol: str = "loramix"):
    """Generate adapter(s) for ``dataset`` from ``bank`` into ``out``.

    Defaults: the ``normalized`` pipeline on the ``hybrid`` metric (js on token histograms +
    cosine of the datasets' instruction embeddings) at temperature 0.25; the paper's pipeline is
    ``pipeline="normalized", metric="js", temperature=1.0`` (:data:`loramix.weights.PAPER_DEFAULTS`).

    ``dataset``: a path (file/folder, or a saved profile ``.npz``), a :class:`Profile`, or a list
    of them; with a list, ``out`` is a folder that receives one adapter per dataset (named after
    it) and all are mixed in one pass over the bank. ``exclude``: member names left out (one
    name as a string, or a list), for every dataset, or one list of names per dataset.
    ``leave_one_out``: also leave out every member trained on the very same data (same dataset
    content hash, as recorded in bank.json), as the paper does when it evaluates on the bank's
    own tasks. ``rank``: mode ``svd`` only (refused with ``factors``/``concat``; a warning when
    more than the exact mix holds).
    Returns a :class:`GenerateResult` (a list for a list of datasets).
    ``scheduler`` (``"tcp://host:port"``) or ``client`` (a ``dask.distributed.Client``): mix
    the batch on that Dask cluster (:mod:`loramix.mixing.distributed`; ``distributed_options`` go to
    :func:`loramix.mixing.distributed.mix_adapters`); the result is identical to a local run.
    ``metric="cosine"``: 1 − cosine of dataset sentence embeddings (ONNX Runtime);
    ``metric_options`` go to an embedding metric (``encoder`` folder, ``quantize``, ``cap``,
    ``seed``, ``threads``). ``pipeline="neural"``: the bank's trained combiner
    (``pipeline_options={"combiner": path_or_object}``, default ``BANK/combiner.onnx``) on the
    metrics it was trained with (``metric`` is then ignored).
    ``verify``: first check every byte of the members' weights and configs against the SHA-256
    recorded at build (:func:`loramix.bank.integrity.verify`); the provenance then says so.
    ``base_model``: the base model reference written into the outputs (a Hub id or a folder);
    default: the bank's, as a Hub id or an absolute path (:mod:`loramix.bank.baseref`), so the
    adapter loads from any working directory.
    ``protocol="paper"``: excluded members enter the row statistics before they are dropped, as the
    paper's leave-one-out code does (:func:`loramix.weights.mixing_weights`); the default leaves them out.
    """
    dist = scheduler is not None or client is not None
    if isinstance(exclude, str):   # one member's name, not a sequence of one-letter names
        exclude = [exclude]
    if scheduler is not None and isinstance(scheduler, str):   # refuse a bad address before any work
        from loramix.mixing.scheduler import check_scheduler_address
        check_scheduler_address(scheduler)
    check_rank(None, None, mode, rank)   # refuse --rank with factors/concat before any work
    bank = Bank.coerce(bank)
    if verify:
        bad = integrity.verify(bank)
        if bad:
            raise BankError(f"bank {bank.path}: " + "; ".join(bad))
    asked = dict(metric=metric, exclude=exclude, metric_options=dict(metric_options or {}),
                 pipeline_options=dict(pipeline_options or {}))
    many = isinstance(dataset, (list, tuple))
    items = list(dataset) if many else [dataset]
    if not items:
        raise ValueError("no datasets given")
    out = Path(out)
    if many:
        names = [it.source and ds.dataset_name(it.source) if isinstance(it, prof.Profile)
                 else ds.dataset_name(it) for it in items]
        names = [n or f"dataset{i}" for i, n in enumerate(names)]
        names = output_names(names, [it.source if isinstance(it, prof.Profile) else it for it in items])
        outs = [out / n for n in names]
    else:
        outs = [out]
    inputs = [it for it in items if isinstance(it, (str, Path))]
    for o in outs:   # refuse early, before any tokenizing; sealed outputs are verified (and skipped) later
        check_output(o, bank, overwrite or dist or resumable(o), protect=inputs, replace=overwrite or not dist)
    created = missing_dirs(out if many else out.parent)   # removed again if the run fails
    fields = tuple(fields) if fields else bank.fields
    if metric not in wts.METRICS:
        raise wts.WeightsError(f"unknown metric {metric!r}; known: {', '.join(sorted(wts.METRICS))}")
    if pipeline not in wts.PIPELINES:
        raise wts.WeightsError(f"unknown pipeline {pipeline!r}; known: {', '.join(sorted(wts.PIPELINES))}")
    popts = dict(pipeline_options or {})
    mopts = dict(metric_options or {})
    metric = wts.resolve_metric(metric, mopts)   # e.g. hybrid without an encoder: js, said once
    metrics = [metric]
    if pipeline in wts.PIPELINE_PREPARE:   # e.g. neural: its metrics and model come from the bank
        metrics, popts, extra = wts.PIPELINE_PREPARE[pipeline](bank, metric, popts)
        clash = [k for k, v in extra.items() if k in mopts and mopts[k] is not None and str(mopts[k]) != str(v)]
        if clash:
            raise wts.WeightsError(f"pipeline {pipeline} was trained with {', '.join(f'{k}={extra[k]}' for k in clash)}; "
                                   "generate with the same options or retrain it")
        mopts = {**{k: v for k, v in extra.items() if v is not None}, **mopts}
        metric = ",".join(metrics)
    ahead = None if dist else _Ahead(_ahead_tasks(bank, metrics, top_k))
    try:
        W, D, names_q = _weights(items, bank, metrics, mopts, popts, pipeline, temperature, top_k,
                                 exclude, leave_one_out, fields, split, profile_cache, progress, protocol)
    finally:
        if ahead is not None:
            ahead.stop()
    check_rank(bank, W, mode, rank)      # svd: say so when the rank asked is more than the mix holds
    if many:
        out.mkdir(parents=True, exist_ok=True)
    base = resolve_base_model(bank, base_model)
    prov = [{"pipeline": pipeline, "metric": metric, "temperature": temperature, "top_k": top_k,
             **({"protocol": protocol} if protocol != "loramix" else {}),
             "exclude": names_q[q], "distances": D[q],
             "metric_options": {k: str(v) for k, v in mopts.items() if v is not None} if
             any(wts.METRICS[m][1] != "histogram" for m in metrics) else None,
             "combiner": popts.get("combiner_path"), "verified": verify or None, "base_model": base,
             "dataset": str(items[q].source if isinstance(items[q], prof.Profile) else items[q])}
            for q in range(len(items))]
    recipe = _recipe(items, bank, pipeline, mode, top_k, temperature, dtype, rank, fields, split, base,
                     names_q, asked)
    for q, p in enumerate(prov):
        p["recipe"] = recipe and {**recipe, "index": q}
    mixer, kw = mix_adapters, {}
    if dist:
        from loramix.mixing import distributed
        mixer, kw = distributed.mix_adapters, dict(scheduler=scheduler, client=client,
                                                   **(distributed_options or {}))
    try:
        results = mixer(bank, W, outs, mode=mode, rank=rank, dtype=dtype, overwrite=overwrite,
                        provenance=prov, progress=progress, **kw)
    except BaseException:
        remove_empty_dirs(created)
        raise
    return results if many else results[0]
