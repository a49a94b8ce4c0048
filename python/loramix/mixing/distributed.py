"""Batch generation on Dask distributed: ``generate(..., scheduler="tcp://host:port")``.

The client (where :func:`loramix.pipeline.generate` runs) profiles the datasets and computes
the small weight matrix ``W`` (Q targets × N members); the cluster mixes. Only paths, names,
``W`` and a few settings travel through the scheduler; every worker opens the bank from a path
it sees (a shared filesystem) and writes outputs next to the requested output folders, which
must be shared too. Dask is imported here only (``pip install 'loramix[dask]'``).

How the work is split (``split=``)
    ``"modules"``: the bank's modules are cut into ``S`` contiguous slices of about equal bytes
    (``S`` = the cluster's worker threads by default). A slice task reads its modules of every
    member once and mixes them for ALL targets of the batch (the same core calls, with the same
    Q × K weights, as the local run makes for those modules), writing one part file that holds
    every target's tensors of the slice (S files per batch, not S·Q: each commit is an fsync).
    Then one task per target copies its tensors, in module order, into its final
    ``adapter_model.safetensors``. Each byte of the bank is read once per batch, by one worker;
    the outputs are written twice and read once more (parts, then the final files).

    ``"targets"``: the targets are cut into ``G`` groups; a group's task reads the whole bank
    and writes its targets' adapters directly. No part files and no second pass, but the bank
    is read ``G`` times. For bit-identity with a local run (see below) every target of the batch
    enters each core call, and the rows of other groups' targets are discarded (not written, and
    not computed where the rows are independent): no extra reads; cheap exactly where this split
    is meant to be used (few targets, bound by reading the bank).

    ``"auto"`` (the default) compares the two with the model below (:func:`choose_split`):
    by target, every machine reads the used bank ``B``; by module slices the cluster reads it
    once but moves ``3·Q·O`` output bytes instead of ``Q·O``. So it picks ``"modules"`` when the
    workers span several machines and ``(hosts - 1)·B > 2·Q·O`` (nearly always: ``B ≈ N·O``),
    and ``"targets"`` on one machine, where the bank sits in one page cache and part files and
    extra tasks are pure overhead (measured: ``benches/bench_distributed.py``).

Memory
    In ``factors`` mode a task runs its modules as one pass of the core
    (:func:`loramix.mixing.factors.mix_factors`, as the local run does): the rows go straight
    into the part or output files, so it holds the pass's per-thread chunks (a few MB) and the
    inputs of at most 16 calls ahead. In ``concat``/``svd`` mode it holds one module's result per
    target in memory.

Results are identical to the bit to a local run of the same batch
    The core's weighted sum is deterministic per element for any thread count: chunk size and
    panel blocking depend on Q and on which sources are non-zero in every row, never on the
    threads. But they do depend on the batch (Q, and which members every target uses), so a
    target mixed alone may differ in the last bit from the same target mixed in a batch. Both
    splits therefore make exactly the local run's core calls (module slices: the same calls,
    fewer modules per task; target groups: the full batch's rows, the others' discarded). Workers use the
    client's ISA (``isa="client"``), because SIMD kernels sum in another order; a worker whose
    CPU lacks it fails with a clear error (``isa=None`` lets each worker use its own, and gives
    up bit-identity across CPUs). The ``svd`` mode's QR/SVD run in numpy's LAPACK: identical for
    one BLAS build and CPU, as on one machine.

Faults and re-runs
    A worker that dies mid-batch loses its running task; Dask runs it again elsewhere (the
    scheduler's ``allowed-failures``; a task that raises is retried ``retries`` times). Every
    piece is idempotent: part files are written by the core's ``SafetensorsWriter`` (temporary
    file, atomic rename) under a scratch folder named by a hash of the batch's inputs, and a
    target's output is staged in a hidden folder next to it and renamed into place. A failed
    batch leaves, for each target, a finished adapter or nothing (the scratch folder is
    removed). Each output's ``loramix.json`` records ``batch.target_key`` (a hash of the bank,
    the target's weight row, mode, rank, dtype and loramix version) and the SHA-256 of its
    weights and config; a re-run skips every target whose output matches its key and checksums
    (status ``"skipped"``), and refuses (or, with ``overwrite=True``, replaces) other existing
    outputs. The remaining targets are still mixed within the whole batch, so their bits equal
    the full local run. A key covers the target's own weight row, not its batch-mates: an
    output left by another batch with the same row is accepted as the same mix (its last bits
    may differ from what this batch would compute, see above).

Scaling model (to size a cluster)
    Let ``B`` = bytes of the bank actually used (the members with a non-zero weight for some
    target; with top-k, at most Q·k members), ``O`` = bytes of one output adapter, ``n`` nodes,
    ``R`` = read bandwidth per node from the shared filesystem (or page cache), ``F`` = the
    filesystem's aggregate bandwidth, ``c`` cores per node, ``f`` = f32 FMA/s per core of the
    core's kernels. With ``split="modules"``:

        T ≈ max(B / min(n·R, F), Q·B/4 / (n·c·f)) + 3·Q·O / min(n·R, F) + (S + Q)·t_task + T_open

    - reading the bank: ``B / min(n·R, F)``; this is the term that nodes divide, until the
      shared filesystem's aggregate bandwidth ``F`` is reached: past that, more nodes don't help;
    - compute: ``Q`` FMAs per 4 bytes of an f32 bank (8 per byte for bf16), so for a few targets
      a node is bound by reading and for many (Q ≳ 4·f·c/R) by FMAs;
    - outputs: parts written, read back, final files written: ``3·Q·O`` bytes;
    - scheduler: ``S + Q`` tasks (``S`` = worker threads by default) at a few ms each;
    - ``T_open``: each worker opens (mmaps and validates) the bank once per process.

    ``split="targets"`` with one group per machine: every machine reads all of ``B``, so the
    first term becomes ``max(B / R, n·B / F)``, and the output term ``Q·O / min(n·R, F)``.

    Example: Lots-of-LoRAs (N = 502, B = 19 GB f32, O = 38 MB), Q = 100 targets (4.7e11 FMAs),
    a filesystem with F = 2 GB/s in all, machines with R = 1 GB/s, c = 16, f ≈ 5e9 FMA/s
    (``benches/bench_wsum.py`` measures f). By module slices, 2 machines: reading 9.5 s, compute
    ~3 s (overlapped), outputs 3·3.8 GB / 2 GB/s ≈ 5.7 s: about 15 s. By target: 19 s of
    reading, 2 s of outputs: about 21 s. With 4 machines, slices stay near 15 s (the filesystem
    is the limit; compute to 1.5 s) and targets grow to 38 s (4 × 19 GB through 2 GB/s). So:
    add machines until ``n·R`` reaches ``F``; past that only a faster filesystem (or a bank copy
    on each machine's local disk, ``R`` then the local disk) helps. On one machine, the bank
    comes from the page cache and Dask adds only overhead (see the benchmark): run locally.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from loramix.mixing import factors
from loramix.mixing import modes as mixmod
from loramix.bank import peft_io
from loramix.bank.bank import Bank, BankError, file_sha256
from loramix.mixing.output import (GenerateResult, OutputError, check_output, finish_stage,  # noqa: F401
                                   content_key, is_complete, stage_folder, swap_in, target_key, weight_matrix,
                                   weights_metadata)
from loramix.mixing.scheduler import connect as connect_scheduler
from loramix.version import version

SPLITS = ("auto", "modules", "targets")
SCRATCH_PREFIX = ".loramix-batch-"


@dataclass
class BatchResult(GenerateResult):
    """A :class:`GenerateResult` with ``status``: ``"generated"`` or ``"skipped"`` (complete)."""

    status: str = "generated"

    def to_dict(self) -> dict:
        return {**super().to_dict(), "status": self.status}


# ------------------------------------------------------------------ keys and verification

def batch_key(bank_hash: str, W, mode: str, rank, dtype: str, split: str, n_parts: int) -> str:
    """What a batch's scratch files are a function of (the bank, all weights, the split)."""
    return content_key([bank_hash, mode, rank, dtype, version(), split, n_parts, list(W.shape)], W)


