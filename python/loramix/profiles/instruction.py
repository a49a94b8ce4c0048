"""A dataset's *instruction*: the text every example starts with, and its sentence embedding.

Instruction datasets (Natural Instructions / Lots-of-LoRAs, the mini bank's suite, most chat
formats) repeat one task description at the start of every example. In a token histogram those
repeated tokens are one voice among the content's; embedded on its own, the instruction says what
the task *is* — the best single signal of which adapters fit (see docs/evaluation.md).

The instruction is found without labels or format knowledge: the longest common prefix of the
first text field (``input``) over the first ``cap`` examples, cut back to a whitespace boundary.
When it is shorter than :data:`MIN_CHARS` (no shared instruction), the dataset's first
:data:`FALLBACK_EXAMPLES` example texts are embedded and averaged instead. One dataset costs one
(or a few) encoder calls; the result is cached in ``$LORAMIX_CACHE/instructions`` by the dataset's
content hash and a key naming the encoder weights and options (banks are never written to).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from loramix.data import readers as ds
from loramix.profiles import tokens as prof

MIN_CHARS = 16          # a shorter common prefix is not an instruction
FALLBACK_EXAMPLES = 16  # examples averaged when there is none
DEFAULT_CAP = 1000      # examples scanned for the common prefix


def _common_prefix(a: str, b: str) -> str:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return a[:i]


def instruction_text(dataset, fields: Sequence[str] = ds.DEFAULT_FIELDS, *, split: str = "train",
                     cap: int = DEFAULT_CAP) -> tuple[str | None, list[str]]:
    """``(instruction, fallback_texts)``: the common prefix of the first field over the first
    ``cap`` examples (None when shorter than :data:`MIN_CHARS`), and the first
    :data:`FALLBACK_EXAMPLES` full example texts (used when there is no instruction)."""
    fields = tuple(fields)
    prefix, texts, n = None, [], 0
    a, b = ds.iter_texts(dataset, fields[:1], split=split), ds.iter_texts(dataset, fields, split=split)
    try:
        for first, whole in zip((t for x in a for t in x), (t for x in b for t in x)):
            prefix = first if prefix is None else _common_prefix(prefix, first)
            if len(texts) < FALLBACK_EXAMPLES:
                texts.append(whole)
            n += 1
            if n >= cap:
                break
    finally:   # stop reading: close the files now, not at garbage collection
        a.close()
        b.close()
    if n == 0:
        raise ds.DatasetError(f"dataset {dataset}: no examples to find an instruction in")
    if n > 1 and prefix and not prefix[-1].isspace():   # do not end inside a word
        cut = max(prefix.rfind(" "), prefix.rfind("\n"))
        prefix = prefix[:cut + 1] if cut >= 0 else ""
    prefix = (prefix or "").strip()
    return (prefix if len(prefix) >= MIN_CHARS else None), texts


def instruction_key(encoder=None, quantize: str | None = None, *, fields: Sequence[str] = ds.DEFAULT_FIELDS,
                    cap: int = DEFAULT_CAP, max_length: int | None = None) -> str:
    """The identity of an instruction embedding: encoder weights + options + how it was found."""
    from loramix.profiles.embeddings import encoder_key

    return "instr1|" + encoder_key(encoder, quantize, cap=cap, seed=0, fields=fields, max_length=max_length)


def compute_instruction_embedding(dataset, *, fields: Sequence[str] = ds.DEFAULT_FIELDS, split: str = "train",
                                  encoder=None, quantize=None, cap: int = DEFAULT_CAP, threads=None,
                                  max_length=None) -> tuple[np.ndarray, str]:
    """``(embedding (d,) float32, what)`` of ``dataset``'s instruction (``what``: "prefix" or
    "examples" for the fallback)."""
    from loramix.profiles import encoder as embed

    text, fallback = instruction_text(dataset, fields, split=split, cap=cap)
    kw = {"threads": threads, "quantize": quantize}
    if max_length:
        kw["max_length"] = max_length
    texts = [text] if text is not None else fallback
    e = embed.embed_texts(texts, model=encoder, **kw).astype(np.float64).mean(axis=0)
    return e.astype(np.float32), ("prefix" if text is not None else "examples")


def _cache_file(key: str, dataset_hash: str) -> Path:
    from loramix.profiles.encoder import cache_dir

    k = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "instructions" / k / f"{dataset_hash[:40]}.npy"


def cached_instruction(data, *, dataset_hash: str | None = None, key: str, fields, split: str = "train",
                       **opts) -> np.ndarray:
    """The instruction embedding of the dataset at ``data``, kept in ``$LORAMIX_CACHE/instructions``
    by (``key``, dataset content hash): banks and user folders are never written to."""
    from loramix.core.files import atomic_path

    h = dataset_hash or ds.content_hash(data, split, tuple(fields))
    f = _cache_file(key, h)
    if f.is_file():
        try:
            e = np.load(f, allow_pickle=False)
            if e.ndim == 1 and np.all(np.isfinite(e)):
                return e.astype(np.float32)
        except (OSError, ValueError):
            pass   # unreadable cache entry: recompute and replace it
    e, _ = compute_instruction_embedding(data, fields=fields, split=split, **opts)
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(f) as tmp, open(tmp, "wb") as fh:
            np.save(fh, e)
    except OSError:
        pass   # a read-only cache only costs recomputation
    return e


def bank_instructions(bank, *, encoder=None, quantize=None, cap: int = DEFAULT_CAP, threads=None,
                      max_length=None) -> np.ndarray:
    """(N, d) instruction embeddings of the bank's members (cached by dataset content hash)."""
    from loramix.data.readers import find_member_dataset

    key = instruction_key(encoder, quantize, fields=bank.fields, cap=cap, max_length=max_length)
    opts = dict(encoder=encoder, quantize=quantize, cap=cap, threads=threads, max_length=max_length)
    out = []
    for m in bank.members:
        data = bank.path / m.info["dataset"] if m.info.get("dataset") else find_member_dataset(m.path)
        if data is None or not Path(data).exists():
            raise prof.ProfileError(f"bank member {m.name!r}: its dataset is not at hand ({m.path}); "
                                    "the instruction metric needs each member's training data")
        h = m.info.get("dataset_hash") or None
        out.append(cached_instruction(data, dataset_hash=h, key=key, fields=bank.fields, **opts))
    return np.stack(out).astype(np.float64)


