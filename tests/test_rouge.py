"""loramix.evaluation.rouge must equal rouge_score's RougeScorer(["rougeL"], use_stemmer=True) exactly."""
from __future__ import annotations

import random

import numpy as np
import pytest

from rouge_score import rouge_scorer

from loramix.evaluation.rouge import rouge_l, rouge_l_multi, tokenize  # noqa: E402

WORDS = (
    "the cat sat on mat running runs ran happily happiness generously generalization "
    "caresses ponies ties caress cats feed agreed plastered bled motoring sing conflated "
    "troubled sized hopping tanned falling hissing fizzed failing filing happy sky relational "
    "conditional rational valenci hesitanci digitizer conformabli radicalli differentli vileli "
    "analogousli vietnamization predication operator feudalism decisiveness hopefulness "
    "callousness formaliti sensitiviti sensibiliti triplicate formative formalize electriciti "
    "electrical hopeful goodness revival allowance inference airliner gyroscopic adjustable "
    "defensible irritant replacement adjustment dependent adoption homologou communism activate "
    "angulariti homologous effective bowdlerize probate rate cease controll roll dying lying "
    "news innings outings cannings howe proceed exceed succeed generous io a I x 42 3.14 1,000"
).split()
ODD = ["café", "naïve", "Straße", "İstanbul", "\u212aelvin", "日本語", "emoji🙂ok", "a—b",
       "x_y", "it's", "e.g.", "--", "\t\n", "  ", "ÀÉÎÕÜ", "ﬁne", "ǅ", "ΣΊΣΥΦΟΣ"]


def _text(rnd: random.Random) -> str:
    kind = rnd.random()
    if kind < 0.05:
        return ""
    if kind < 0.08:
        return rnd.choice(["!!!", "   ", "...", "日本", "\n"])
    n = rnd.randint(1, 12) if kind < 0.9 else rnd.randint(100, 400)
    out = []
    for _ in range(n):
        r = rnd.random()
        if r < 0.7:
            w = rnd.choice(WORDS)
        elif r < 0.8:
            w = rnd.choice(ODD)
        elif r < 0.9:
            w = str(rnd.randint(0, 10**rnd.randint(1, 6)))
        else:
            w = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyzABC0123-.,;:'\"()éü") for _ in range(rnd.randint(1, 10)))
        if rnd.random() < 0.3:
            w = w.upper() if rnd.random() < 0.5 else w.capitalize()
        out.append(w + rnd.choice(["", "", ",", ".", "!", "?", ";", ")"]))
    return rnd.choice([" ", "  ", "\n", "\t"]).join(out)


def _pairs(n: int, seed: int):
    rnd = random.Random(seed)
    preds, refs = [], []
    for _ in range(n):
        r = _text(rnd)
        if rnd.random() < 0.4 and r:  # a noisy copy shares a long subsequence
            toks = r.split()
            p = " ".join(t for t in toks if rnd.random() < 0.7) + " " + _text(rnd)
        else:
            p = _text(rnd)
        preds.append(p)
        refs.append(r)
    return preds, refs


def test_equals_rouge_score_on_random_pairs():
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    preds, refs = _pairs(1500, 7)
    P, R, F = rouge_l(preds, refs)
    exp = np.array([[s.precision, s.recall, s.fmeasure]
                    for s in (sc.score(r, p)["rougeL"] for p, r in zip(preds, refs))])
    assert P.dtype == np.float64 and P.shape == (1500,)
    np.testing.assert_allclose(np.stack([P, R, F], 1), exp, rtol=0, atol=1e-12)
    assert (exp[:, 2] == 0).sum() > 50 and (exp[:, 2] == 1).sum() > 0 and (exp[:, 2] > 0.3).sum() > 100


def test_tokenize_matches_reference_tokenizer():
    from rouge_score import tokenizers

    ref = tokenizers.DefaultTokenizer(use_stemmer=True)
    rnd = random.Random(3)
    for _ in range(300):
        t = _text(rnd)
        assert tokenize(t) == ref.tokenize(t)
    for w in ODD + WORDS:
        assert tokenize(w) == ref.tokenize(w)


def test_no_stemmer_matches():
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    preds, refs = _pairs(200, 11)
    F = rouge_l(preds, refs, use_stemmer=False)[2]
    exp = [sc.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    np.testing.assert_array_equal(F, exp)


def test_multi_reference_matches_score_multi():
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    preds, refs = _pairs(300, 5)
    rnd = random.Random(1)
    multi = [[r] + [_text(rnd) for _ in range(rnd.randint(0, 3))] for r in refs]
    P, R, F = rouge_l_multi(preds, multi)
    exp = np.array([[s.precision, s.recall, s.fmeasure]
                    for s in (sc.score_multi(m, p)["rougeL"] for p, m in zip(preds, multi))])
    np.testing.assert_array_equal(np.stack([P, R, F], 1), exp)


def test_edges():
    P, R, F = rouge_l([], [])
    assert P.shape == (0,)
    assert rouge_l([""], [""])[2][0] == 0.0
    assert rouge_l(["a b c"], ["a b c"])[2][0] == 1.0
    with pytest.raises(ValueError):
        rouge_l(["a"], [])
    with pytest.raises(TypeError):
        rouge_l([None], ["a"])
    with pytest.raises(ValueError):
        rouge_l_multi(["a"], [[]])
