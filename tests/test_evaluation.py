"""Evaluation primitives: scores, bootstrap intervals, resumable tables, batched generation."""
from __future__ import annotations

import numpy as np
import pytest

from loramix.evaluation.generation import (ResultsTable, _encode_prompts, bootstrap_ci, evaluate_adapter,
                                evaluate_style_ci, generate, load_base, load_examples, normalize,
                                score, summarize)


def test_score_per_example():
    s = score(["Paris", "the answer is cold.", "", "red blue"],
              [["paris"], ["cold", "hot"], ["x"], ["blue red"]])
    np.testing.assert_array_equal(s["exact"], [1, 0, 0, 0])
    np.testing.assert_array_equal(s["subseq"], [1, 1, 0, 0])
    assert s["rougeL"][0] == 1.0 and s["rougeL"][2] == 0.0 and s["rougeL"][3] == 0.5
    assert normalize("  Hello,   World! ") == "hello world"
    assert score(["cold"], [["colder"]])["subseq"][0] == 0  # word boundaries, not substrings


def test_bootstrap_ci():
    rng = np.random.default_rng(1)
    v = rng.random(40)
    m, lo, hi = bootstrap_ci(v, seed=3)
    assert m == pytest.approx(v.mean()) and lo < m < hi
    assert bootstrap_ci(v, seed=3) == (m, lo, hi)
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert np.isnan(bootstrap_ci([])[0])
    # percentile bootstrap of the mean: close to the normal interval for a decent n
    se = v.std(ddof=1) / np.sqrt(v.size)
    assert lo == pytest.approx(m - 1.96 * se, abs=0.3 * se) and hi == pytest.approx(m + 1.96 * se, abs=0.3 * se)


def test_evaluate_style_ci_is_scipy_bca():
    from scipy import stats

    v = np.random.default_rng(2).random(100)
    m, lo, hi = evaluate_style_ci(v, seed=7)
    bs = stats.bootstrap((v,), np.mean, n_resamples=9999, confidence_level=0.95, method="BCa",
                         vectorized=True, rng=np.random.default_rng(7))
    assert (lo, hi) == (bs.confidence_interval.low, bs.confidence_interval.high)


def test_summarize():
    per = {"a": {"rougeL": np.array([1.0, 0.0])}, "b": {"rougeL": np.array([1.0, 1.0, 1.0, 1.0])}}
    s = summarize(per)
    assert s["per_task"] == {"a": 0.5, "b": 1.0} and s["mean_over_tasks"] == 0.75
    assert s["evaluate_style"]["mean_over_examples"] == pytest.approx(5 / 6)


def test_results_table_resumes(tmp_path):
    p = tmp_path / "r.csv"
    t = ResultsTable(p)
    assert not t.done("x", "base")
    t.add("x", "base", {"rougeL": [1.0, 0.0], "exact": [1, 0], "subseq": [1, 1]})
    t2 = ResultsTable(p)
    assert t2.done("x", "base") and not t2.done("x", "own")
    assert t2.get("x", "base")["rougeL"] == 0.5 and t2.get("x", "base")["n"] == 2
    t2.add("x", "own", {"rougeL": [1.0], "exact": [1], "subseq": [1]})
    assert len(p.read_text().splitlines()) == 3  # one header


@pytest.fixture(scope="module")
def tiny_bank(tiny_minibank):
    return tiny_minibank


def test_prompt_cut_by_tokens_keeps_bos_and_end(tiny_bank):
    _, tok = load_base(tiny_bank)
    p = "Return the last fruit.\nInput: apple, banana, cherry, grape, lemon, mango\nOutput:"
    full = _encode_prompts(tok, [p], 10_000)[0]
    cut = _encode_prompts(tok, [p], 8)[0]
    assert len(cut) == 8 and cut[0] == tok.bos_token_id == full[0] and cut[1:] == full[-7:]


def test_batched_generation_equals_one_by_one(tiny_bank):
    model, tok = load_base(tiny_bank)
    task = sorted(p.name for p in (tiny_bank / "bank").iterdir())[0]
    ex = load_examples(tiny_bank / "bank" / task / "train.jsonl", limit=6)
    prompts = [e["input"] for e in ex] + ["Count the items.\nInput: a\nOutput:"]
    batched = generate(model, tok, prompts, max_new_tokens=5, batch_size=4)
    single = [generate(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single


def test_evaluate_adapter_leaves_base_untouched(tiny_bank):
    model, tok = load_base(tiny_bank)
    task = sorted(p.name for p in (tiny_bank / "bank").iterdir())[0]
    ex = load_examples(tiny_bank / "bank" / task / "test.jsonl")
    before = evaluate_adapter(None, None, ex, model=model, tokenizer=tok, max_new_tokens=4)
    with_lora = evaluate_adapter(None, tiny_bank / "bank" / task, ex, model=model, tokenizer=tok, max_new_tokens=4)
    after = evaluate_adapter(None, None, ex, model=model, tokenizer=tok, max_new_tokens=4)
    assert before["predictions"] == after["predictions"]
    assert set(with_lora) == {"predictions", "rougeL", "exact", "subseq"} and len(with_lora["rougeL"]) == len(ex)
    assert not any("lora" in n for n, _ in model.named_modules())
