"""Rouge-L, exactly as the ``rouge_score`` package computes it, but fast.

``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)`` is the reference the paper
(and Lots-of-LoRAs) report with. Its per-example cost is a Python tokenizer, an uncached Porter
stemmer and a pure-Python O(m·n) LCS table. Here:

- tokenization follows ``rouge_score.tokenize.tokenize`` step by step (``str.lower``, every run of
  characters outside ``[a-z0-9]`` becomes one space, split, stem tokens longer than 3 characters,
  drop tokens that are not ``^[a-z0-9]+$``), with the very stemmer ``rouge_score`` builds
  (``nltk.stem.porter.PorterStemmer()``, i.e. NLTK_EXTENSIONS mode) behind a cache, so stems are
  exact by construction;
- tokens become integer ids, and the LCS of every pair runs in numba (one row of the table, pairs
  in parallel);
- precision, recall and F use the same float64 operations in the same order as ``rouge_score``
  (``lcs/len(pred)``, ``lcs/len(ref)``, ``2PR/(P+R)``), so results are bit-identical.

An empty side (no tokens after tokenization) scores 0/0/0, as in ``rouge_score``.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

try:
    import numba
except ImportError:   # evaluation only: the base install leaves numba out
    raise ImportError("Rouge-L scoring (loramix eval, the demo's scores) needs numba, which is not "
                      "installed: pip install 'loramix[eval]'") from None

__all__ = ["rouge_l", "rouge_l_multi", "tokenize"]

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALID = re.compile(r"^[a-z0-9]+$")
# bytes -> bytes: [a-z0-9] and NUL kept, everything else a space (see _Encoder.encode)
_BYTE_TABLE = bytes(c if (97 <= c <= 122 or 48 <= c <= 57 or c == 0) else 32 for c in range(256))

_stemmer = None
_stem_cache: dict[str, str] = {}


def _stem(word: str) -> str:
    s = _stem_cache.get(word)
    if s is None:
        global _stemmer
        if _stemmer is None:
            from nltk.stem import porter  # the stemmer rouge_score uses

            _stemmer = porter.PorterStemmer()
        s = _stemmer.stem(word)
        if len(_stem_cache) < 2_000_000:  # bound memory on adversarial input
            _stem_cache[word] = s
    return s


def tokenize(text: str, stem: bool = True) -> list[str]:
    """Tokens of ``text`` as ``rouge_score``'s default tokenizer gives them."""
    words = _NON_ALNUM.sub(" ", text.lower()).split()
    if stem:
        words = [_stem(w) if len(w) > 3 else w for w in words]
    # rouge_score drops anything that is not [a-z0-9]+ after stemming; stems of such words are
    # always valid, but keep the check so the contract is the reference's, not an assumption.
    return [w for w in words if _VALID.match(w)]


@numba.njit(cache=True, nogil=True)
def _lcs(ref, ro, rn, pred, po, pn, row):
    # One DP row over the prediction; `row` is scratch of length >= pn + 1.
    for j in range(pn + 1):
        row[j] = 0
    for i in range(rn):
        r = ref[ro + i]
        diag = 0  # table[i-1][j-1]
        for j in range(1, pn + 1):
            up = row[j]
            if r == pred[po + j - 1]:
                row[j] = diag + 1
            elif row[j - 1] > up:
                row[j] = row[j - 1]
            diag = up
    return row[pn]


@numba.njit(cache=True, parallel=True, nogil=True)
def _score_pairs(ref_ids, ref_off, pred_ids, pred_off, out):
    n = ref_off.shape[0] - 1
    for k in numba.prange(n):
        ro, rn = ref_off[k], ref_off[k + 1] - ref_off[k]
        po, pn = pred_off[k], pred_off[k + 1] - pred_off[k]
        if rn == 0 or pn == 0:
            out[k, 0] = 0.0
            out[k, 1] = 0.0
            out[k, 2] = 0.0
            continue
        # Keep the DP row over the shorter side: the LCS length is symmetric.
        if pn <= rn:
            row = np.empty(pn + 1, np.int64)
            lcs = _lcs(ref_ids, ro, rn, pred_ids, po, pn, row)
        else:
            row = np.empty(rn + 1, np.int64)
            lcs = _lcs(pred_ids, po, pn, ref_ids, ro, rn, row)
        p = lcs / pn
        r = lcs / rn
        out[k, 0] = p
        out[k, 1] = r
        out[k, 2] = 2 * p * r / (p + r) if p + r > 0 else 0.0


