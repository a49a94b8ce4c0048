"""Tokenizing long examples in bounded pieces, with the same token counts as the whole text.

The ``tokenizers`` library keeps every token of an ``encode`` call in memory with its string,
offsets and masks (~175 bytes of RAM per byte of text): one 8 MB example costs ~1.5 GB and a
200 MB one aborts. :func:`encoded_ids` therefore hands the tokenizer at most
:data:`PIECE_CHARS` characters of one example and :data:`BATCH_CHARS` characters per call.

An example longer than :data:`PIECE_CHARS` is cut just before a single space that sits between
two non-space characters (``"word| next"``). Whether that changes nothing is decided once per
tokenizer by :func:`cut_plan` from its ``tokenizer.json``:

- a pre-tokenizer that splits at such a space anyway (``Whitespace``, ``WhitespaceSplit``,
  ``BertPreTokenizer``, ``ByteLevel`` with its GPT-2 regex, ``Metaspace`` with ``split``, a
  ``Split`` with the GPT-2 or Llama-3 pattern, alone or in a ``Sequence`` with local splitters)
  never lets a model (BPE merges, WordPiece, Unigram) join characters across it, so the pieces'
  tokens are exactly the whole text's; the space starts the next piece, so ``add_prefix_space``
  and Metaspace's ``prepend_scheme`` add nothing there;
- with no splitting pre-tokenizer (Metaspace ``split=false``, the Llama/Mistral
  ``Prepend("▁")`` + ``Replace(" ", "▁")`` normalizer, byte-level BPE without regex), a BPE
  model is still exact when no token of its vocabulary holds a non-space symbol followed by the
  space symbol (SentencePiece-trained vocabularies satisfy this), since no merge can then span
  the cut; with the ``Prepend`` normalizer the cut space is dropped (the normalizer puts it back);
- normalizers must be character-local (NFC/NFD/NFKC/NFKD, Lowercase, Nmt, BertNormalizer);
  ``Strip`` or another ``Prepend`` make the plan inexact.

The special tokens a post-processor adds are counted once per example: the first piece is
encoded with them, the others without.

Where the plan is inexact, or an example has a run of more than ``PIECE_CHARS // 2`` characters
with no such space (one giant "word"), the text is still cut (memory stays bounded) and only
the tokens of the pre-token or word that holds each cut can differ from the whole-text
tokenization: at most a few tokens per :data:`PIECE_CHARS` characters. :func:`encoded_ids`
reports these cuts through ``stats["forced_cuts"]``.

Memory (``benches/bench_profile_memory.py``, one JSON line, shipped tokenizer): peak anonymous
memory 1,507 MiB before this module and 88 MiB after for an 8 MB line; 451 MiB for 200 MB
(before: killed under a 6 GB cap), the reader then holding the line and its parsed string. A
JSON line over 4 MB is now parsed by :mod:`loramix.data.jsonstream` and its text comes here as
an iterable of decoded parts (never joined; :func:`pieces` cuts it exactly as the whole str):
77 MiB for 8 MB and 79 MiB for 200 MB, whatever the line's length.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

__all__ = ["PIECE_CHARS", "BATCH_CHARS", "CutPlan", "cut_plan", "pieces", "encoded_ids"]

#: longest text (characters) given whole to the tokenizer; longer examples are cut in pieces
PIECE_CHARS = 1 << 16
#: characters per ``encode_batch`` call (bounds the tokenizer's per-call memory)
BATCH_CHARS = 1 << 18

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_SPACE_SPLITTING_PATTERNS = {
    _GPT2,
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_LOCAL_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Nmt", "BertNormalizer", "StripAccents"}
_LOCAL_SPLITTERS = {"Digits", "Punctuation", "UnicodeScripts"}


@dataclass(frozen=True)
class CutPlan:
    """How one tokenizer's long examples are cut. ``exact``: cuts at ``"word| next"`` change no
    token count. ``drop_space``: the cut space is left out of the next piece (a ``Prepend``
    normalizer puts it back). ``avoid_after``: added tokens that swallow the space after them
    (``rstrip``), or any added token when ``drop_space``; no cut is made right after one
    (``avoid_before``: right before one). ``why``: the reason when not exact."""

    exact: bool
    drop_space: bool = False
    avoid_after: tuple = ()
    avoid_before: tuple = ()
    why: str = ""


def _types(node) -> list[dict]:
    """A normalizer/pre-tokenizer node flattened (``Sequence`` expanded), in order."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        subs = node.get("normalizers") or node.get("pretokenizers") or []
        return [x for s in subs for x in _types(s)]
    return [node]


