"""Mixing on this machine: explicit weights → PEFT adapter folders, one pass over the bank.

Outputs resume like the Dask ones (:mod:`loramix.mixing.distributed`): each ``loramix.json`` is
sealed with the output's target key (bank, weight row, mode, rank, dtype, loramix version) and the
SHA-256 of its weights and config; a re-run skips every output that matches its key and
checksums (status ``"skipped"``) and refuses (or, with ``overwrite=True``, replaces) any other
existing output. The remaining outputs are mixed within the whole batch, so their bits equal an
uninterrupted run's (the core's blocking depends on the batch); the skipped outputs' rows are
computed again for that and thrown away, never written over the verified files.
"""
from __future__ import annotations

import shutil
from typing import Sequence

from loramix.bank import peft_io
from loramix.bank.bank import Bank
from loramix.mixing import modes as mixmod
from loramix.mixing.output import (GenerateResult, OutputError, check_output, finish_stage, is_complete, seal,
                                   stage_folder, swap_in, target_key, weight_matrix, weights_metadata)

SPLIT = "local"


def mix_adapters(bank, weights, outs: Sequence, *, mode: str = "factors", rank: int | None = None,
                 dtype: str | None = None, overwrite: bool = False, provenance: Sequence[dict] | None = None,
                 progress: bool = False) -> list[GenerateResult]:
    """Mix ``bank`` with explicit ``weights`` (Q, N), or a dict name → weight for one output,
    into PEFT adapter folders ``outs`` (one per row). The lower layer of :func:`generate`.
    Outputs already complete for the same inputs are skipped (``status == "skipped"``)."""
    bank = Bank.coerce(bank)
    W, outs = weight_matrix(bank, weights, outs)
    outs = [check_output(o, bank, True) for o in outs]
    if len(set(outs)) != len(outs):
        raise OutputError("two outputs share one path")
    dtype_name = mixmod.normalize_dtype(dtype, bank.dtype)
    infos = mixmod.plan(bank, W, mode, rank)   # fail on a bad mode/rank before anything is created
    keys = [target_key(bank.hash, W[q], mode, rank, dtype_name) for q in range(len(outs))]
    done = [o.exists() and is_complete(o, keys[q]) for q, o in enumerate(outs)]
    for q, o in enumerate(outs):
        if o.exists() and not done[q] and not overwrite:
            raise OutputError(f"output {o} exists and is not a finished adapter of these inputs; pass "
                              "--overwrite (overwrite=True) to replace it")
    extras = [dict((provenance or [{}] * len(outs))[q] or {}) for q in range(len(outs))]
    results: list[GenerateResult | None] = [None] * len(outs)
    stages = []
    try:
        if not all(done):
            stages = [stage_folder(o) for o in outs]
            infos = mixmod.mix_to_files(bank, W, [s / peft_io.WEIGHTS_NAME for s in stages], mode,
                                        rank=rank, dtype=dtype_name, metadata=weights_metadata(bank, mode),
                                        progress=progress)
            for q, (stage, out, info) in enumerate(zip(stages, outs, infos)):
                if not done[q]:
                    results[q] = finish_stage(bank, W[q], info, stage, out, mode, dtype_name, extras[q])
                    seal(stage, keys[q], SPLIT)
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
        return results
    finally:
        for s in stages:
            shutil.rmtree(s, ignore_errors=True)