# ------------------------------------------------------------------ worker side

_BANKS: dict = {}
_LOCK = threading.Lock()


def _open_bank(spec: dict) -> Bank:
    """The bank on this worker, opened once per process, checked against the client's."""
    key = (spec["bank"], spec["bank_hash"])
    with _LOCK:
        b = _BANKS.get(key)
        if b is None:
            b = Bank.open(spec["bank"])
            if b.hash != spec["bank_hash"] or b.names != spec["names"]:
                raise BankError(f"bank {spec['bank']} on worker (pid {os.getpid()}) is not the "
                                "client's: another hash or member list; workers must see the same bank")
            _BANKS[key] = b
        if spec["isa"] is not None:
            from loramix import _core

            if spec["isa"] not in _core.available_isas():
                raise RuntimeError(f"worker (pid {os.getpid()}) cannot run the client's ISA "
                                   f"{spec['isa']!r} (it has {list(_core.available_isas())}); "
                                   "results would differ in the last bits; pass isa=None to allow")
            if _core.active_isa() != spec["isa"]:
                _core.set_active_isa(spec["isa"])   # all tasks of a batch agree; never restored
    return b


def _part_path(spec: dict, s: int) -> Path:
    return Path(spec["scratch"]) / f"part-s{s:04d}.safetensors"


