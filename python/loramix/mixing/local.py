"""Mixing on this machine: explicit weights → PEFT adapter folders, one pass over the bank."""
from __future__ import annotations

import shutil
from typing import Sequence

from loramix.bank import peft_io
from loramix.bank.bank import Bank
from loramix.core.files import missing_dirs, remove_empty_dirs
from loramix.mixing import modes as mixmod
from loramix.mixing.output import (GenerateResult, OutputError, check_output, finish_stage, stage_folder,
                                   swap_in, weight_matrix, weights_metadata)


def mix_adapters(bank, weights, outs: Sequence, *, mode: str = "factors", rank: int | None = None,
                 dtype: str | None = None, overwrite: bool = False, provenance: Sequence[dict] | None = None,
                 progress: bool = False) -> list[GenerateResult]:
    """Mix ``bank`` with explicit ``weights`` (Q, N), or a dict name → weight for one output,
    into PEFT adapter folders ``outs`` (one per row). The lower layer of :func:`generate`."""
    bank = Bank.coerce(bank)
    W, outs = weight_matrix(bank, weights, outs)
    outs = [check_output(o, bank, overwrite) for o in outs]
    if len(set(outs)) != len(outs):
        raise OutputError("two outputs share one path")
    dtype_name = mixmod.normalize_dtype(dtype, bank.dtype)
    mixmod.plan(bank, W, mode, rank)   # fail on a bad mode/rank before anything is created
    stages = []
    created = sorted({d for o in outs for d in missing_dirs(o.parent)}, key=lambda d: -len(d.parts))
    ok = False
    try:
        stages = [stage_folder(o) for o in outs]
        infos = mixmod.mix_to_files(bank, W, [s / peft_io.WEIGHTS_NAME for s in stages], mode,
                                    rank=rank, dtype=dtype_name, metadata=weights_metadata(bank, mode),
                                    progress=progress)
        results = []
        for q, (stage, out, info) in enumerate(zip(stages, outs, infos)):
            extra = dict((provenance or [{}] * len(outs))[q] or {})
            results.append(finish_stage(bank, W[q], info, stage, out, mode, dtype_name, extra))
        for stage, out in zip(stages, outs):
            swap_in(stage, out)
            stages = [s for s in stages if s != stage]
        ok = True
        return results
    finally:
        for s in stages:
            shutil.rmtree(s, ignore_errors=True)
        if not ok:   # folders this call created for its outputs go again (when still empty)
            remove_empty_dirs(created)