def _splits_at_space(pt: dict) -> bool:
    t = pt.get("type")
    if t in ("Whitespace", "WhitespaceSplit", "BertPreTokenizer"):
        return True
    if t == "ByteLevel":
        return bool(pt.get("use_regex", True))
    if t == "Metaspace":
        return bool(pt.get("split", True))
    if t == "Split":
        pat = pt.get("pattern") or {}
        if pat.get("String") == " ":
            return True
        return pat.get("Regex") in _SPACE_SPLITTING_PATTERNS and pt.get("behavior") in (
            "Isolated", "Removed", "MergedWithNext") and not pt.get("invert", False)
    return False


def _local_pre(pt: dict) -> bool:
    t = pt.get("type")
    return t in _LOCAL_SPLITTERS or (t == "ByteLevel" and not pt.get("use_regex", True)) or \
        _splits_at_space(pt)


def _bpe_never_crosses(model: dict, space: str) -> bool:
    """No vocabulary token has a non-space symbol followed by ``space``: no BPE merge can join
    the characters on both sides of a cut made before a space."""
    if model.get("type") != "BPE":
        return False
    vocab = model.get("vocab") or {}
    bad = re.compile(f"[^{re.escape(space)}]{re.escape(space)}")
    return not any(bad.search(t) for t in vocab)


def cut_plan(tokenizer_json) -> CutPlan:
    """The :class:`CutPlan` of a tokenizer, from its ``tokenizer.json`` (a path or the parsed dict)."""
    doc = tokenizer_json if isinstance(tokenizer_json, dict) else \
        json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    added = doc.get("added_tokens") or []
    avoid = tuple(a["content"] for a in added if a.get("rstrip") and a.get("content"))
    if any(re.search(r"\s", a.get("content", "")) for a in added):
        return CutPlan(False, why="an added token holds whitespace")
    norms = _types(doc.get("normalizer"))
    pres = _types(doc.get("pre_tokenizer"))
    model = doc.get("model") or {}
    prepend = [n for n in norms if n.get("type") in ("Prepend", "Replace")]
    others = [n for n in norms if n not in prepend]
    if any(n.get("type") not in _LOCAL_NORMALIZERS for n in others):
        return CutPlan(False, avoid_after=avoid, why="normalizer " + "+".join(n.get("type", "?") for n in norms))
    if prepend:
        # the Llama/Mistral legacy pair: Prepend("▁") then Replace(" ", "▁"), no pre-tokenizer
        kinds = [n.get("type") for n in prepend]
        p = next((n for n in prepend if n.get("type") == "Prepend"), None)
        r = next((n for n in prepend if n.get("type") == "Replace"), None)
        ok = kinds == ["Prepend", "Replace"] and p and r and (r.get("pattern") or {}).get("String") == " " \
            and r.get("content") == p.get("prepend") and not pres
        if not ok or not _bpe_never_crosses(model, p["prepend"]):
            return CutPlan(False, avoid_after=avoid, why="normalizer " + "+".join(kinds))
        # Prepend acts on each stretch between added tokens: never cut next to one
        every = tuple(a["content"] for a in added if a.get("content"))
        return CutPlan(True, drop_space=True, avoid_after=every, avoid_before=every)
    if pres and any(_splits_at_space(p) for p in pres) and all(_local_pre(p) for p in pres):
        return CutPlan(True, avoid_after=avoid)
    if len(pres) <= 1 and all(p.get("type") in ("Metaspace", "ByteLevel") for p in pres):
        # no split before the model: exact only when no BPE merge can span a space
        space = {"Metaspace": (pres[0].get("replacement") or "▁") if pres else "",
                 "ByteLevel": "Ġ"}.get(pres[0].get("type")) if pres else " "
        if _bpe_never_crosses(model, space):
            return CutPlan(True, avoid_after=avoid)
    return CutPlan(False, avoid_after=avoid,
                   why="pre-tokenizer " + ("+".join(p.get("type", "?") for p in pres) or "none"))