def _part_key(q: int, key: str) -> str:
    return f"t{q:05d}/{key}"


class _Prefixed:
    """One target's view of a slice's part file: its tensors are named ``t<q>/<key>`` there."""

    def __init__(self, writer, q: int):
        self.writer, self.q = writer, q

    def write(self, name: str, array) -> None:
        self.writer.write(_part_key(self.q, name), array)


def _mix_modules(bank: Bank, spec: dict, infos, index: dict, writers: dict) -> None:
    """The modules of ``index`` for the targets in ``writers`` (a dict q -> writer), with the
    local run's core calls: every target of the batch enters each call, the rows of the
    targets in ``writers`` are written (factors: one pass of the core over all the modules, as
    the local run mixes them)."""
    W, mode = spec["W"], spec["mode"]
    if mode == "factors":
        def route(q, key):
            w = writers.get(q)
            return (w.writer, _part_key(q, key)) if isinstance(w, _Prefixed) else (w, key)

        factors.mix_factors(bank, W, list(index.items()), infos, route, spec["threads"])
        return
    for name, holders in index.items():   # per target already: no other target enters its arithmetic
        masked = [info if q in writers else mixmod.MixInfo() for q, info in enumerate(infos)]
        mixmod.mix_exact(bank, W, name, holders, masked, writers, mode)


def _mix_slice(spec: dict, s: int) -> int:
    """Task: one slice of the bank's modules, mixed for every target, into one part file.

    One file per slice (not per slice and target): a batch of Q targets costs S file commits
    (each an fsync), not S·Q."""
    from loramix.core import tensors

    path = _part_path(spec, s)
    if path.is_file():   # committed before: a retried task whose worker died afterwards
        return s
    bank = _open_bank(spec)
    Q = spec["W"].shape[0]
    infos = mixmod.plan(bank, spec["W"], spec["mode"], spec["rank"])
    wanted = set(spec["slices"][s])
    index = {k: v for k, v in bank.module_index().items() if k in wanted}
    entries = [(_part_key(q, k), dt, shape) for q in range(Q)
               for k, dt, shape in mixmod.entries_for(bank, infos[q], spec["dtype"], index)]
    with tensors.SafetensorsWriter(path, entries, {"loramix_batch": spec["batch"]}) as w:
        _mix_modules(bank, spec, infos, index, {q: _Prefixed(w, q) for q in range(Q)})
    return s


def _assemble(spec: dict, q: int, out: str, extra: dict, _deps=None) -> str:
    """Task: one target's tensors from the slices' part files, in module order, into its
    final adapter folder."""
    from loramix.core import tensors

    out, key = Path(out), spec["keys"][q]
    if is_complete(out, key):   # this task ran before and its worker died after the rename
        return file_sha256(out / peft_io.WEIGHTS_NAME)
    bank = _open_bank(spec)
    info = mixmod.plan(bank, spec["W"][q:q + 1], spec["mode"], spec["rank"])[0]   # per target
    index = bank.module_index()
    where = {m: s for s, mods in enumerate(spec["slices"]) for m in mods}
    parts = {s: tensors.SafetensorsFile(_part_path(spec, s)) for s in sorted(set(where.values()))}
    entries = mixmod.entries_for(bank, info, spec["dtype"], index)
    stage = _batch_stage(spec, out)
    try:
        w = tensors.SafetensorsWriter(stage / peft_io.WEIGHTS_NAME, entries, spec["metadata"])
        try:
            for name in info.ranks:
                f = parts[where[name]]
                for ab in ("A", "B"):
                    k = peft_io.tensor_key(name, ab)
                    w.write(k, f.numpy(_part_key(q, k)))
            w.commit()
        except BaseException:
            w.abort()
            raise
        for f in parts.values():
            f.close()
        return _finish(spec, bank, q, info, stage, out, extra)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