class _Encoder:
    """Texts -> flat int32 token ids + offsets; one vocabulary per call.

    The fast path lowercases and cleans all distinct texts as one string (joined by NUL, which
    ``[^a-z0-9]`` would otherwise turn into a space; ``str.lower`` maps characters one by one and
    never yields NUL), splits once, and stems each distinct word once. Texts holding a NUL take
    the per-text path, which is ``tokenize`` itself.
    """

    def __init__(self, stem: bool):
        self.stem = stem
        self.vocab: dict[str, int] = {}  # token (stem) -> id
        self.word_id: dict[bytes, int] = {}  # raw word -> id of its token

    def _id_of_word(self, w: str) -> int:
        t = _stem(w) if self.stem and len(w) > 3 else w
        if not _VALID.match(t):
            return -1
        return self.vocab.setdefault(t, len(self.vocab))

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        uniq: dict[str, int] = {}
        which = [uniq.setdefault(t, len(uniq)) for t in texts]
        u = list(uniq)
        if any("\x00" in t for t in u):
            toks = [tokenize(t, self.stem) for t in u]
            lens = [len(x) for x in toks]
            flat = [w for x in toks for w in x]
            ids = [self.vocab.setdefault(w, len(self.vocab)) for w in flat]
        else:
            # All non-ASCII characters end up as separators, so ASCII bytes suffice: one
            # encode, one byte translate, one split; words per text counted in numpy.
            b = "\x00".join(u).lower().encode("ascii", "replace").translate(_BYTE_TABLE)
            lens = _words_per_text(np.frombuffer(b, np.uint8), len(u))
            flat = b.replace(b"\x00", b" ").split()
            wid = self.word_id
            for w in set(flat).difference(wid):
                wid[w] = self._id_of_word(w.decode("ascii"))
            ids = list(map(wid.__getitem__, flat))
            if min(ids, default=0) < 0:  # a stem outside [a-z0-9]+: never seen, kept exact
                toks = [tokenize(t, self.stem) for t in u]
                lens = [len(x) for x in toks]
                ids = [self.vocab.setdefault(w, len(self.vocab)) for x in toks for w in x]
        u_ids = np.asarray(ids, np.int32)
        u_off = np.zeros(len(u) + 1, np.int64)
        np.cumsum(lens, out=u_off[1:])
        which_a = np.asarray(which, np.int64)
        n_tok = (u_off[1:] - u_off[:-1])[which_a] if len(texts) else np.zeros(0, np.int64)
        off = np.zeros(len(texts) + 1, np.int64)
        np.cumsum(n_tok, out=off[1:])
        return _gather(u_ids, u_off, which_a, off), off


@numba.njit(cache=True, nogil=True)
def _words_per_text(a, n):
    # a: cleaned bytes (letters/digits, spaces, NUL between texts)
    lens = np.zeros(n, np.int64)
    t = 0
    prev_word = False
    for c in a:
        if c == 0:
            t += 1
            prev_word = False
        elif c == 32:
            prev_word = False
        else:
            if not prev_word:
                lens[t] += 1
            prev_word = True
    return lens


@numba.njit(cache=True, nogil=True)
def _gather(u_ids, u_off, which, off):
    out = np.empty(off[-1], np.int32)
    for k in range(which.shape[0]):
        s = u_off[which[k]]
        for i in range(off[k + 1] - off[k]):
            out[off[k] + i] = u_ids[s + i]
    return out


def _check_str(name: str, texts: Sequence[str]) -> None:
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"{name} must be strings, got {type(t).__name__}")


def rouge_l(
    predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-example Rouge-L precision, recall and F (float64 arrays), pair ``k`` being
    ``(predictions[k], references[k])``; equal to
    ``RougeScorer(["rougeL"], use_stemmer=...).score(references[k], predictions[k])``."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    _check_str("predictions", predictions)
    _check_str("references", references)
    enc = _Encoder(use_stemmer)
    p_ids, p_off = enc.encode(predictions)
    r_ids, r_off = enc.encode(references)
    out = np.zeros((len(predictions), 3), np.float64)
    if len(predictions):
        _score_pairs(r_ids, r_off, p_ids, p_off, out)
    return out[:, 0].copy(), out[:, 1].copy(), out[:, 2].copy()


def rouge_l_multi(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    use_stemmer: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like ``RougeScorer.score_multi``: per prediction, the scores against the reference with the
    highest F (the first such reference on ties). Each entry of ``references`` is a non-empty list
    of strings (a bare string counts as one reference)."""
    predictions = list(predictions)
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(predictions) != len(refs):
        raise ValueError(f"{len(predictions)} predictions but {len(refs)} reference lists")
    if any(len(r) == 0 for r in refs):
        raise ValueError("every prediction needs at least one reference")
    owner = np.repeat(np.arange(len(refs)), [len(r) for r in refs])
    p, r, f = rouge_l([predictions[i] for i in owner], [x for rs in refs for x in rs],
                      use_stemmer=use_stemmer)
    P = np.zeros(len(refs))
    R = np.zeros(len(refs))
    F = np.full(len(refs), -1.0)
    for k, i in enumerate(owner):  # strict '>' keeps the first maximum, like np.argmax
        if f[k] > F[i]:
            P[i], R[i], F[i] = p[k], r[k], f[k]
    return P, R, F
