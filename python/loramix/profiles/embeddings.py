"""Dataset sentence embeddings stored in profiles (ONNX Runtime, no torch).

A dataset's embedding is :func:`loramix.profiles.encoder.dataset_embedding` of its example texts (the same
``input + output[0]`` texts the token profile counts; at most ``cap`` examples, sampled with
``seed``). It is stored in the dataset's profile ``.npz`` next to the token histogram, with a key
naming what made it (encoder weights hash, quantization, max length, cap, seed, fields): a profile
whose key differs is recomputed (bank members, datasets with their data at hand) or refused.
Embeddings are computed only when a metric/pipeline needs them.

The ``cosine`` metric built on them lives in :mod:`loramix.weights.cosine`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from loramix.data import readers as ds
from loramix.data.readers import find_member_dataset
from loramix.profiles import tokens as prof

DEFAULT_CAP = 1000
DEFAULT_SEED = 0


class EmbeddingError(ValueError):
    """An embedding that cannot be used (made by another encoder and no data to redo it)."""


def encoder_key(encoder=None, quantize: str | None = None, *, cap: int | None = DEFAULT_CAP,
                seed: int = DEFAULT_SEED, fields: Sequence[str] = ds.DEFAULT_FIELDS,
                max_length: int | None = None) -> str:
    """The identity of a dataset embedding: encoder weights hash + quantization + sampling."""
    from loramix.profiles import encoder as embed
    from loramix.profiles import onnx_bert

    folder = Path(encoder) if encoder is not None else embed.default_model_dir()
    cfg = onnx_bert.load_config(folder)
    h = embed.hash_files(embed.weight_files(folder), json.dumps(cfg, sort_keys=True))
    ml = max_length or embed.DEFAULT_MAX_LENGTH
    return f"enc={h}|q={embed.quantize_tag(quantize)}|len={ml}|cap={cap}|seed={seed}|fields={','.join(fields)}"


def _compute(data, fields, split, encoder, quantize, cap, seed, threads, max_length) -> np.ndarray:
    from loramix.profiles import encoder as embed

    texts = (t for batch in ds.iter_texts(data, tuple(fields), split=split) for t in batch)
    kw = {"threads": threads}
    if max_length:
        kw["max_length"] = max_length
    return embed.dataset_embedding(texts, cap=cap, seed=seed, model=encoder, quantize=quantize, **kw)


def ensure_embedding(p: prof.Profile, data=None, *, key: str, fields, split: str = "train", encoder=None,
                     quantize=None, cap=DEFAULT_CAP, seed=DEFAULT_SEED, threads=None, max_length=None,
                     save_to=None) -> np.ndarray:
    """``p.embedding`` when its key is ``key``; else computed from ``data`` (or ``p.source``),
    set on ``p`` and, with ``save_to``, written into that profile file."""
    if p.embedding is not None and p.embedding_key == key:
        return p.embedding
    src = data if data is not None else (p.source or None)
    if src is None or not Path(src).exists():
        what = "made with another encoder/options" if p.embedding is not None else "has no embedding"
        raise EmbeddingError(f"profile {p.source or save_to}: {what} and its data ({src}) is not at hand "
                             "to compute one; rebuild the profile from the data")
    p.embedding = _compute(src, fields, split, encoder, quantize, cap, seed, threads, max_length)
    p.embedding_key = key
    if save_to is not None:
        p.save(save_to)
    return p.embedding


def bank_embeddings(bank, *, encoder=None, quantize=None, cap=DEFAULT_CAP, seed=DEFAULT_SEED,
                    threads=None, max_length=None, compute: bool = True, progress: bool = False) -> np.ndarray:
    """(N, d) embeddings of the bank's members, read from their profile files; missing or stale
    ones are computed from the members' datasets and stored (``compute=False``: raise instead).
    ``progress``: a bar on stderr over the members whose embedding is computed (the first cosine
    run over a bank embeds every member's dataset, minutes for a large bank)."""
    key = encoder_key(encoder, quantize, cap=cap, seed=seed, fields=bank.fields, max_length=max_length)
    profiles = [prof.Profile.load(m.profile_path) for m in bank.members]
    bar = None
    todo = sum(1 for p in profiles if not (p.embedding is not None and p.embedding_key == key))
    if progress and compute and todo:
        from tqdm import tqdm

        bar = tqdm(total=todo, desc=f"embed bank datasets ({todo} of {len(profiles)} members)",
                   unit="member", file=sys.stderr)
    out = []
    for m, p in zip(bank.members, profiles):
        fresh = p.embedding is not None and p.embedding_key == key
        if not compute and not (p.embedding is not None and p.embedding_key == key):
            raise EmbeddingError(f"member {m.name!r}: no embedding for this encoder in {m.profile_path}; "
                                 "run `loramix bank build DIR --embeddings`")
        data = bank.path / m.info["dataset"] if m.info.get("dataset") else find_member_dataset(m.path)
        out.append(ensure_embedding(p, data, key=key, fields=bank.fields, encoder=encoder, quantize=quantize,
                                    cap=cap, seed=seed, threads=threads, max_length=max_length,
                                    save_to=m.profile_path))
        if bar is not None and not fresh:
            bar.update(1)
    if bar is not None:
        bar.close()
    return np.stack(out).astype(np.float64)


def query_embeddings(items, bank, *, fields, split="train", cache=None, encoder=None, quantize=None,
                     cap=DEFAULT_CAP, seed=DEFAULT_SEED, threads=None, max_length=None) -> np.ndarray:
    """(Q, d) embeddings of query datasets: paths, saved profiles (.npz) or :class:`Profile` s.
    A saved profile keeps its embedding (written back into the .npz); with ``cache`` (a folder,
    as ``profile_cache``) a dataset's profile there stores it too."""
    key = encoder_key(encoder, quantize, cap=cap, seed=seed, fields=fields, max_length=max_length)
    kw = dict(key=key, fields=fields, split=split, encoder=encoder, quantize=quantize, cap=cap, seed=seed,
              threads=threads, max_length=max_length)
    out = []
    for it in items:
        if isinstance(it, prof.Profile):
            out.append(ensure_embedding(it, **kw))
        elif Path(it).suffix == ".npz":
            p = prof.Profile.load(it)
            out.append(ensure_embedding(p, save_to=it, **kw))
        elif cache:
            p = prof.query_profile(it, bank, fields=fields, split=split, cache=cache)
            c = Path(cache) / f"{ds.dataset_name(Path(it))}.{prof.tokenizer_hash(bank.tokenizer_path)[:12]}.npz"
            out.append(ensure_embedding(p, it, save_to=c, **kw))
        else:
            out.append(_compute(it, fields, split, encoder, quantize, cap, seed, threads, max_length))
    return np.stack(out).astype(np.float64)
