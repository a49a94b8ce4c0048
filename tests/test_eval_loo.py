"""The leave-one-out harness on a tiny mini bank: weights as generate() computes them, pipeline
discovery, the cache index, mixed-adapter batches, resuming, the summary and the CLI."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import _tiny

from loramix.evaluation import loo as eval_loo
from loramix import weights as wts

import peft  # noqa: F401  (the test extra installs it; never skip)
ROOT = Path(__file__).resolve().parents[1]


def _listing(d: Path) -> dict:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def tiny(tiny_minibank, tmp_path_factory):
    root = tiny_minibank
    cache = tmp_path_factory.mktemp("cache")
    return root, cache


@pytest.fixture(scope="module")
def opened(tiny):
    from loramix.bank.bank import Bank

    root, cache = tiny
    bp = eval_loo.resolve_bank(root, cache=cache)
    return bp, Bank.open(bp.bank)


def test_index_goes_to_the_cache_and_is_reused(tiny, tmp_path):
    root, _ = tiny
    before = _listing(root)
    bp = eval_loo.resolve_bank(root, cache=tmp_path)
    assert (bp.bank / "bank.json").is_file() and bp.bank.is_relative_to(tmp_path)
    assert bp.base == root / "base" and bp.manifest["scale"] == "tiny"
    assert _listing(root) == before   # nothing written into the bank
    again = eval_loo.resolve_bank(root / "bank", cache=tmp_path)   # the bank/ folder itself works too
    assert again.bank == bp.bank and again.base == root / "base"


def test_weights_equal_generate_with_exclude(opened, tmp_path):
    from loramix.pipeline import generate

    bp, bank = opened
    systems = eval_loo.plan_systems(["attentional", "normalized"], ["js", "kl"], ("factors",))
    W, D, errors = eval_loo.loo_weights(bank, bank.names, systems, temperature=0.7)
    assert not errors and {"uniform", "nearest-js", "normalized-js", "attentional-kl"} <= set(W)
    for k, task in enumerate(bank.names):
        i = bank.index(task)
        train = eval_loo.train_split(bank.members[i].path)
        for p, m in (("normalized", "js"), ("attentional", "kl")):
            r = generate(train, bank, tmp_path / f"{task}-{p}-{m}", pipeline=p, metric=m,
                         temperature=0.7, exclude=[task])
            np.testing.assert_allclose(W[f"{p}-{m}"][task], r.weights, rtol=0, atol=1e-15)
        for s in W:
            assert W[s][task][i] == 0 and abs(W[s][task].sum() - 1) < 1e-12
        near = W["nearest-js"][task]
        assert near.max() == 1 and np.argmax(near) == np.argmin(np.where(np.arange(len(near)) == i,
                                                                          np.inf, D["js"][k]))


def test_same_source_members_are_left_out_like_generate_exclude(opened, tmp_path):
    """``sources`` (tasks.json): members sharing a source dataset with the held-out task get no
    weight, and the weights equal generate(..., exclude=[task and its same-source members])."""
    from loramix.pipeline import generate

    _, bank = opened
    names = bank.names
    sources = {n: frozenset({f"src{k // 2}"}) for k, n in enumerate(names)}   # pairs share a source
    mask = eval_loo.exclusion_mask(bank, list(range(len(names))), sources)
    for q, n in enumerate(names):
        want = {m for m in names if sources[m] & sources[n]}
        assert {names[j] for j in np.flatnonzero(mask[q])} == want and len(want) == (2 if q // 2 * 2 + 1 < len(names) else 1)
    systems = eval_loo.plan_systems(["normalized"], ["js"], ("factors",), neural_metrics=[])
    W, _, errors = eval_loo.loo_weights(bank, names[:3], systems, temperature=0.7, sources=sources)
    assert not errors
    for task in names[:3]:
        same = sorted(m for m in names if sources[m] & sources[task])
        r = generate(eval_loo.train_split(bank.members[bank.index(task)].path), bank, tmp_path / task,
                     pipeline="normalized", metric="js", temperature=0.7, exclude=same)
        np.testing.assert_allclose(W["normalized-js"][task], r.weights, rtol=0, atol=1e-15)
        assert all(W[s][task][bank.index(m)] == 0 for s in W for m in same)


def test_registered_pipelines_and_metrics_are_discovered(opened):
    _, bank = opened

    @wts.register_pipeline("test-argmin")
    def _argmin(d, **_):
        w = np.zeros_like(d)
        w[np.argmin(d)] = 1
        return w

    def _broken(d, **_):
        raise RuntimeError("needs a trained model")

    wts.register_pipeline("test-broken")(_broken)
    try:
        names = [s.name for s in eval_loo.plan_systems()]
        assert {"test-argmin-js", "test-argmin-mmd", "normalized-wd", "test-broken-kl"} <= set(names)
        W, _, errors = eval_loo.loo_weights(bank, bank.names[:2], eval_loo.plan_systems(metrics=["js"]))
        assert "test-argmin-js" in W and "test-broken-js" in errors and "needs a trained model" in errors["test-broken-js"]
    finally:
        wts.PIPELINES.pop("test-argmin", None)
        wts.PIPELINES.pop("test-broken", None)


def test_mixed_adapter_batch_equals_one_adapter_at_a_time(opened):
    from loramix.evaluation import generation as ev

    bp, bank = opened
    model, tok = eval_loo.load_base(bp.base)
    a, b = bank.members[0], bank.members[2]
    exs = ev.load_examples(eval_loo.test_split(a.path))
    preds, model = eval_loo.predict_systems(model, tok, exs, {"a": a.path, "b": b.path},
                                            max_new_tokens=6, batch_size=5)
    for name, folder in (("base", None), ("a", a.path), ("b", b.path)):
        one = ev.evaluate_adapter(None, folder, exs, model=model, tokenizer=tok, max_new_tokens=6)
        assert preds[name] == one["predictions"]
    assert not any("lora" in n for n, _ in model.named_modules())

    # slots reused across calls: tensors copied into a slot give what a fresh load gives
    aset = eval_loo.AdapterSet(model)
    c, d = bank.members[1], bank.members[3]
    gen = dict(max_new_tokens=6)
    first = aset.predict(tok, exs, {"x": a.path, "y": b.path}, **gen)
    slot_x = aset.slots["x"][0]
    again = aset.predict(tok, exs, {"x": c.path, "y": d.path}, **gen)
    assert aset.slots["x"][0] == slot_x   # reused, not reloaded
    import torch
    from safetensors.torch import load_file

    params = dict(aset.pm.named_parameters())
    want = load_file(str(c.path / "adapter_model.safetensors"))
    for k, v in want.items():
        assert torch.equal(params[k.replace(".weight", f".{slot_x}.weight")], v)
    assert not torch.equal(want[next(iter(want))], load_file(str(a.path / "adapter_model.safetensors"))[next(iter(want))])
    model = aset.close()
    for name, folder in (("x", c.path), ("y", d.path)):
        assert again[name] == ev.evaluate_adapter(None, folder, exs, model=model, tokenizer=tok, **gen)["predictions"]
    assert first["x"] == preds["a"] and not any("lora" in n for n, _ in model.named_modules())


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_leave_one_out_runs_resumes_and_refuses_other_settings(tiny, tmp_path):
    root, cache = tiny
    out = tmp_path / "loo"
    kw = dict(tasks=["last_fruit_1", "second_animal_2"], limit=2, pipelines=["normalized"], metrics=["js"],
              modes=("factors", "svd"), cache=cache, max_new_tokens=4, temperatures=[0.5])
    logs = []
    s = eval_loo.leave_one_out(root, out, log=logs.append, **kw)
    names = {"base", "task-lora", "uniform", "nearest-js", "normalized-js", "normalized-js-svd",
             "normalized-js-T0.5"}
    assert set(s["systems"]) == names
    rows = _rows(out / "results.csv")
    assert len(rows) == 2 * len(names) and {r["n"] for r in rows} == {"2"}
    ex = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    assert len(ex) == len(rows) and all(len(e["predictions"]) == 2 for e in ex)
    table = (out / "table.md").read_text()
    assert "Rouge-L mean [95% CI over tasks]" in table and "evaluate-style" in table and "| normalized-js-svd |" in table
    assert len([m for m in logs if m.startswith("[")]) == 2

    # an interruption after one task: drop the second task's rows; only those are recomputed
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["task"] == "last_fruit_1")
    logs.clear()
    eval_loo.leave_one_out(root, out, log=logs.append, **kw)
    assert [m.split(":")[0] for m in logs if m.startswith("[")] == ["[2/2] second_animal_2"]
    assert sorted(map(str, _rows(out / "results.csv"))) == sorted(map(str, rows))
    logs.clear()
    eval_loo.leave_one_out(root, out, log=logs.append, **kw)   # all done: nothing recomputed
    assert not [m for m in logs if m.startswith("[")]
    with pytest.raises(ValueError, match="other settings"):
        eval_loo.leave_one_out(root, out, **{**kw, "limit": 3})
    w = json.loads((out / "weights.json").read_text())["weights"]
    assert max(w["normalized-js-T0.5"]["last_fruit_1"]) > max(w["normalized-js"]["last_fruit_1"])
    v = eval_loo.leave_one_out(root, tmp_path / "valid", split="valid", keep_adapters=True, **kw)
    prov = json.loads((tmp_path / "valid" / "adapters" / "last_fruit_1" / "normalized-js-T0.5" / "loramix.json").read_text())
    assert prov["temperature"] == 0.5 and prov["weights"]["last_fruit_1"] == 0
    assert v["systems"]["base"]["examples"] == 4


def test_summary_findings_from_a_results_table(tmp_path):
    rng = np.random.default_rng(0)
    with open(tmp_path / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "system", "n", "rougeL", "exact", "subseq"])
        for t in range(20):
            for s, mu in (("base", 0.1), ("normalized-js", 0.5), ("attentional-js", 0.3), ("task-lora", 0.9),
                          ("normalized-js-T0.1", 0.7), ("nearest-js", 0.8)):
                w.writerow([f"t{t}", s, 4, mu + rng.normal(0, 0.03), 0, 0])
    s = eval_loo.summarize_results(tmp_path)
    f = s["findings"]
    assert f["best_generated"] == "normalized-js" and f["best_above_base_ci_disjoint"]
    assert f["best_below_task_lora_ci_disjoint"] and 0.4 < f["gap_closed"] < 0.6
    d = s["systems"]["normalized-js"]["delta_vs_base"]
    assert d[1] < 0.4 < d[2]
    assert "**normalized-js**" in (tmp_path / "table.md").read_text()


def test_summary_default_vs_paper_is_paired_and_gap_shares_are_exact(tmp_path):
    """The pre-registered comparison: loramix's default system minus the paper's pipeline, paired
    over tasks (percentile bootstrap of the per-task differences), and each one's share of the
    base→task-LoRA gap as mean(system − base) / mean(task LoRA − base), recomputed here."""
    from loramix.evaluation.generation import bootstrap_ci
    from loramix.evaluation.report import default_and_paper_systems

    dflt, paper = default_and_paper_systems()
    assert paper == "normalized-js" and dflt.startswith("normalized-") and "-T" in dflt
    rng = np.random.default_rng(1)
    vals = {}
    with open(tmp_path / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "system", "n", "rougeL", "exact", "subseq"])
        for t in range(12):
            lvl = rng.uniform(0, 0.3)   # task difficulty: cancels in the paired differences
            for s, mu in (("base", 0.1), (paper, 0.3), (dflt, 0.35), ("task-lora", 0.6)):
                vals[(t, s)] = lvl + mu + rng.normal(0, 0.01)
                w.writerow([f"t{t}", s, 4, vals[(t, s)], 0, 0])
    s = eval_loo.summarize_results(tmp_path)
    f = s["findings"]
    order = sorted(range(12), key=lambda t: f"t{t}")   # the summary's task order: by name
    want = list(bootstrap_ci([vals[(t, dflt)] - vals[(t, paper)] for t in order]))
    np.testing.assert_allclose(f["default_minus_paper"], want, rtol=0, atol=1e-12)
    assert f["default_minus_paper"][1] > 0 and f["default_vs_paper_tasks"] == 12
    gap = np.mean([vals[(t, "task-lora")] - vals[(t, "base")] for t in range(12)])
    for key, sysname in (("gap_closed_default", dflt), ("gap_closed_paper", paper)):
        np.testing.assert_allclose(f[key], np.mean([vals[(t, sysname)] - vals[(t, "base")] for t in range(12)]) / gap,
                                   rtol=1e-12)
    table = (tmp_path / "table.md").read_text()
    assert f"loramix's default ({dflt}) − the paper's pipeline ({paper}), paired over 12 tasks" in table
    assert "the CI excludes 0" in table


def test_cli_leave_one_out(tiny, tmp_path):
    root, cache = tiny
    env = {**os.environ, "PYTHONPATH": str(_tiny.PKG_PARENT), "LORAMIX_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "-m", "loramix.cli", "eval", "leave-one-out", "--bank", str(root),
                        "--tasks", "last_fruit_2", "--limit", "2", "--systems", "normalized-js",
                        "--max-new-tokens", "3", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| **normalized-js** | 1 |" in r.stdout and "[1/1] last_fruit_2" in r.stderr
    assert len(_rows(tmp_path / "o" / "results.csv")) == 3
    bad = subprocess.run([sys.executable, "-m", "loramix.cli", "eval", "leave-one-out", "--bank", str(root),
                          "--tasks", "nope", "--out", str(tmp_path / "o2")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and "no such task(s) in the bank: nope" in bad.stderr


# --------------------------------------------------------------------------- neural, fold-trained

def _families(bp):
    return {t: v.get("family") for t, v in bp.manifest["tasks"].items()}


def test_fold_assignment_is_seeded_and_stratified():
    tasks = [f"{f}_{i}" for f in "abc" for i in range(6)]
    fams = {t: t.split("_")[0] for t in tasks}
    a = eval_loo.fold_assignment(tasks, 6, seed=3, families=fams)
    assert a == eval_loo.fold_assignment(tasks, 6, seed=3, families=fams)
    assert a != eval_loo.fold_assignment(tasks, 6, seed=4, families=fams)
    for f in "abc":   # each family spread over the folds: one task of it per fold
        assert sorted(a[t] for t in tasks if fams[t] == f) == list(range(6))
    assert set(eval_loo.fold_assignment(tasks, 100).values()) == set(range(len(tasks)))   # K >= N: LOO


def test_fold_members_leave_out_held_out_tasks_and_same_data(opened):
    _, bank = opened
    names = bank.names
    fold_of = {t: k % 2 for k, t in enumerate(names)}
    h = names[0]
    twin = names[1]   # pretend fold 1's first task was trained on the data of fold 0's first task
    old = bank.members[1].info.get("dataset_hash")
    bank.members[1].info["dataset_hash"] = bank.members[0].info["dataset_hash"]
    try:
        fm = eval_loo.fold_members(bank, names, fold_of)
    finally:
        bank.members[1].info["dataset_hash"] = old
    assert fm[0]["held_out"] == [t for t in names if fold_of[t] == 0]
    assert h not in fm[0]["train_members"] and twin not in fm[0]["train_members"]
    assert h not in fm[1]["train_members"] and twin not in fm[1]["train_members"]
    for f in fm:
        assert not set(f["held_out"]) & set(f["train_members"])


def test_neural_fold_combiners_never_see_the_held_out_task(opened, tmp_path):
    from loramix.weights import gram as gram_mod
    from loramix.weights import neural
    from loramix.pipeline import generate

    bp, bank = opened
    systems = eval_loo.plan_systems(["normalized", "neural"], ["js"], ("factors",), neural_metrics=["js"])
    assert [s.name for s in systems if s.kind == "neural"] == ["neural-js"]
    fams = _families(bp)
    W, errors, info = eval_loo.neural_loo_weights(bank, bank.names, systems, folds=4, seed=0, families=fams)
    assert not errors and set(W) == {"neural-js"}
    assert info["systems"]["neural-js"]["features"] == neural.feature_names_for(["js"]) == ["js", "js:z"]
    combs = info["systems"]["neural-js"]["combiners"]
    D = neural.distance_matrices(bank, ["js"])
    mask = eval_loo.exclusion_mask(bank, list(range(len(bank.names))))
    for f, fm in enumerate(info["fold_members"]):
        assert fm["held_out"] and not set(fm["held_out"]) & set(fm["train_members"])
        assert all(info["fold_of"][t] == f for t in fm["held_out"])
        # the combiner equals one trained on exactly the training members
        tr = [bank.index(n) for n in fm["train_members"]]
        comb, hist, _ = neural.fit_combiner(D, gram_mod.bank_gram(bank), tr, hidden=16, seed=f)
        np.testing.assert_array_equal(comb.params.W1, combs[f].params.W1)
        q = [bank.index(t) for t in fm["held_out"]]
        X, _ = neural.features_from({"js": D["js"][q]}, exclude=mask[q])
        want = combs[f].weights(X, mask[q])
        for k, t in enumerate(fm["held_out"]):
            np.testing.assert_allclose(W["neural-js"][t], want[k], rtol=0, atol=1e-6)
            assert W["neural-js"][t][bank.index(t)] == 0
        # and generate(..., pipeline="neural", exclude=[task]) with that fold's combiner agrees
        path = combs[f].save(tmp_path / f"fold{f}.onnx", bank_hash=bank.hash, pipeline={"metrics": ["js"]})
        t = fm["held_out"][0]
        r = generate(eval_loo.train_split(bank.members[bank.index(t)].path), bank, tmp_path / f"g{f}",
                     pipeline="neural", metric="js", exclude=[t], pipeline_options={"combiner": str(path)})
        np.testing.assert_allclose(r.weights, W["neural-js"][t], rtol=0, atol=1e-6)
    W2, _, _ = eval_loo.neural_loo_weights(bank, bank.names, systems, folds=4, seed=0, families=fams)
    for t in bank.names:   # deterministic
        np.testing.assert_array_equal(W2["neural-js"][t], W["neural-js"][t])


def test_leave_one_out_has_the_neural_system(tiny, tmp_path):
    root, cache = tiny
    out = tmp_path / "loo"
    s = eval_loo.leave_one_out(root, out, tasks=["last_fruit_1", "second_animal_2"], limit=2,
                               pipelines=["normalized", "neural"], metrics=["js"], modes=("factors",),
                               cache=cache, max_new_tokens=3, neural_folds=6, neural_seed=1)
    assert "neural-js" in s["systems"] and not s["skipped_systems"]
    assert {r["system"] for r in _rows(out / "results.csv")} >= {"neural-js", "normalized-js"}
    run = json.loads((out / "run.json").read_text())
    assert run["neural"]["folds"] == 2 and run["neural"]["seed"] == 1 and run["neural"]["hidden"] == 16
    assert run["neural"]["features"] == {"neural-js": ["js", "js:z"]}
    nj = json.loads((out / "neural.json").read_text())
    for fm in nj["fold_members"]:
        assert not set(fm["held_out"]) & set(fm["train_members"])
    assert "| neural-js |" in (out / "table.md").read_text()