#: inside a worker's staging folder until it is sealed: the run it belongs to, so the client
#: removes the stages of its own killed tasks and never another run's
BATCH_MARK = ".loramix-run"


def _batch_stage(spec: dict, out: Path) -> Path:
    stage = stage_folder(out)
    (stage / BATCH_MARK).write_text(spec["run"])
    return stage


def _own_stages(out: Path, run: str) -> list[Path]:
    """The staging folders next to ``out`` made by tasks of run ``run`` (killed mid-write)."""
    mine = []
    for st in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            if st.is_dir() and not st.is_symlink() and (st / BATCH_MARK).read_text() == run:
                mine.append(st)
        except OSError:
            continue
    return mine


def _finish(spec, bank, q, info, stage, out, extra) -> str:
    """Config, provenance (sealed with the checksums, in its one write) and card, then the rename
    into place."""
    (stage / BATCH_MARK).unlink(missing_ok=True)
    sha = info.sha256 = file_sha256(stage / peft_io.WEIGHTS_NAME)
    finish_stage(bank, spec["W"][q], info, stage, out, spec["mode"], spec["dtype"], extra,
                 key=spec["keys"][q], split=spec["split"])
    if out.exists() and not spec["overwrite"]:
        raise OutputError(f"output {out} appeared during the batch; not replaced")
    swap_in(stage, out)
    return sha


def _mix_targets(spec: dict, owned: list, outs: list, extras: dict) -> list:
    """Task: the whole bank for a group of targets, written straight into their outputs."""
    from loramix.core import tensors

    todo = {q: Path(o) for q, o in zip(owned, outs) if not is_complete(o, spec["keys"][q])}
    if not todo:
        return []
    bank = _open_bank(spec)
    infos = mixmod.plan(bank, spec["W"], spec["mode"], spec["rank"])
    index = bank.module_index()
    stages, writers = {}, {}
    try:
        for q, o in todo.items():
            stages[q] = _batch_stage(spec, o)
            writers[q] = tensors.SafetensorsWriter(
                stages[q] / peft_io.WEIGHTS_NAME, mixmod.entries_for(bank, infos[q], spec["dtype"], index),
                spec["metadata"])
        _mix_modules(bank, spec, infos, index, writers)
        for q in todo:
            writers.pop(q).commit()
        for q, o in todo.items():
            _finish(spec, bank, q, infos[q], stages[q], o, extras[q])
        return list(todo)
    finally:
        for w in writers.values():
            w.abort()
        for st in stages.values():
            shutil.rmtree(st, ignore_errors=True)


# ------------------------------------------------------------------ client side

@contextlib.contextmanager
def _client(scheduler, client, connect_timeout=None):
    if client is not None:
        yield client
        return
    if not isinstance(scheduler, str):   # a Client given as the scheduler
        yield scheduler
        return
    c = connect_scheduler(scheduler, connect_timeout)
    try:
        yield c
    finally:
        c.close()


