"""Every metric and pipeline name reaches its own formula, end to end through ``generate``.

Each case compares what ``loramix.generate`` recorded (distances and weights in the result)
with an independent float64 numpy oracle of *that* metric/pipeline, and checks that the oracles
of the other names give different numbers on the same data — so a registry that silently routed
``kl``/``wd``/``mmd`` to ``js`` (or ``attentional`` to ``normalized``) fails here.
"""
from __future__ import annotations

import numpy as np
import pytest

from loramix.bank.bank import Bank
from loramix.pipeline import generate
from loramix.profiles.tokens import build_profile

EPS = 1e-10
BANDWIDTHS = (0.2, 0.5, 0.9, 1.3)


def _dense(counts_ids, v):
    ids, counts = counts_ids
    x = np.zeros(v)
    np.add.at(x, np.asarray(ids), np.asarray(counts, np.float64))
    return x / x.sum()


def js(p, q):
    p, q = p + EPS, q + EPS
    m = (p + q) / 2
    return 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))


def kl(p, q):
    p, q = p + EPS, q + EPS
    return np.sum(p * np.log(p / q))


def wd(p, q):
    return np.sum(np.abs(np.cumsum(p) - np.cumsum(q)))


def mmd(p, q):
    v = np.arange(p.size, dtype=np.float64)
    lag = v[:, None] - v[None, :]
    K = sum(a * a / (a * a + lag * lag) for a in BANDWIDTHS)
    return max(p @ K @ p + q @ K @ q - 2 * p @ K @ q, 0.0)


ORACLES = {"js": js, "kl": kl, "wd": wd, "mmd": mmd}


def softmin(d, t):
    x = -d / t
    e = np.exp(x - x.max())
    return e / e.sum()


def standardized(d):
    sd = d.std()
    return (d - d.mean()) / (sd if sd > 0 else 1.0)


PIPELINES = {"attentional": lambda d, t: softmin(d, t), "normalized": lambda d, t: softmin(standardized(d), t)}


@pytest.fixture(scope="module")
def setup(w):
    bank = Bank.open(w.bank)
    q = w.queries["animals_q"]
    qp = build_profile(q, bank.tokenizer_path)
    v = max(bank.vocab_size, qp.vocab_size)
    P = _dense((qp.ids, qp.counts), v)
    R = bank.profiles().toarray()
    R = np.pad(R, ((0, 0), (0, v - R.shape[1]))) / R.sum(axis=1, keepdims=True)
    return bank, q, P, R


@pytest.mark.parametrize("metric", sorted(ORACLES))
def test_metric_name_reaches_its_own_formula(setup, metric, tmp_path):
    bank, q, P, R = setup
    res = generate(q, bank, tmp_path / "out", metric=metric, pipeline="attentional")
    want = np.array([ORACLES[metric](P, r) for r in R])
    np.testing.assert_allclose(res.distances, want, rtol=1e-9, atol=1e-12)
    for other, fn in ORACLES.items():   # the data tell the formulas apart
        if other != metric:
            assert not np.allclose([fn(P, r) for r in R], want, rtol=1e-3), (metric, other)


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_pipeline_name_reaches_its_own_formula(setup, pipeline, temperature, tmp_path):
    bank, q, P, R = setup
    res = generate(q, bank, tmp_path / "out", metric="js", pipeline=pipeline, temperature=temperature)
    d = np.array([js(P, r) for r in R])
    want = PIPELINES[pipeline](d, temperature)
    np.testing.assert_allclose(res.weights, want, rtol=1e-9, atol=1e-15)
    for other, fn in PIPELINES.items():
        if other != pipeline:
            assert not np.allclose(fn(d, temperature), want, rtol=1e-3), (pipeline, other)


def test_unknown_names_are_refused(setup, tmp_path):
    bank, q, _, _ = setup
    with pytest.raises(ValueError, match="unknown metric 'jsx'"):
        generate(q, bank, tmp_path / "a", metric="jsx")
    with pytest.raises(ValueError, match="unknown pipeline 'normal'"):
        generate(q, bank, tmp_path / "b", pipeline="normal")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
