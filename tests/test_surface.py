"""The public surface of issue 13: ``loramix.divergence`` for every histogram metric, the all-pairs
cosine, instructions found without labels, the hybrid metric's fallback, ``eval retrieval`` and
``--cap`` on the command line."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import loramix
from loramix import weights as W
from loramix.profiles import instruction as ins


def test_top_level_divergence_dispatches_mmd_to_dense_oracle(rng):
    import scipy.sparse as sp

    P = rng.integers(0, 4, (3, 40)).astype(float)
    R = rng.integers(0, 4, (5, 40)).astype(float)
    v = P.shape[1]
    lag = np.subtract.outer(np.arange(v), np.arange(v)).astype(float)
    K = sum(a * a / (a * a + lag ** 2) for a in W.MMD_BANDWIDTHS)
    p, r = P / P.sum(1, keepdims=True), R / R.sum(1, keepdims=True)
    ref = np.einsum("iv,vw,iw->i", p, K, p)[:, None] + np.einsum("jv,vw,jw->j", r, K, r)[None, :] - 2 * p @ K @ r.T
    np.testing.assert_allclose(loramix.divergence(P, R, metric="mmd"), ref, rtol=1e-9, atol=1e-12)
    c = sp.csr_array(R)
    csr = loramix.CSR(c.indptr, c.indices, c.data, v)
    np.testing.assert_allclose(loramix.divergence(P, csr, metric="mmd"), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(loramix.divergence(R, metric="mmd"), loramix.divergence(R, R, metric="mmd"))
    # the core's metrics go to the core, unchanged
    from loramix.core.divergence import divergence as core

    np.testing.assert_array_equal(loramix.divergence(P, R, metric="js"), core(P, R, metric="js"))
    with pytest.raises(ValueError, match="unknown metric 'nope'.*mmd"):
        loramix.divergence(P, R, metric="nope")


def test_cosine_distances_all_pairs_equal_sklearn(rng):
    from sklearn.metrics.pairwise import cosine_distances as skl

    A, B = rng.normal(size=(4, 7)), rng.normal(size=(6, 7))
    np.testing.assert_allclose(loramix.cosine_distances(A, B), skl(A, B), atol=1e-12)
    np.testing.assert_allclose(loramix.cosine_distances(A), skl(A, A), atol=1e-12)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_instruction_text_common_prefix_and_fallback(tmp_path):
    rows = [{"input": f"Definition: name the capital city.\n\nInput: count{i}ry {i}", "output": ["x"]} for i in range(5)]
    text, fb = ins.instruction_text(_jsonl(tmp_path / "a.jsonl", rows))
    assert text == "Definition: name the capital city.\n\nInput:"   # cut back to whitespace, stripped
    assert fb[0] == rows[0]["input"] + "x" and len(fb) == 5
    short = [{"input": f"Q{i}: what?", "output": ["y"]} for i in range(20)]
    text, fb = ins.instruction_text(_jsonl(tmp_path / "b.jsonl", short))
    assert text is None and len(fb) == ins.FALLBACK_EXAMPLES
    one = ins.instruction_text(_jsonl(tmp_path / "c.jsonl", rows[:1]))[0]
    assert one == rows[0]["input"].strip()   # a single example is its own instruction


def test_hybrid_falls_back_to_js_without_encoder(monkeypatch):
    from loramix.weights import hybrid

    class FakeBank:
        pass

    monkeypatch.setattr(hybrid, "_encoder_available", lambda enc: False)
    monkeypatch.setattr(hybrid, "_token_distances", lambda *a, **k: np.array([[0.1, 0.2]]))
    with pytest.warns(RuntimeWarning, match="no sentence encoder"):
        d = hybrid.hybrid_metric(["q"], FakeBank(), fields=("input", "output"))
    np.testing.assert_array_equal(d, [[0.1, 0.2]])
    # the combination itself: each row standardized, equal halves
    a, b = np.array([[1.0, 2.0, 4.0]]), np.array([[0.3, 0.1, 0.2]])
    z = lambda x: (x - x.mean()) / x.std()   # noqa: E731
    np.testing.assert_allclose(hybrid.hybrid_distances(a, b), 0.5 * z(a) + 0.5 * z(b), atol=1e-15)


def test_cli_eval_retrieval_matches_api(tmp_path):
    from loramix.evaluation import retrieval as R

    d = tmp_path / "tasks"
    d.mkdir()
    labels = []
    for cat, words in (("A", "red green blue"), ("B", "one two three four")):
        for k in range(3):
            rows = [{"input": f"{words} {i} {k}", "output": [words.split()[i % 3]]} for i in range(8)]
            _jsonl(d / f"{cat}{k}.jsonl", rows)
            labels.append({"name": f"{cat}{k}", "categories": [cat], "sources": [f"{cat}{k}"]})
    (d / "tasks.json").write_text(json.dumps(labels))
    r = subprocess.run([sys.executable, "-m", "loramix.cli", "eval", "retrieval", "--tasks", str(d),
                        "--metrics", "js", "kl", "--pipelines", "normalized", "--json", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    api = R.evaluate_retrieval(R.load_tasks(d), metrics=["js", "kl"], pipelines=["normalized"])
    for k in ("normalized-js", "normalized-kl"):
        assert doc["systems"][k]["overall"] == pytest.approx(api["systems"][k]["overall"])
    assert doc["queries"] == 6 and (tmp_path / "o" / "table.md").is_file()
    bad = subprocess.run([sys.executable, "-m", "loramix.cli", "eval", "retrieval", "--tasks", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "loramix: error:" in bad.stderr and "tasks.json" in bad.stderr


def test_cli_generate_cap_and_protocol_reach_the_metric(tmp_path_factory, tmp_path, monkeypatch):
    import _tiny
    from loramix.weights import cosine

    w = _tiny.world(tmp_path_factory)
    seen = {}
    real = cosine.cosine_metric

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setitem(W.METRICS, "cosine", (spy, "embedding"))
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    from loramix.cli import main

    out = tmp_path / "o"
    assert main(["generate", str(w.queries["animals_q"]), "--bank", str(w.bank), "-o", str(out), "--metric",
                 "cosine", "--cap", "5", "--protocol", "paper", "--exclude", "m3", "--quiet"]) == 0
    assert seen["cap"] == 5
    prov = json.loads((out / "loramix.json").read_text())
    assert prov["metric_options"]["cap"] == "5" and prov["protocol"] == "paper"