def module_slices(bank: Bank, W: np.ndarray, n: int) -> list[list[str]]:
    """The bank's modules in ``n`` (or fewer) contiguous slices of about equal bytes read."""
    index = bank.module_index()
    used = np.flatnonzero(np.any(W != 0, axis=0))
    names, cost = list(index), []
    for name, holders in index.items():
        c = 0
        for i in holders:
            if i in used:
                m = bank.members[i]
                ms = m.modules[name]
                c += m.file.nbytes(ms.a_key) + m.file.nbytes(ms.b_key)
        cost.append(max(c, 1))
    n = max(1, min(n, len(names)))
    cum = np.cumsum(cost)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n) / n, side="left") + 1
    bounds = [0] + sorted(set(int(c) for c in cuts if 0 < c < len(names))) + [len(names)]
    return [names[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _n_threads(client) -> int:
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
    return max(1, sum(int(w.get("nthreads", 1)) for w in info.get("workers", {}).values()))


def _accepts_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


def mix_adapters(bank, weights, outs: Sequence, *, mode: str = "factors", rank: int | None = None,
                 dtype: str | None = None, overwrite: bool = False,
                 provenance: Sequence[dict] | None = None, progress: bool = False,
                 scheduler=None, client=None, split: str = "auto", parts: int | None = None,
                 scratch=None, threads: int | None = None, retries: int = 2, isa: str | None = "client",
                 timeout: float | None = None, connect_timeout: float | None = None) -> list[BatchResult]:
    """:func:`loramix.mixing.local.mix_adapters` on a Dask cluster; same outputs, to the bit.

    ``scheduler``: ``"tcp://host:port"`` (a client is opened and closed here) or a ``Client``;
    ``client``: a ``dask.distributed.Client`` (left open). ``split``: ``"modules"``,
    ``"targets"`` or ``"auto"`` (see the module docs); ``parts``: slices (modules split, default
    the cluster's worker threads) or groups (targets split, default min(Q, worker threads)).
    ``scratch``: folder for part files, on the shared filesystem (default: next to the first
    output). ``threads``: the core's threads per task (default: ``LORAMIX_NUM_THREADS`` or all
    cores of the worker's machine; results do not depend on it). ``retries``: re-runs of a task
    that raised. ``isa``: ``"client"`` (pin workers to the client's ISA), a name, or None.
    ``timeout``: seconds to wait for the batch (None: no limit); ``connect_timeout``: seconds to
    wait for the scheduler to answer (default :data:`loramix.mixing.scheduler.DEFAULT_CONNECT_TIMEOUT`).
    Returns one :class:`BatchResult` per output, ``status`` ``"skipped"`` where a complete,
    verified output of the same inputs was already there.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    bank = Bank.coerce(bank)
    W, outs = weight_matrix(bank, weights, outs)
    dtype_name = mixmod.normalize_dtype(dtype, bank.dtype)
    infos = mixmod.plan(bank, W, mode, rank)
    keys = [target_key(bank.hash, W[q], mode, rank, dtype_name) for q in range(len(outs))]
    outs = [check_output(o, bank, True, replace=False) for o in outs]   # replaced ones: swap_in checks
    if len(set(outs)) != len(outs):
        raise OutputError("two outputs share one path")
    todo = []
    for q, o in enumerate(outs):
        if o.exists() and is_complete(o, keys[q]):
            continue
        if o.exists() and not overwrite:
            raise OutputError(f"output {o} exists and is not this batch's finished adapter; pass "
                              "--overwrite (overwrite=True) to replace it")
        todo.append(q)
    extras = [dict((provenance or [{}] * len(outs))[q] or {}) for q in range(len(outs))]
    if todo:
        from loramix import _core

        spec = {"bank": str(Path(os.path.abspath(bank.path))), "bank_hash": bank.hash,
                "names": bank.names, "W": W, "mode": mode, "rank": rank, "dtype": dtype_name,
                "keys": keys, "overwrite": overwrite, "threads": threads,
                "metadata": {"format": "pt", **weights_metadata(bank, mode)},
                "isa": _core.active_isa() if isa == "client" else isa}
        with _client(scheduler, client, connect_timeout) as c:
            _run(c, bank, W, spec, outs, todo, extras, split, parts, scratch, retries, timeout, progress)
    results = []
    for q, (o, info) in enumerate(zip(outs, infos)):
        e = extras[q]
        results.append(BatchResult(out=o, members=bank.names, weights=W[q], mode=mode, ranks=info.ranks,
                                   pipeline=e.get("pipeline"), metric=e.get("metric"),
                                   dataset=e.get("dataset"), distances=e.get("distances"),
                                   status="generated" if q in todo else "skipped"))
    return results


def choose_split(bank: Bank, W: np.ndarray, infos, dtype: str, hosts: int) -> str:
    """``"modules"`` when reading the bank once saves more than the part files cost.

    By target, each of ``hosts`` machines reads the used bank ``B`` once; by module slices the
    cluster reads it once in all, but writes, reads and writes again the outputs (``3·Q·O``
    against ``Q·O``). So module slices win when ``(hosts - 1)·B > 2·Q·O``: on one machine (the
    bank in its page cache) never, on a cluster nearly always (``B ≈ N·O``).
    """
    used = np.flatnonzero(np.any(W != 0, axis=0))
    B = sum(bank.members[i].path.joinpath(peft_io.WEIGHTS_NAME).stat().st_size for i in used)
    size = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    QO = 0
    for info in infos:
        for name, r in info.ranks.items():
            inn, out = bank.module_shape(name)
            QO += r * (inn + out) * size
    return "modules" if (hosts - 1) * B > 2 * QO else "targets"


def _hosts(client) -> int:
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
    return max(1, len({w.get("host") for w in info.get("workers", {}).values()}))


def _run(c, bank, W, spec, outs, todo, extras, split, parts, scratch, retries, timeout, progress):
    if split == "auto":
        split = choose_split(bank, W, mixmod.plan(bank, W, spec["mode"], spec["rank"]), spec["dtype"],
                             _hosts(c))
    spec["split"] = split
    nthreads = _n_threads(c)
    if split == "modules":
        spec["slices"] = module_slices(bank, W, parts or nthreads)
        n = len(spec["slices"])
    else:
        n = max(1, min(parts or nthreads, len(todo)))
    bkey = batch_key(bank.hash, W, spec["mode"], spec["rank"], spec["dtype"], split, n)
    spec["batch"] = bkey
    root = Path(os.path.abspath(scratch)) if scratch else outs[0].parent
    spec["scratch"] = str(root / f"{SCRATCH_PREFIX}{bkey[:16]}")
    Path(spec["scratch"]).mkdir(parents=True, exist_ok=True)
    for q in todo:
        outs[q].parent.mkdir(parents=True, exist_ok=True)
    # task keys are new on every run: the scheduler may still hold the results of a previous
    # run's keys, and would hand them back instead of running the tasks again
    tag = f"{bkey[:12]}-{uuid.uuid4().hex[:8]}"
    spec["run"] = tag
    futures = []
    ok = False
    try:
        # the spec (W, names, settings) enters the graph once, as a task that can be recomputed
        # if the workers holding it die (scattered data could not be)
        spec_f = c.submit(_identity, spec, key=f"loramix-spec-{tag}", pure=False)
        if split == "modules":
            sl = [c.submit(_mix_slice, spec_f, s, key=f"loramix-slice-{tag}-{s}", retries=retries,
                           pure=False) for s in range(n)]
            asm = [c.submit(_assemble, spec_f, q, str(outs[q]), extras[q], sl, retries=retries,
                            key=f"loramix-assemble-{tag}-{q}", pure=False) for q in todo]
            futures = sl + asm
        else:
            groups = [todo[g::n] for g in range(n)]
            futures = [c.submit(_mix_targets, spec_f, grp, [str(outs[q]) for q in grp],
                                {q: extras[q] for q in grp}, retries=retries,
                                key=f"loramix-targets-{tag}-{g}", pure=False)
                       for g, grp in enumerate(groups) if grp]
        with c.as_current():
            _wait(c, futures, timeout, progress)
        try:
            c.gather(futures)   # raises the first task error
        except Exception as e:
            if type(e).__module__.split(".")[0] == "distributed":   # e.g. KilledWorker
                raise RuntimeError(f"the batch failed on the cluster: {type(e).__name__}: {e}") from e
            raise
        ok = True
    finally:
        if not ok:   # cancelled tasks that already run go on: let them end before cleaning up
            c.cancel(futures)
            _drain(c, "loramix-", tag, 60 if timeout is None else timeout)
        shutil.rmtree(spec["scratch"], ignore_errors=True)
        for q in todo:   # stage folders of this run's tasks whose worker was killed mid-write
            for st in _own_stages(outs[q], tag):
                shutil.rmtree(st, ignore_errors=True)


def _running(dask_worker, prefix: str, tag: str) -> list:
    """On a worker: the keys of this batch's tasks that occupy a thread (cancelled or not)."""
    st = dask_worker.state
    tss = set(getattr(st, "executing", ())) | set(getattr(st, "long_running", ()))
    return [str(ts.key) for ts in tss if str(ts.key).startswith(prefix) and tag in str(ts.key)]


def _drain(c, prefix: str, tag: str, timeout: float) -> None:
    """Bounded wait until no worker runs a task of this batch."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if not any(c.run(_running, prefix=prefix, tag=tag, on_error="ignore").values()):
                return
        except Exception:  # noqa: BLE001 - a dead cluster runs nothing
            return
        time.sleep(0.1)


def _identity(x):
    return x


def _wait(c, futures, timeout, progress):
    """Until every task is done or one failed (bounded by ``timeout``)."""
    from dask.distributed import as_completed

    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(futures), desc="mix (dask)", unit="task", file=sys.stderr, leave=False)
    try:
        for f in as_completed(futures, timeout=timeout):
            if bar is not None:
                bar.update(1)
            if f.status == "error":
                return
    finally:
        if bar is not None:
            bar.close()
