"""What ``overwrite`` may replace: only what loramix made.

``loramix generate -o DIR --overwrite`` replaces ``DIR`` as a whole (a swap, then the old folder
is removed). A user points ``-o`` at their own folders, so a folder is replaced only when it is

- empty, or
- a previous loramix output: a ``loramix.json`` that parses as loramix provenance, and nothing
  in the folder but the files loramix writes there (:data:`OUTPUT_FILES`);

and never when it is a symbolic link, the current folder or one of its ancestors, or a folder
that is, holds or lies inside a protected path (the bank, the input datasets). Everything else
is refused with one line that says why; nothing is deleted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

PROVENANCE_NAME = "loramix.json"

#: The files a generated adapter folder holds (``explain`` adds ``weights.png``). Another
#: feature that writes into an output folder adds its file names here.
OUTPUT_FILES = {"adapter_config.json", "adapter_model.safetensors", PROVENANCE_NAME, "README.md",
                "weights.png", "adapter_model.gguf"}   # explain --png; --format gguf

#: Keys every loramix provenance file has had since the first release.
PROVENANCE_KEYS = ("loramix_version", "bank_hash", "mode", "weights")


def _real(p) -> Path:
    return Path(os.path.realpath(p))


def within(inner: Path, outer: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies below it (both resolved)."""
    return inner == outer or outer in inner.parents


def provenance_problem(path) -> str | None:
    """Why ``path`` (a ``loramix.json``) is not loramix provenance; None when it is."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(1 << 24)
        doc = json.loads(raw)
    except (OSError, ValueError) as e:
        return f"its {PROVENANCE_NAME} is unreadable ({type(e).__name__})"
    if not isinstance(doc, dict):
        return f"its {PROVENANCE_NAME} is not a JSON object"
    missing = [k for k in PROVENANCE_KEYS if k not in doc]
    if missing:
        return f"its {PROVENANCE_NAME} lacks {', '.join(missing)} (not a loramix provenance file)"
    if not isinstance(doc["weights"], dict) or not isinstance(doc["loramix_version"], str):
        return f"its {PROVENANCE_NAME} has no member weights (not a loramix provenance file)"
    return None


def replace_refusal(out, protected: Iterable = ()) -> str | None:
    """Why the existing ``out`` must not be replaced (a short reason), or None when it may be.

    ``protected``: paths that must survive (the bank, input datasets): ``out`` may not be,
    hold, or lie inside any of them."""
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        return "it is a symbolic link (loramix replaces only folders it wrote)"
    if not out.is_dir():
        return "it exists and is not a folder"
    real = _real(out)
    try:
        cwd = _real(os.getcwd())
    except OSError:   # the current folder was removed: nothing of it to protect
        cwd = None
    if cwd is not None and within(cwd, real):
        return "it is the current folder or holds it"
    for p in protected:
        if p is None:
            continue
        rp = _real(p)
        if within(rp, real):
            return f"it holds {p}, an input of this run"
        if within(real, rp):
            return f"it lies inside {p}, an input of this run"
    try:
        names = sorted(os.listdir(out))
    except OSError as e:
        return f"it cannot be listed ({e.strerror})"
    if not names:
        return None
    if PROVENANCE_NAME not in names:
        return f"it is not empty and not a loramix output (no {PROVENANCE_NAME}; it holds {_some(names)})"
    why = provenance_problem(out / PROVENANCE_NAME)
    if why:
        return why
    foreign = [n for n in names if n not in OUTPUT_FILES or not (out / n).is_file() or (out / n).is_symlink()]
    if foreign:
        return f"it holds files loramix did not write there: {_some(foreign)}"
    return None


def _some(names: list[str], k: int = 4) -> str:
    more = len(names) - k
    return ", ".join(names[:k]) + (f" and {more} more" if more > 0 else "")


def nonfinite_tensor(path) -> tuple[str, int] | None:
    """``(tensor, flat index)`` of the first NaN or infinite value in the safetensors file
    ``path`` (a staged output), or None: a non-finite output is never swapped into place."""
    from loramix.bank.integrity import first_nonfinite
    from loramix.core import tensors

    f = tensors.SafetensorsFile(str(path))
    try:
        for key in f.keys():
            if f.dtype(key) in ("F32", "F16", "BF16"):
                i = first_nonfinite(f.numpy(key), f.dtype(key))
                # read pages leave the process at once: an output as large as the bank (concat
                # of every member) must not make the check hold all of it (VmHWM)
                tensors.release_pages([f.tensor(key)])
                if i is not None:
                    return key, i
    finally:
        f.close()
    return None
