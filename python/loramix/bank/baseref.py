"""The base model reference written into generated adapters: one that resolves from anywhere.

Members often name their base model by a path relative to where they were trained or stored
(the mini bank's ``../../base``). PEFT resolves ``base_model_name_or_path`` against the current
working directory, so copying such a path into a generated adapter makes it load from one folder
only. :func:`resolve_base_model` returns, in this order:

1. an explicit override (``generate(base_model=...)``, ``--base-model``): a folder that exists
   becomes its absolute path, anything else is kept (a Hub id);
2. the bank's base model when it is a Hub id (``org/name``): kept as is;
3. a path: resolved against each member's own folder (its ``adapter_config.json`` followed
   through symlinks, so a bank indexed in the cache still finds the shipped base), then the bank
   folder, then the current folder; the first existing folder is written as an absolute path;
4. a bare name with no local folder (``gpt2``): kept as a Hub id.

:func:`is_hub_id` tells a Hub id from a local path (cards carry ``base_model`` only for Hub ids).
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def is_hub_id(ref: str | None) -> bool:
    """Whether ``ref`` has the form of a Hugging Face Hub model id (``name`` or ``org/name``),
    not of a local path (absolute, ``./``, ``../``, ``~``, backslashes, ``..`` inside)."""
    if not ref or ".." in ref or ref.startswith(("~", ".")) or "\\" in ref:
        return False
    return _HUB_ID.match(ref) is not None and not os.path.isabs(ref)


def _local(ref: str, roots) -> Path | None:
    p = Path(os.path.expanduser(ref))
    cands = [p] if p.is_absolute() else [Path(r) / p for r in roots]
    for c in cands:
        if c.is_dir():
            return Path(os.path.abspath(c))
    return None


def _member_roots(bank) -> list[Path]:
    roots = []
    for m in getattr(bank, "members", []):
        cfg = Path(m.path) / "adapter_config.json"
        for d in (Path(m.path), cfg.resolve().parent if cfg.exists() else None):
            if d is not None and d not in roots:
                roots.append(d)
    return roots


def resolve_base_model(bank, override: str | os.PathLike | None = None) -> str | None:
    """The base model reference for an adapter generated from ``bank`` (see the module docs).

    Returns a Hub id, an absolute folder path, or None when the bank names no base model. A path
    that resolves nowhere is kept as given, with a warning naming it and the fix (``--base-model``).
    """
    if override is not None:
        ref = os.fspath(override)
        found = _local(ref, [Path.cwd()])
        return str(found) if found is not None else ref
    ref = getattr(bank, "base_model", None)
    if not ref:
        return None
    if is_hub_id(ref) and "/" in ref:
        return ref
    roots = _member_roots(bank) + [Path(bank.path), Path.cwd()]
    found = _local(ref, roots)
    if found is not None:
        return str(found)
    if is_hub_id(ref):
        return ref
    warnings.warn(f"bank {bank.path}: base model {ref!r} is not a Hub id and no such folder exists next "
                  "to the members, the bank or here; the adapter keeps it as is (pass --base-model "
                  "PATH_OR_HUB_ID, generate(base_model=...), to write one that loads)", stacklevel=2)
    return ref