def _cut(text: str, start: int, end: int, plan: CutPlan) -> int:
    """The last cut position in ``(start + PIECE_CHARS // 2, end]`` just before a space between
    two non-space characters, or -1."""
    lo = start + PIECE_CHARS // 2
    i = end
    while True:
        i = text.rfind(" ", lo, i)
        if i <= lo:
            return -1
        if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace() and \
                not any(text.endswith(a, start, i) for a in plan.avoid_after) and \
                not any(text.startswith(a, i + 1) for a in plan.avoid_before):
            return i


def pieces(text, plan: CutPlan, stats: dict | None = None) -> Iterator[str]:
    """``text`` in pieces of at most :data:`PIECE_CHARS` characters, cut as ``plan`` says.
    ``text``: a str, or an iterable of the str parts of one text (a long example read piece by
    piece, :class:`loramix.data.jsonstream.LongText`): the cuts are the same as on the joined
    text, since each is decided with enough of the text after it in hand.
    ``stats["forced_cuts"]`` counts the cuts that may change token counts."""
    parts = iter((text,) if isinstance(text, str) else text)
    # a cut at i looks at text[i + 1] and at an added token starting there
    ahead = PIECE_CHARS + 2 + max(map(len, plan.avoid_before), default=0)
    buf, start, done = "", 0, False
    while True:
        if not done and len(buf) - start <= ahead:
            more, size = [], len(buf) - start
            while size <= ahead:
                p = next(parts, None)
                if p is None:
                    done = True
                    break
                more.append(p)
                size += len(p)
            if more:   # (one str part alone: the text itself, no copy)
                buf = buf[start:] + "".join(more)
                start = 0
        if len(buf) - start <= PIECE_CHARS:
            yield buf[start:]
            return
        c = _cut(buf, start, start + PIECE_CHARS, plan)
        forced = c < 0 or not plan.exact
        if c < 0:
            c = start + PIECE_CHARS
            # never leave a lone surrogate half (text from ``surrogateescape``)
            if "\ud800" <= buf[c - 1] <= "\udbff":
                c -= 1
        if forced and stats is not None:
            stats["forced_cuts"] = stats.get("forced_cuts", 0) + 1
        yield buf[start:c]
        start = c + 1 if (plan.drop_space and buf[c] == " " and not forced) else c


def encoded_ids(tok, texts: Iterable, plan, stats: dict | None = None) -> Iterator[np.ndarray]:
    """Token ids of ``texts`` (special tokens added once per text), as int64 arrays of bounded
    size: texts grouped into ``encode_batch`` calls of at most :data:`BATCH_CHARS` characters,
    long texts cut into :func:`pieces`. A text that is not a str is an iterable of its parts
    (a long example read piece by piece): it is never joined. The multiset of all ids equals that of encoding every text
    whole wherever ``plan`` is exact and no cut was forced. ``plan``: a :class:`CutPlan`, or a
    function giving it, called at the first long text only (most datasets have none, and
    :func:`cut_plan` parses the whole tokenizer.json: ~20 ms for a 32k vocabulary)."""
    group, size = [], 0
    # encode_batch_fast (tokenizers >= 0.21): the same ids without computing character offsets
    encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch

    def flush(batch, special):
        if not batch:
            return None
        encs = encode(batch, add_special_tokens=special)
        return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encs])

    for t in texts:
        if isinstance(t, str) and len(t) <= PIECE_CHARS:
            group.append(t)
            size += len(t)
            if size >= BATCH_CHARS:
                yield flush(group, True)
                group, size = [], 0
            continue
        if callable(plan):
            plan = plan()
        it = pieces(t, plan, stats)
        group.append(next(it))          # the first piece carries the special tokens
        rest, rsize = [], 0
        for p in it:
            rest.append(p)
            rsize += len(p)
            if rsize >= BATCH_CHARS:
                yield flush(rest, False)
                rest, rsize = [], 0
        if rest:
            yield flush(rest, False)
        yield flush(group, True)
        group, size = [], 0
    if group:
        yield flush(group, True)
