"""Token profiles: a dataset's token histogram under the bank's tokenizer, as the paper builds it.

Each example's text (``input + output[0]``) is encoded as one string with the tokenizer's
special tokens as it adds them (``add_special_tokens=True``, no truncation, no padding); the
ids of all examples are pooled into counts over the vocabulary. The counts are stored raw;
the divergence kernel normalizes each row and adds ``eps`` (1e-10) to every bin.

A profile is saved as ``.npz`` (sparse ids + counts) together with the tokenizer's hash and the
dataset's hashes, so a profile made with another tokenizer is refused and an unchanged dataset
is not tokenized twice.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from loramix.core.divergence import csr_matrix
from loramix.core.files import atomic_path
from loramix.data import readers as ds
from loramix.profiles import chunks

PROFILE_FORMAT = 1


class ProfileError(ValueError):
    """A profile that does not fit (other tokenizer, other dataset, unreadable)."""


def tokenizer_file(path) -> Path:
    """``tokenizer.json`` itself, or inside a folder (a model folder, a bank folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ProfileError(f"tokenizer {path}: no tokenizer.json there (a HF `tokenizers` file is needed)")
    return p


# Per tokenizer file, once per process: its hash, the loaded tokenizer and its cut plan (a batch
# of Q datasets loaded, parsed and hashed the file Q times: ~0.1 s each for a 2 MB tokenizer).
# Keyed by the file's path, size, mtime, ctime and inode: an edited file is a new entry.
_TOKS: dict = {}
_TOKS_LOCK = threading.Lock()


def _tok_entry(path) -> dict:
    f = tokenizer_file(path)
    st = f.stat()
    where = os.path.realpath(f)
    key = (where, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    with _TOKS_LOCK:
        e = _TOKS.get(key)
        if e is None:
            for k in [k for k in _TOKS if k[0] == where]:   # an older version of the file
                del _TOKS[k]
            e = _TOKS[key] = {"file": f, "lock": threading.Lock()}
    return e


def _cached(path, what: str, make):
    e = _tok_entry(path)
    with e["lock"]:   # one thread builds it; the others wait for it
        if what not in e:
            e[what] = make(e["file"])
        return e[what]


def tokenizer_hash(path) -> str:
    """SHA-256 of the tokenizer file's bytes: two tokenizers that may split text differently differ."""
    return _cached(path, "sha256", lambda f: hashlib.sha256(f.read_bytes()).hexdigest())


def _load(f: Path):
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ProfileError(f"tokenizer {f}: not a tokenizer.json the `tokenizers` library can load "
                           f"({msg}); give the model's tokenizer.json (not tokenizer_config.json)") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


def load_tokenizer(path):
    """The ``tokenizers.Tokenizer`` of ``path`` (no truncation, no padding), loaded once per process
    and file version and shared: encode with it (threads may), do not reconfigure it."""
    return _cached(path, "tokenizer", _load)


@dataclass
class Profile:
    """Sparse token counts of one dataset. ``ids`` ascending, ``counts`` > 0."""

    ids: np.ndarray
    counts: np.ndarray
    vocab_size: int
    tokenizer_hash: str
    dataset_hash: str = ""
    fingerprint: str = ""
    n_examples: int = 0
    source: str = ""
    fields: tuple = ds.DEFAULT_FIELDS
    meta: dict = field(default_factory=dict)
    #: dataset sentence embedding (mean of example embeddings, float32), computed lazily by
    #: :mod:`loramix.profiles.embeddings` for the ``cosine`` metric / ``neural`` pipeline, and the identity
    #: of what made it (encoder weights hash, quantization, sampling): another key = recompute.
    embedding: np.ndarray | None = None
    embedding_key: str = ""

    @property
    def n_tokens(self) -> int:
        return int(self.counts.sum())

    def dense(self, dtype=np.float64) -> np.ndarray:
        out = np.zeros(self.vocab_size, dtype=dtype)
        out[self.ids] = self.counts
        return out

    def save(self, path) -> Path:
        """Write atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "format": PROFILE_FORMAT, "vocab_size": int(self.vocab_size),
            "tokenizer_hash": self.tokenizer_hash, "dataset_hash": self.dataset_hash,
            "fingerprint": self.fingerprint, "n_examples": int(self.n_examples),
            "source": self.source, "fields": list(self.fields), "meta": self.meta,
            "embedding_key": self.embedding_key if self.embedding is not None else "",
        }
        extra = {} if self.embedding is None else {"embedding": np.asarray(self.embedding, np.float32)}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, ids=self.ids.astype(np.int64), counts=self.counts.astype(np.int64),
                     header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **extra)
        return path

    @staticmethod
    def check_target(path) -> None:
        """Refuse (:class:`ProfileError` naming it) to save a profile over anything but a
        profile: ``loramix profile -o F`` never replaces a user's file."""
        path = Path(path)
        if path.is_symlink() or path.is_dir():
            raise ProfileError(f"profile {path}: is a {'link' if path.is_symlink() else 'folder'}; "
                               "give a new .npz file name")
        if path.exists():
            try:
                Profile.load(path)
            except Exception as e:  # noqa: BLE001 - whatever makes it unreadable, it is not ours
                raise ProfileError(f"profile {path}: exists and is not a loramix profile; not replaced "
                                   f"({type(e).__name__})") from None

    @classmethod
    def load(cls, path) -> "Profile":
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                header = json.loads(bytes(z["header"]).decode())
                ids, counts = z["ids"], z["counts"]
                emb = z["embedding"] if "embedding" in z.files else None
        except (OSError, ValueError, KeyError, EOFError, __import__("zipfile").BadZipFile) as e:
            raise ProfileError(f"profile {path}: unreadable ({e})") from None
        if not isinstance(header, dict):
            raise ProfileError(f"profile {path}: its header is not a JSON object")
        if header.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"profile {path}: format {header.get('format')} is not {PROFILE_FORMAT}")
        for key, typ in (("vocab_size", int), ("tokenizer_hash", str)):
            if not isinstance(header.get(key), typ) or isinstance(header.get(key), bool):
                raise ProfileError(f"profile {path}: its header lacks {key!r} "
                                   f"({'an integer' if typ is int else 'a string'} expected); rebuild it")
        return cls(ids=ids, counts=counts, vocab_size=int(header["vocab_size"]),
                   tokenizer_hash=header["tokenizer_hash"], dataset_hash=header.get("dataset_hash", ""),
                   fingerprint=header.get("fingerprint", ""), n_examples=int(header.get("n_examples", 0)),
                   source=header.get("source", ""), fields=tuple(header.get("fields", ds.DEFAULT_FIELDS)),
                   meta=header.get("meta", {}), embedding=emb,
                   embedding_key=header.get("embedding_key", "") if emb is not None else "")

    def check_tokenizer(self, tok_hash: str, what: str = "") -> None:
        if self.tokenizer_hash != tok_hash:
            raise ProfileError(
                f"profile {what or self.source}: made with another tokenizer "
                f"({self.tokenizer_hash[:12]} vs the bank's {tok_hash[:12]}); rebuild it")


def build_profile(dataset, tokenizer, *, fields: Iterable[str] = ds.DEFAULT_FIELDS,
                  split: str = "train", batch_size: int = 1024, progress: bool = False) -> Profile:
    """Tokenize ``dataset`` (a path) with ``tokenizer`` (a path) into a :class:`Profile`."""
    fields = tuple(fields)
    tok = load_tokenizer(tokenizer)
    # the cut plan, made at the first long example only (see chunks.encoded_ids), kept per file
    plan = functools.partial(_cached, tokenizer, "cut_plan", chunks.cut_plan)
    vocab = int(tok.get_vocab_size(with_added_tokens=True))
    acc = np.zeros(vocab, dtype=np.int64)
    n = 0
    stats: dict = {}
    bar = _bar(progress, f"profile {ds.dataset_name(dataset)}", "ex")
    for texts in ds.iter_texts(dataset, fields, split=split, batch_size=batch_size, long_texts=True):
        # long examples in bounded pieces: the reader's and the tokenizer's memory stay bounded
        # (data/jsonstream.py: a long JSON line's text is never held whole; profiles/chunks.py)
        for ids in chunks.encoded_ids(tok, texts, plan, stats):
            if ids.size:
                if ids.max() >= acc.size:   # added tokens beyond the reported size
                    acc = np.concatenate([acc, np.zeros(int(ids.max()) + 1 - acc.size, np.int64)])
                acc += np.bincount(ids, minlength=acc.size)
        n += len(texts)
        if bar is not None:
            bar.update(len(texts))
    if bar is not None:
        bar.close()
    if stats.get("forced_cuts"):
        import warnings

        warnings.warn(f"dataset {dataset}: {stats['forced_cuts']} cut(s) of long examples fell where "
                      f"tokenizer {tokenizer_file(tokenizer)} may split differently "
                      f"({plan().why or 'a run of over ' + str(chunks.PIECE_CHARS // 2) + ' characters without a space'}); "
                      "token counts there may differ by a few tokens per cut", stacklevel=2)
    if acc.sum() == 0:
        raise ds.DatasetError(f"dataset {dataset}: its examples hold no tokens")
    nz = np.flatnonzero(acc)
    return Profile(ids=nz, counts=acc[nz], vocab_size=int(acc.size),
                   tokenizer_hash=tokenizer_hash(tokenizer),
                   dataset_hash=ds.content_hash(dataset, split, fields),
                   fingerprint=ds.fingerprint(dataset, split), n_examples=n,
                   source=str(dataset), fields=fields)


def profile_dataset(dataset, tokenizer, *, cache=None, fields: Iterable[str] = ds.DEFAULT_FIELDS,
                    split: str = "train", progress: bool = False) -> Profile:
    """A profile of ``dataset``; ``cache`` (a ``.npz`` path) is reused when the tokenizer and the
    dataset are unchanged (same files, sizes and mtimes, or same content hash), else rebuilt and
    rewritten. A ``.npz`` given as ``dataset`` is loaded and checked against the tokenizer."""
    prof, fresh = cached_profile(dataset, tokenizer, cache=cache, fields=fields, split=split,
                                 progress=progress)
    if fresh and cache is not None:
        prof.save(cache)
    return prof


def cached_profile(dataset, tokenizer, *, cache=None, fields: Iterable[str] = ds.DEFAULT_FIELDS,
                   split: str = "train", progress: bool = False) -> tuple[Profile, bool]:
    """:func:`profile_dataset` without writing anything: ``(profile, fresh)``, ``fresh`` when it
    was built (``cache`` missing or stale) and so is for the caller to save."""
    fields = tuple(fields)
    tok_hash = tokenizer_hash(tokenizer)
    if Path(dataset).suffix == ".npz":
        prof = Profile.load(dataset)
        prof.check_tokenizer(tok_hash, str(dataset))
        return prof, False
    if cache is not None and Path(cache).is_file():
        try:
            prof = Profile.load(cache)
        except ProfileError:
            prof = None
        if prof is not None and prof.tokenizer_hash == tok_hash and tuple(prof.fields) == fields:
            if prof.fingerprint == ds.fingerprint(dataset, split):
                return prof, False
            if prof.dataset_hash == ds.content_hash(dataset, split, fields):
                return prof, False
    return build_profile(dataset, tokenizer, fields=fields, split=split, progress=progress), True


def widen(m, v: int):
    """The stacked profiles ``m`` (scipy CSR or the core's :class:`CSR`) with ``v`` columns: queries
    may use added tokens beyond the bank's vocabulary. Needs no scipy for the core's CSR."""
    if hasattr(m, "_replace"):   # the core's CSR (no scipy)
        return m._replace(n_cols=v)
    import scipy.sparse as sp

    return sp.csr_array((m.data, m.indices, m.indptr), shape=(m.shape[0], v))


def stack_against(queries, bank, *, core: bool = False):
    """``(queries, bank profiles)`` as two CSR matrices of one width: the queries' profiles
    stacked and the bank's (anything with ``vocab_size`` and ``profiles()``), both as wide as the
    widest vocabulary among them (queries may use added tokens beyond the bank's). ``core``: both
    as the core's :class:`loramix.core.divergence.CSR` (all the compiled metrics need; no scipy
    import, 0.2-0.4 s of a small run)."""
    v = max([bank.vocab_size] + [q.vocab_size for q in queries])
    bm = bank.profiles(core=True) if core else bank.profiles()
    return stack(queries, v, core=core), (widen(bm, v) if bm.shape[1] != v else bm)


def stack(profiles, vocab_size: int | None = None, *, core: bool = False):
    """Profiles as one ``scipy.sparse.csr_array`` (rows = profiles), float64 counts; with
    ``core``, or without scipy (the base install leaves it out), the core's own
    :class:`loramix.core.divergence.CSR`, which the compiled metrics (js, kl, wd) take as well."""
    v = vocab_size or max(p.vocab_size for p in profiles)
    indptr = np.zeros(len(profiles) + 1, dtype=np.int64)
    for i, p in enumerate(profiles):
        if p.ids.size and int(p.ids.max()) >= v:
            raise ProfileError(f"profile {p.source}: token id {int(p.ids.max())} beyond vocab {v}")
        indptr[i + 1] = indptr[i] + p.ids.size
    idx = np.concatenate([p.ids for p in profiles]).astype(np.int64) if profiles else np.zeros(0, np.int64)
    val = np.concatenate([p.counts for p in profiles]).astype(np.float64) if profiles else np.zeros(0)
    return csr_matrix(indptr, idx, val, v, core=core)


def _bar(progress, desc, unit):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, file=__import__("sys").stderr, leave=False)


def query_profile(d, bank, *, fields, split: str = "train", cache=None, progress: bool = False) -> "Profile":
    """The token profile of a query for ``bank`` (anything with ``tokenizer_path`` and
    ``tokenizer_hash``): a :class:`Profile` or saved ``.npz`` (checked against the bank's
    tokenizer), or a dataset path, profiled (and cached in the folder ``cache`` if given)."""
    if isinstance(d, Profile):
        d.check_tokenizer(bank.tokenizer_hash, d.source or "given profile")
        return d
    path = Path(d)
    if path.suffix == ".npz":
        p = Profile.load(path)
        p.check_tokenizer(bank.tokenizer_hash, str(path))
        return p
    c = None   # no profile is written next to the user's data unless a cache folder is given
    if cache:
        c = Path(cache) / f"{ds.dataset_name(path)}.{tokenizer_hash(bank.tokenizer_path)[:12]}.npz"
    return profile_dataset(path, bank.tokenizer_path, cache=c, fields=fields, split=split,
                                progress=progress)
