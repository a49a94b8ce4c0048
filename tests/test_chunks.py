"""Long examples are tokenized in bounded pieces with the whole text's token counts (issue 10 #10).

The oracle is the tokenizer itself on the whole text (``encode(text, add_special_tokens=True)``);
the pieces are cut small here (``PIECE_CHARS`` lowered) so that many cuts happen in short texts.
"""
from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from loramix.data import jsonstream
from loramix.profiles import chunks, tokens

SHIPPED = Path(__file__).resolve().parents[1] / "python/loramix/minibank/shipped/base/tokenizer.json"
WORDS = ["the", "cat", "Hello,", "world!", "123", "4567", "é", "naïve", "don't", "we'll", "x" * 9, "<s>",
         "foo.bar", "日本語", "🙂", "--", "a-b", "'quoted'", "(x)", "\t", "\n", "  "]


def corpus(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(WORDS) + rng.choice([" ", " ", " ", "", "  ", "\n", " \n "]) for _ in range(n))


def train_bpe(path: Path, kind: str) -> Path:
    """A BPE tokenizer trained here: ``bytelevel`` (GPT-2 style), ``metaspace`` (SentencePiece
    style, split at spaces), ``metaspace-nosplit`` (same vocabulary, Metaspace(split=False): no
    split before the model), ``llama-legacy`` (same vocabulary, Prepend+Replace normalizer, no
    pre-tokenizer: Llama/Mistral tokenizer.json), ``crossing`` (Metaspace(split=False) trained so
    that merges span spaces: cannot be cut exactly)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    specials = ["<unk>", "<s>", "</s>"]
    text = [corpus(s, 400) for s in range(20)]
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        tr = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(split=kind != "crossing")
        tr = trainers.BpeTrainer(vocab_size=600, special_tokens=specials)
    tok.train_from_iterator(text, tr)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    if kind == "metaspace-nosplit":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(split=False)
    if kind == "llama-legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def counts_whole(tok, texts, size):
    out = np.zeros(size, np.int64)
    for t in texts:
        out += np.bincount(tok.encode(t, add_special_tokens=True).ids, minlength=size)
    return out


def counts_pieces(tok, texts, plan, size, stats=None):
    out = np.zeros(size, np.int64)
    for ids in chunks.encoded_ids(tok, texts, plan, stats):
        out += np.bincount(ids, minlength=size)
    return out


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(chunks, "PIECE_CHARS", 300)
    monkeypatch.setattr(chunks, "BATCH_CHARS", 1000)


@pytest.mark.parametrize("kind", ["shipped", "bytelevel", "metaspace", "metaspace-nosplit", "llama-legacy"])
def test_pieces_count_like_the_whole_text(tmp_path, small_pieces, kind):
    path = SHIPPED if kind == "shipped" else train_bpe(tmp_path, kind)
    tok = tokens.load_tokenizer(path)
    plan = chunks.cut_plan(path)
    assert plan.exact, plan.why
    assert plan.drop_space == (kind == "llama-legacy")
    size = tok.get_vocab_size(with_added_tokens=True)
    texts = [corpus(seed, 800) for seed in range(100, 106)] + ["short", "", " lead space " * 40, "x" * 50]
    stats = {}
    got = counts_pieces(tok, texts, plan, size, stats)
    assert stats.get("forced_cuts", 0) == 0
    np.testing.assert_array_equal(got, counts_whole(tok, texts, size))
    assert sum(1 for t in texts if len(t) > chunks.PIECE_CHARS) >= 6   # the cuts were exercised


def test_no_call_sees_more_than_the_bounds(tmp_path, small_pieces):
    tok = tokens.load_tokenizer(SHIPPED)
    seen = []

    class Spy:
        def encode_batch(self, batch, add_special_tokens):
            seen.append([len(t) for t in batch])
            return tok.encode_batch(batch, add_special_tokens=add_special_tokens)

    texts = [corpus(1, 3000), "y" * 5000] + [corpus(s, 20) for s in range(50)]
    with warnings.catch_warnings():
        list(chunks.encoded_ids(Spy(), texts, chunks.cut_plan(SHIPPED)))
    assert max(max(b) for b in seen) <= chunks.PIECE_CHARS
    assert max(sum(b) for b in seen) <= chunks.BATCH_CHARS + chunks.PIECE_CHARS


def test_a_giant_word_is_cut_and_reported(small_pieces):
    tok = tokens.load_tokenizer(SHIPPED)
    plan = chunks.cut_plan(SHIPPED)
    text = "abcdefghij" * 200          # 2000 characters, no space: cut by force
    stats = {}
    ps = list(chunks.pieces(text, plan, stats))
    assert "".join(ps) == text and max(map(len, ps)) <= chunks.PIECE_CHARS
    assert stats["forced_cuts"] == len(ps) - 1
    size = tok.get_vocab_size(with_added_tokens=True)
    got = counts_pieces(tok, [text], plan, size)
    want = counts_whole(tok, [text], size)
    # documented bound: a forced cut changes only the tokens of the word it falls in, near the cut
    assert np.abs(got - want).sum() <= 4 * len(ps)


def test_inexact_tokenizers_are_recognised(tmp_path):
    assert not chunks.cut_plan(train_bpe(tmp_path / "c", "crossing")).exact
    doc = json.loads(SHIPPED.read_text())
    doc["normalizer"] = {"type": "Strip", "strip_left": True, "strip_right": True}
    assert not chunks.cut_plan(doc).exact
    doc = json.loads(SHIPPED.read_text())
    doc["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "[a-z]+"}, "behavior": "Isolated",
                            "invert": False}
    assert not chunks.cut_plan(doc).exact
    doc = json.loads(SHIPPED.read_text())
    doc["added_tokens"].append({"id": 999, "content": "two words", "special": False})
    assert not chunks.cut_plan(doc).exact


def test_rstrip_added_token_is_not_cut_after(tmp_path, small_pieces):
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken("<m>", rstrip=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    plan = chunks.cut_plan(tmp_path / "tokenizer.json")
    assert plan.exact and plan.avoid_after == ("<m>",)
    text = "a <m> b " * 200
    pos = 0
    for p in list(chunks.pieces(text, plan))[:-1]:
        pos += len(p)
        assert not text[:pos].endswith("<m>")


def test_build_profile_on_a_long_line_equals_whole_text(tmp_path, small_pieces):
    path = train_bpe(tmp_path / "tok", "bytelevel")
    rows = [{"input": corpus(7, 600), "output": [corpus(8, 100)]}, {"input": "short", "output": "x"}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = tokens.build_profile(data, path)
    tok = tokens.load_tokenizer(path)
    want = counts_whole(tok, [r["input"] + (r["output"][0] if isinstance(r["output"], list) else r["output"])
                              for r in rows], p.vocab_size)
    np.testing.assert_array_equal(p.dense(np.int64), want)


def test_build_profile_warns_on_inexact_cuts(tmp_path, small_pieces):
    path = train_bpe(tmp_path / "tok", "crossing")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input": corpus(3, 400), "output": ""}) + "\n")
    with pytest.warns(UserWarning, match=r"cut\(s\) of long examples .*tokenizer.json"):
        p = tokens.build_profile(data, path)
    assert p.n_tokens > 0


def in_parts(text: str, seed: int) -> list[str]:
    """``text`` split at random, parts of 1 to 400 characters."""
    rng, parts, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 400)
        parts.append(text[i:i + n])
        i += n
    return parts


@pytest.mark.parametrize("kind", ["shipped", "llama-legacy", "crossing"])
def test_a_text_read_in_parts_is_cut_as_the_whole(tmp_path, small_pieces, kind):
    """A long example read piece by piece (a LongText) is cut exactly where the whole str is,
    forced cuts and the cut space of ``drop_space`` included."""
    plan = chunks.cut_plan(SHIPPED if kind == "shipped" else train_bpe(tmp_path, kind))
    forced = 0
    for seed, text in enumerate([corpus(11, 1500), "abcdefghij" * 150 + corpus(12, 300), " " * 700 + "x"]):
        whole, parts = {}, {}
        want = list(chunks.pieces(text, plan, whole))
        assert list(chunks.pieces(iter(in_parts(text, seed)), plan, parts)) == want
        assert parts == whole and "".join(want).replace(" ", "") == text.replace(" ", "")
        forced += whole.get("forced_cuts", 0)          # the giant word at least
    assert forced >= 4


@pytest.mark.parametrize("kind,ascii_only", [("shipped", True), ("shipped", False), ("bytelevel", True)])
def test_a_streamed_json_line_profiles_like_json_loads_and_whole_text(tmp_path, monkeypatch, kind, ascii_only):
    """Issue 10 #10: a long JSON line read by the streaming parser (``LONG_LINE`` lowered) gives
    the profile file of the ``json.loads`` path byte for byte, and the counts of an independent
    reference: ``json.loads`` and the tokenizer on each whole text."""
    path = SHIPPED if kind == "shipped" else train_bpe(tmp_path / "tok", kind)
    rows = [{"input": corpus(21, 40000), "output": ["the answer", "not this"]},        # ~200K characters
            {"input": "short", "output": "x"}, {"output": corpus(22, 300), "input": corpus(23, 5000), "n": 1}]
    data = tmp_path / "d.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows)
    data.write_bytes(text.encode("utf-8", "surrogatepass"))
    normal = tokens.build_profile(data, path).save(tmp_path / "normal.npz")

    decoded = []
    real = jsonstream._decode
    monkeypatch.setattr(jsonstream, "_decode", lambda raw: decoded.append(len(raw)) or real(raw))
    monkeypatch.setattr(jsonstream, "LONG_LINE", 1000)
    monkeypatch.setattr(jsonstream, "BLOCK", 4099)
    monkeypatch.setattr(jsonstream, "SPAN", 512)
    streamed = tokens.build_profile(data, path)
    assert streamed.save(tmp_path / "streamed.npz").read_bytes() == normal.read_bytes()
    assert len(decoded) > 2 * len(text) // 4099 and max(decoded) <= 2 * 4099    # read in bounded pieces

    tok = tokens.load_tokenizer(path)
    with open(data, encoding="utf-8") as fh:
        recs = [json.loads(line) for line in fh]
    want = counts_whole(tok, [r["input"] + (r["output"][0] if isinstance(r["output"], list) else r["output"])
                              for r in recs], streamed.vocab_size)
    np.testing.assert_array_equal(streamed.dense(np.int64), want)
