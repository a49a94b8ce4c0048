"""``loramix eval retrieval`` and ``protocol="paper"``: scores against hand-computed and brute-force
references, the paper's leave-one-out transcribed in numpy."""
from __future__ import annotations

import json

import numpy as np
import pytest

from loramix import weights as W
from loramix.evaluation import retrieval as R


def _ref_scores(D, cats, srcs, Wt=None):
    """Brute force: per query, the sorted list of (distance, index) over allowed members."""
    out = []
    n = len(cats)
    for q in range(n):
        allowed = [j for j in range(n) if j != q and not (srcs[q] & srcs[j])]
        if not any(cats[j] == cats[q] for j in allowed):
            continue
        ranked = [j for _, j in sorted((D[q][j], j) for j in allowed)]
        hits = [cats[j] == cats[q] for j in ranked]
        r = {"p1": float(hits[0]), "p5": sum(hits[:5]) / len(hits[:5]), "mrr": 1.0 / (hits.index(True) + 1)}
        if Wt is not None:
            r["same_weight"] = sum(Wt[q][j] for j in allowed if cats[j] == cats[q])
            r["effective"] = 1.0 / sum(Wt[q][j] ** 2 for j in range(n))
        out.append(r)
    return {k: float(np.mean([r[k] for r in out])) for k in out[0]}, len(out)


def test_scores_hand_example():
    # 4 tasks: a0, a1 (category A, different sources), b0, b1 (category B, same source "s")
    cats = ["A", "A", "B", "B"]
    srcs = [frozenset({"x"}), frozenset({"y"}), frozenset({"s"}), frozenset({"s"})]
    D = np.array([[0, .5, .1, .9],
                  [.5, 0, .2, .3],
                  [.1, .2, 0, .05],
                  [.9, .3, .05, 0]])
    s = R.score(D, None, cats, srcs)
    # b0 and b1 share their source: no same-category member left -> not queries
    assert s["queries"] == 2
    # a0: ranking b0 (.1), a1 (.5), b1 (.9) -> P@1 0, MRR 1/2, P@5 = 1/3
    # a1: ranking b0 (.2), b1 (.3), a0 (.5) -> P@1 0, MRR 1/3, P@5 = 1/3
    assert s["overall"]["p1"] == 0.0
    assert s["overall"]["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert s["overall"]["p5"] == pytest.approx(1 / 3)
    assert s["overall"]["chance"] == pytest.approx(1 / 3)
    Wt = np.array([[0, .6, .4, 0], [.5, 0, .25, .25], [0] * 4, [0] * 4])
    s = R.score(D, Wt, cats, srcs)
    assert s["overall"]["same_weight"] == pytest.approx((.6 + .5) / 2)
    assert s["overall"]["effective"] == pytest.approx((1 / (.36 + .16) + 1 / (.25 + .0625 * 2)) / 2)
    assert s["categories"]["A"]["n"] == 2 and "B" not in s["categories"]


def test_scores_equal_brute_force(rng):
    n = 23
    cats = [str(c) for c in rng.integers(0, 4, n)]
    srcs = [frozenset({f"s{int(v)}"}) for v in rng.integers(0, 9, n)]
    D = rng.uniform(0, 1, (n, n))
    _, excl, _ = R.masks(cats, srcs)
    Wt = W.mixing_weights(D, "normalized", temperature=0.5, exclude=excl)
    ref, nq = _ref_scores(D, cats, srcs, Wt)
    s = R.score(D, Wt, cats, srcs)
    assert s["queries"] == nq
    for k, v in ref.items():
        assert s["overall"][k] == pytest.approx(v, abs=1e-12), k


def _write_tasks(tmp_path):
    words = {"A": "alpha beta gamma delta", "B": "one two three four five", "C": "red green blue"}
    labels = []
    d = tmp_path / "tasks"
    d.mkdir()
    for cat, text in words.items():
        for k in range(3):
            name = f"t{cat}{k}"
            rows = [{"input": f"Definition: {text} task {k}\nInput: {text} {i} {k}", "output": [f"{text[:5]} {i}"]}
                    for i in range(6)]
            (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            labels.append({"name": name, "categories": [cat], "sources": [f"src{cat}{k % 2}"]})
    (tmp_path / "tasks.json").write_text(json.dumps(labels))
    return d


def test_evaluate_retrieval_on_files_equals_reference(tmp_path):
    from loramix.core.divergence import divergence

    d = _write_tasks(tmp_path)
    ts = R.load_tasks(d)   # labels found one folder up; the shipped mini bank's tokenizer
    assert ts.names == sorted(f"t{c}{k}" for c in "ABC" for k in range(3))
    s = R.evaluate_retrieval(ts, metrics=["js"], pipelines=["attentional", "normalized"], temperature=0.5)
    # reference: JS straight from the core on dense counts, weights from the registered pipeline
    dense = ts.counts.toarray()
    D = divergence(dense, dense, metric="js")
    _, excl, _ = R.masks(ts.categories, ts.sources)
    for p in ("attentional", "normalized"):
        Wt = W.mixing_weights(D, p, temperature=0.5, exclude=excl)
        ref, nq = _ref_scores(D, ts.categories, ts.sources, Wt)
        got = s["systems"][f"{p}-js"]["overall"]
        for k, v in ref.items():
            assert got[k] == pytest.approx(v, abs=1e-12), (p, k)
    # tA0 and tA2 share a source; the same-category member from another source is tA1, etc.
    assert s["queries"] == 9
    table = R.markdown_table(s)
    assert "| normalized-js |" in table and "P@1 by category" in table


def test_labels_errors_name_the_file(tmp_path):
    bad = tmp_path / "tasks.json"
    bad.write_text(json.dumps([{"name": "x"}]))
    with pytest.raises(R.RetrievalError, match="tasks.json.*categories"):
        R.read_labels(bad)
    (tmp_path / "elsewhere" / "tasks").mkdir(parents=True)
    with pytest.raises(R.RetrievalError, match="no tasks.json"):
        R.load_tasks(tmp_path / "elsewhere" / "tasks")


def _paper_loo_weights(D, i, T=1.0):
    """The paper's leave-one-out, transcribed: StandardScaler on the whole row (self-distance
    included), self set to +inf, torch-style Softmin."""
    row = np.asarray(D[i], dtype=np.float64).copy()
    z = (row - row.mean()) / row.std()
    z[i] = np.inf
    e = np.exp(-(z - z[np.isfinite(z)].min()) / T)
    return e / e.sum()


@pytest.mark.parametrize("T", [1.0, 0.4])
def test_protocol_paper_equals_transcription(rng, T):
    n = 12
    D = rng.uniform(0.05, 0.7, (n, n))
    D = (D + D.T) / 2
    np.fill_diagonal(D, 0.0)
    excl = np.eye(n, dtype=bool)
    got = W.mixing_weights(D, "normalized", temperature=T, exclude=excl, protocol="paper")
    ref = np.stack([_paper_loo_weights(D, i, T) for i in range(n)])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-13)
    # attentional has no row statistics: both protocols agree
    np.testing.assert_allclose(W.mixing_weights(D, "attentional", exclude=excl, protocol="paper"),
                               W.mixing_weights(D, "attentional", exclude=excl), rtol=0, atol=1e-14)
    # loramix's default leaves the self-distance out of mean/std: a different, documented result
    dflt = W.mixing_weights(D, "normalized", temperature=T, exclude=excl)
    assert np.abs(dflt - got).max() > 1e-3
    with pytest.raises(W.WeightsError, match="unknown protocol"):
        W.mixing_weights(D, "normalized", exclude=excl, protocol="nope")
