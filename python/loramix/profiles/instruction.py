"""A dataset's *instruction*: the text every example starts with, and its sentence embedding.

Instruction datasets (Natural Instructions / Lots-of-LoRAs, the mini bank's suite, most chat
formats) repeat one task description at the start of every example. In a token histogram those
repeated tokens are one voice among the content's; embedded on its own, the instruction says what
the task *is* — the best single signal of which adapters fit (see docs/evaluation.md).

The instruction is found without labels or format knowledge: the longest common prefix of the
first text field (``input``) over the first ``cap`` examples, cut back to a whitespace boundary.
When it is shorter than :data:`MIN_CHARS` (no shared instruction), the dataset's first
:data:`FALLBACK_EXAMPLES` example texts are embedded and averaged instead. One dataset costs one
(or a few) encoder calls, and the result is cached in the dataset's profile ``.npz``
(``meta["instruction"]``) with a key naming the encoder weights and options.
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
    firsts = (t for b in ds.iter_texts(dataset, fields[:1], split=split) for t in b)
    wholes = (t for b in ds.iter_texts(dataset, fields, split=split) for t in b)
    for first, whole in zip(firsts, wholes):
        prefix = first if prefix is None else _common_prefix(prefix, first)
        if len(texts) < FALLBACK_EXAMPLES:
            texts.append(whole)
        n += 1
        if n >= cap:
            break
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


def ensure_instruction(p: prof.Profile, data=None, *, key: str, fields, split: str = "train", save_to=None,
                       **opts) -> np.ndarray:
    """The instruction embedding cached in ``p.meta`` under ``key``; else computed from ``data``
    (or ``p.source``), stored in ``p.meta`` and, with ``save_to``, written to that profile file."""
    got = p.meta.get("instruction") if isinstance(p.meta, dict) else None
    if got and got.get("key") == key:
        return np.asarray(got["embedding"], dtype=np.float32)
    src = data if data is not None else (p.source or None)
    if src is None or not Path(src).exists():
        raise prof.ProfileError(f"profile {p.source or save_to}: no instruction embedding for this encoder "
                                f"and its data ({src}) is not at hand to compute one")
    e, what = compute_instruction_embedding(src, fields=fields, split=split, **opts)
    p.meta = {**(p.meta or {}), "instruction": {"key": key, "from": what,
                                                "embedding": [float(x) for x in e]}}
    if save_to is not None:
        p.save(save_to)
    return e


def bank_instructions(bank, *, encoder=None, quantize=None, cap: int = DEFAULT_CAP, threads=None,
                      max_length=None) -> np.ndarray:
    """(N, d) instruction embeddings of the bank's members, cached in their profile files."""
    from loramix.data.readers import find_member_dataset

    key = instruction_key(encoder, quantize, fields=bank.fields, cap=cap, max_length=max_length)
    out = []
    for m in bank.members:
        p = prof.Profile.load(m.profile_path)
        data = bank.path / m.info["dataset"] if m.info.get("dataset") else find_member_dataset(m.path)
        out.append(ensure_instruction(p, data, key=key, fields=bank.fields, save_to=m.profile_path,
                                      encoder=encoder, quantize=quantize, cap=cap, threads=threads,
                                      max_length=max_length))
    return np.stack(out).astype(np.float64)


def query_instructions(items, bank, *, fields, split: str = "train", cache=None, encoder=None, quantize=None,
                       cap: int = DEFAULT_CAP, threads=None, max_length=None) -> np.ndarray:
    """(Q, d) instruction embeddings of query datasets (paths, saved profiles or :class:`Profile` s);
    a saved profile, or one in the ``cache`` folder, keeps it."""
    key = instruction_key(encoder, quantize, fields=fields, cap=cap, max_length=max_length)
    opts = dict(encoder=encoder, quantize=quantize, cap=cap, threads=threads, max_length=max_length)
    out = []
    for it in items:
        if isinstance(it, prof.Profile):
            out.append(ensure_instruction(it, key=key, fields=fields, split=split, **opts))
        elif Path(it).suffix == ".npz":
            p = prof.Profile.load(it)
            out.append(ensure_instruction(p, key=key, fields=fields, split=split, save_to=it, **opts))
        elif cache:
            p = prof.query_profile(it, bank, fields=fields, split=split, cache=cache)
            c = Path(cache) / f"{ds.dataset_name(Path(it))}.{prof.tokenizer_hash(bank.tokenizer_path)[:12]}.npz"
            out.append(ensure_instruction(p, it, key=key, fields=fields, split=split, save_to=c, **opts))
        else:
            out.append(compute_instruction_embedding(it, fields=fields, split=split, **opts)[0])
    return np.stack(out).astype(np.float64)


def text_sha(text: str) -> str:
    """Short sha256 of a text (used in provenance)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = ["instruction_text", "instruction_key", "compute_instruction_embedding", "ensure_instruction",
           "bank_instructions", "query_instructions", "MIN_CHARS", "FALLBACK_EXAMPLES"]