def query_instructions(items, bank, *, fields, split: str = "train", cache=None, encoder=None, quantize=None,
                       cap: int = DEFAULT_CAP, threads=None, max_length=None) -> np.ndarray:
    """(Q, d) instruction embeddings of query datasets (paths, or :class:`Profile` s / saved
    profiles whose ``source`` data is at hand). ``cache`` is accepted for symmetry and unused:
    embeddings are cached in ``$LORAMIX_CACHE/instructions``."""
    key = instruction_key(encoder, quantize, fields=fields, cap=cap, max_length=max_length)
    opts = dict(encoder=encoder, quantize=quantize, cap=cap, threads=threads, max_length=max_length)
    out = []
    for it in items:
        h = None
        if isinstance(it, prof.Profile) or Path(it).suffix == ".npz":
            p = it if isinstance(it, prof.Profile) else prof.Profile.load(it)
            if not p.source or not Path(p.source).exists():
                raise prof.ProfileError(f"profile {p.source or it}: the instruction metric needs the dataset "
                                        "itself, and it is not at hand; pass the dataset path")
            it, h = p.source, p.dataset_hash or None
        out.append(cached_instruction(it, dataset_hash=h, key=key, fields=fields, split=split, **opts))
    return np.stack(out).astype(np.float64)


def text_sha(text: str) -> str:
    """Short sha256 of a text (used in provenance)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = ["instruction_text", "instruction_key", "compute_instruction_embedding", "cached_instruction",
           "bank_instructions", "query_instructions", "MIN_CHARS", "FALLBACK_EXAMPLES"]
