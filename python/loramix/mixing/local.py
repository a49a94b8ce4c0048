"""Mixing on this machine: explicit weights → PEFT adapter folders, one pass over the bank."""
from __future__ import annotations

import shutil
from typing import Sequence

from loramix.bank import peft_io
from loramix.bank.bank import Bank
from loramix.core.files import missing_dirs, remove_empty_dirs
from loramix.mixing import modes as mixmod
from loramix.mixing.output import (GenerateResult, OutputError, check_output, finish_stage, is_complete,
                                   stage_folder, swap_in, target_key, weight_matrix, weights_metadata)

SPLIT = "local"


def mix_adapters(bank, weights, outs: Sequence, *, mode: str = "factors", rank: int | None = None,
                 dtype: str | None = None, overwrite: bool = False, provenance: Sequence[dict] | None = None,
                 progress: bool = False) -> list[GenerateResult]:
    """Mix ``bank`` with explicit ``weights`` (Q, N), or a dict name → weight for one output,
    into PEFT adapter folders ``outs`` (one per row). The lower layer of :func:`generate`.
    Outputs already complete for the same inputs are skipped (``status == "skipped"``); any other
    existing output needs ``overwrite`` and is replaced only if it is an empty folder or a
    previous loramix output (:mod:`loramix.mixing.guard`)."""
    bank = Bank.coerce(bank)
    W, outs = weight_matrix(bank, weights, outs)
    outs = [check_output(o, bank, True, replace=False) for o in outs]   # where: never in/over the bank
    if len(set(outs)) != len(outs):
        raise OutputError("two outputs share one path")
    dtype_name = mixmod.normalize_dtype(dtype, bank.dtype)
    infos = mixmod.plan(bank, W, mode, rank)   # fail on a bad mode/rank before anything is created
    keys = [target_key(bank.hash, W[q], mode, rank, dtype_name) for q in range(len(outs))]
    done = [o.exists() and is_complete(o, keys[q]) for q, o in enumerate(outs)]
    for q, o in enumerate(outs):
        if not done[q]:   # what would be replaced: only with overwrite, and only if replaceable
            if o.exists() and not overwrite:
                raise OutputError(f"output {o} exists and is not a finished adapter of these inputs; pass "
                                  "--overwrite (overwrite=True) to replace it")
            check_output(o, bank, overwrite)
    extras = [dict((provenance or [{}] * len(outs))[q] or {}) for q in range(len(outs))]
    results: list[GenerateResult | None] = [None] * len(outs)
    stages = []
    created = sorted({d for o in outs for d in missing_dirs(o.parent)}, key=lambda d: -len(d.parts))
    ok = False
    try:
        if not all(done):
            stages = [stage_folder(o) for o in outs]
            infos = mixmod.mix_to_files(bank, W, [s / peft_io.WEIGHTS_NAME for s in stages], mode,
                                        rank=rank, dtype=dtype_name, metadata=weights_metadata(bank, mode),
                                        progress=progress, digest=True)
            todo = [q for q in range(len(outs)) if not done[q]]
            for q, res in zip(todo, _each(todo, lambda q: finish_stage(
                    bank, W[q], infos[q], stages[q], outs[q], mode, dtype_name, extras[q], key=keys[q], split=SPLIT))):
                results[q] = res
            for q, (stage, out) in enumerate(zip(stages, outs)):
                if not done[q]:
                    swap_in(stage, out)
                    stages = [s for s in stages if s != stage]
        for q, o in enumerate(outs):
            if done[q]:
                e = extras[q]
                results[q] = GenerateResult(out=o, members=bank.names, weights=W[q], mode=mode,
                                            ranks=infos[q].ranks, pipeline=e.get("pipeline"),
                                            metric=e.get("metric"), dataset=e.get("dataset"),
                                            distances=e.get("distances"), status="skipped")
        ok = True
        return results
    finally:
        for s in stages:
            shutil.rmtree(s, ignore_errors=True)
        if not ok:   # folders this call created for its outputs go again (when still empty)
            remove_empty_dirs(created)


def _each(items: list, fn) -> list:
    """``[fn(x) for x in items]`` in threads (outputs are finished side by side: the non-finite
    check and the file writes release the GIL); the first error in ``items`` order is raised,
    after every call has returned."""
    from loramix.core import default_threads

    n = min(len(items), default_threads())
    if n < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=n) as ex:
        futs = [ex.submit(fn, x) for x in items]
    return [f.result() for f in futs]
