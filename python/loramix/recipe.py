"""Replayable recipes: ``loramix generate --from OUT/loramix.json -o NEW`` makes an adapter again,
bit for bit.

Every generated adapter's ``loramix.json`` carries a ``recipe``: the arguments of the
:func:`loramix.generate` call that made it (absolute paths, the final exclusions per dataset, the
resolved base model) and, for a batch, all of the batch's datasets and this adapter's index.
:func:`replay` runs that call again. A batch is replayed whole (into a hidden folder next to
``out``, removed afterwards) because the core's blocking depends on the batch: only then are the
bits those of the original. The replay refuses a bank whose hash changed, and reports whether the
new ``adapter_model.safetensors`` has the original's SHA-256.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from loramix.bank import peft_io
from loramix.bank.bank import Bank, file_sha256
from loramix.core.files import make_stage_dir
from loramix.mixing.output import PROVENANCE_NAME, GenerateResult, check_output, swap_in
from loramix.pipeline import generate
from loramix.version import version


class RecipeError(ValueError):
    """A ``loramix.json`` that cannot be replayed; the message names the file and the problem."""


def read_recipe(source) -> tuple[Path, dict, dict]:
    """``(path, provenance, recipe)`` of ``source``: a ``loramix.json`` or the adapter folder holding it."""
    path = Path(source)
    if path.is_dir():
        path = path / PROVENANCE_NAME
    try:
        prov = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such file; expected the {PROVENANCE_NAME} of an adapter loramix "
                          "generated") from None
    except (OSError, json.JSONDecodeError) as e:
        raise RecipeError(f"{path}: not valid JSON ({e})") from None
    rec = prov.get("recipe") if isinstance(prov, dict) else None
    if not isinstance(rec, dict):
        raise RecipeError(f"{path}: no 'recipe' (made by an older loramix, or from an in-memory profile); "
                          "expected the provenance of an adapter generated from dataset files")
    for k in ("datasets", "bank", "index", "pipeline", "mode"):
        if k not in rec:
            raise RecipeError(f"{path}: the recipe lacks {k!r}")
    return path, prov, rec


def replay(source, out, *, overwrite: bool = False, progress: bool = False) -> tuple[GenerateResult, dict]:
    """Generate the adapter recorded in ``source`` (its ``loramix.json`` or folder) again into ``out``.

    Returns ``(result, check)`` where ``check`` holds ``original_sha256`` (from the original's
    seal, or None), ``sha256`` of the new weights and ``identical`` (None when unknown).
    """
    path, prov, rec = read_recipe(source)
    missing = [d for d in rec["datasets"] if not Path(d).exists()]
    if missing:
        raise RecipeError(f"{path}: the recipe's dataset(s) {', '.join(missing)} no longer exist")
    bank = Bank.open(rec["bank"])
    if rec.get("bank_hash") and bank.hash != rec["bank_hash"]:
        raise RecipeError(f"{path}: the bank {rec['bank']} changed since (hash {bank.hash[:12]}, the recipe "
                          f"expects {rec['bank_hash'][:12]}); the adapter cannot be made again bit for bit")
    if prov.get("loramix_version") not in (None, version()):
        warnings.warn(f"{path}: made by loramix {prov['loramix_version']}, replayed by {version()}; "
                      "the bits may differ", stacklevel=2)
    kw = dict(pipeline=rec["pipeline"], metric=rec.get("metric", "js"), mode=rec["mode"],
              top_k=rec.get("top_k"), temperature=rec.get("temperature", 1.0), dtype=rec.get("dtype"),
              rank=rec.get("rank"), fields=rec.get("fields"), split=rec.get("split", "train"),
              metric_options=rec.get("metric_options") or None,
              pipeline_options=rec.get("pipeline_options") or None, base_model=rec.get("base_model"),
              progress=progress)
    q = int(rec["index"])
    if len(rec["datasets"]) == 1:
        res = generate(rec["datasets"][0], bank, out, exclude=list(rec["exclude"][0]), overwrite=overwrite, **kw)
    else:   # the whole batch, in a hidden folder next to out; only this adapter is kept
        target = check_output(out, bank, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = make_stage_dir(target.parent, target.name)
        try:
            rs = generate(rec["datasets"], bank, stage / "batch", exclude=[list(e) for e in rec["exclude"]], **kw)
            res = rs[q]
            swap_in(Path(res.out), target)
            res.out = target
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    orig = (prov.get("batch") or {}).get("weights_sha256")
    sha = file_sha256(Path(res.out) / peft_io.WEIGHTS_NAME)
    return res, {"original_sha256": orig, "sha256": sha, "identical": None if orig is None else orig == sha}
