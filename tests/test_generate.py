"""generate() and the CLI end to end: outputs load in PEFT, bad inputs fail cleanly, pull, explain."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import _tiny
from loramix import weights as W
from loramix.bank.bank import Bank, BankError
from loramix.data.readers import DatasetError
from loramix.pipeline import OutputError, generate, mix_adapters
from loramix.profiles.tokens import ProfileError, build_profile


def test_generate_api_matches_pipeline_and_loads_in_peft(w, tmp_path):
    import peft  # noqa: F401
    b = Bank.open(w.bank)
    q = w.queries["animals_q"]
    res = generate(q, w.bank, tmp_path / "out", top_k=3, exclude=["m3"], **W.PAPER_DEFAULTS)
    # weights are the paper's normalized pipeline over JS distances to the bank's profiles
    qp = build_profile(q, b.tokenizer_path)
    from loramix.profiles.tokens import stack
    D = W.distances(stack([qp], b.vocab_size), b.profiles(), "js")[0]
    ex = np.array([n == "m3" for n in b.names])
    ref = W.mixing_weights(D, "normalized", top_k=3, exclude=ex)
    np.testing.assert_allclose(res.weights, ref, atol=1e-15)
    assert res.members == b.names and res.weights[b.index("m3")] == 0
    assert res.top(1)[0][0] == "m0"   # the animals member is nearest
    assert res.out == (tmp_path / "out").resolve() or res.out == tmp_path / "out"
    assert _tiny.load_report(w.model, tmp_path / "out") == ([], [])
    prov = json.loads((tmp_path / "out" / "loramix.json").read_text())
    assert prov["pipeline"] == "normalized" and prov["metric"] == "js" and prov["mode"] == "factors"
    assert prov["bank_hash"] == b.hash
    card = (tmp_path / "out" / "README.md").read_text()
    assert "m0" in card and b.hash in card and "normalized" in card
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    from peft import LoraConfig
    LoraConfig(**{k: v for k, v in cfg.items() if k != "peft_type"})   # every key accepted


def _instruction_ref(path):
    """Independent reference of a dataset's instruction embedding: os.path.commonprefix of the
    inputs cut to whitespace, or (shorter than 16 characters) the mean of the first 16 texts."""
    import os

    from loramix.profiles.encoder import embed_texts

    rows = [json.loads(x) for x in path.read_text().splitlines()]
    p = os.path.commonprefix([r["input"] for r in rows])
    if p and not p[-1].isspace():
        p = p[:max(p.rfind(" "), p.rfind("\n")) + 1]
    p = p.strip()
    texts = [p] if len(p) >= 16 else [r["input"] + r["output"][0] for r in rows[:16]]
    return embed_texts(texts).astype(np.float64).mean(axis=0)


def test_generate_default_is_normalized_hybrid_at_quarter(w, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    b = Bank.open(w.bank)
    q = w.queries["animals_q"]
    res = generate(q, w.bank, tmp_path / "out", exclude=["m3"])
    from loramix.profiles.tokens import stack
    js = W.distances(stack([build_profile(q, b.tokenizer_path)], b.vocab_size), b.profiles(), "js")[0]
    E = np.stack([_instruction_ref(m.path / "dataset.jsonl") for m in b.members])
    e = _instruction_ref(q)
    cos = 1 - (E @ e) / np.linalg.norm(E, axis=1) / np.linalg.norm(e)
    z = lambda x: (x - x.mean()) / x.std()   # noqa: E731
    D = 0.5 * z(js) + 0.5 * z(cos)
    ex = np.array([n == "m3" for n in b.names])
    keep = ~ex
    zz = z(D[keep]) / 0.25
    ref = np.zeros(len(D))
    ref[keep] = np.exp(-(zz - zz.min())) / np.exp(-(zz - zz.min())).sum()
    np.testing.assert_allclose(res.weights, ref, atol=1e-6)
    prov = json.loads((tmp_path / "out" / "loramix.json").read_text())
    assert prov["metric"] == "hybrid" and prov["temperature"] == 0.25 and prov["pipeline"] == "normalized"
    assert res.top(1)[0][0] == "m0"


@pytest.mark.parametrize("metric", ["kl", "wd", "mmd"])
def test_other_metrics(w, tmp_path, metric):
    res = generate(w.queries["music_q"], w.bank, tmp_path / "o", metric=metric, pipeline="attentional",
                   mode="svd", rank=2, dtype="bf16")
    assert np.isclose(res.weights.sum(), 1.0) and np.all(res.weights > 0)
    assert _tiny.load_report(w.model, tmp_path / "o") == ([], [])


def test_many_datasets_one_pass(w, tmp_path):
    qs = [w.queries["animals_q"], w.queries["music_q"]]
    res = generate(qs, w.bank, tmp_path / "many", mode="concat")
    assert [r.out.name for r in res] == ["animals_q", "music_q"]
    for r, q in zip(res, qs):
        one = generate(q, w.bank, tmp_path / f"one-{r.out.name}", mode="concat")
        np.testing.assert_allclose(r.weights, one.weights, atol=1e-15)
        from safetensors.numpy import load_file
        a = load_file(str(r.out / "adapter_model.safetensors"))
        b = load_file(str(one.out / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_leave_one_out_and_per_dataset_exclude(w, tmp_path):
    own = [w.members[n] / "dataset.jsonl" for n in ("m0", "m1", "m2")]
    res = generate(own, w.bank, tmp_path / "loo", leave_one_out=True, mode="concat")
    for r, n in zip(res, ("m0", "m1", "m2")):
        i = r.members.index(n)
        assert r.weights[i] == 0 and np.count_nonzero(r.weights) == 3
    res = generate(own[:2], w.bank, tmp_path / "ex", exclude=[["m3"], ["m0", "m2"]])
    assert res[0].weights[3] == 0 and np.count_nonzero(res[0].weights) == 3
    assert np.count_nonzero(res[1].weights) == 2 and res[1].weights[0] == res[1].weights[2] == 0
    prov = json.loads((res[1].out / "loramix.json").read_text())
    assert prov["exclude"] == ["m0", "m2"]


def test_overwrite_is_refused_then_swapped(w, tmp_path):
    out = tmp_path / "o"
    generate(w.queries["animals_q"], w.bank, out)
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="exists"):
        generate(w.queries["music_q"], w.bank, out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    generate(w.queries["music_q"], w.bank, out, overwrite=True)
    assert (out / "adapter_model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]     # no temp or old folder left


# ---------------------------------------------------------------- bad inputs: clear error, no output

def _no_output(tmp_path, out):
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_bad_dataset_inputs(w, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match="no examples"):
        generate(empty, w.bank, out)
    nofield = _tiny.write_jsonl(tmp_path / "nf.jsonl", [{"question": "a cat", "answer": "dog"}])
    with pytest.raises(DatasetError, match="no field 'input'"):
        generate(nofield, w.bank, out)
    other = _tiny.build_tokenizer(tmp_path / "tok2")
    j = json.loads(other.read_text())
    j["model"]["vocab"]["zzz"] = len(j["model"]["vocab"])
    other.write_text(json.dumps(j))
    p = build_profile(w.queries["animals_q"], other)
    p.save(tmp_path / "other.npz")
    with pytest.raises(ProfileError, match="another tokenizer"):
        generate(tmp_path / "other.npz", w.bank, out)
    _no_output(tmp_path, out)


@pytest.mark.parametrize("bad", [[np.nan, 0.5, 0.2, 0.3], [0.0, 0.0, 0.0, 0.0], [np.inf, 0, 0, 0]])
def test_bad_weights(w, tmp_path, bad):
    out = tmp_path / "out"
    with pytest.raises(W.WeightsError):
        mix_adapters(w.bank, np.array(bad), [out])
    _no_output(tmp_path, out)


def test_output_inside_bank_refused(w):
    out = w.bank / "m0" / "mixed"
    with pytest.raises(OutputError, match="inside the bank"):
        generate(w.queries["animals_q"], w.bank, out)
    assert not out.exists()


@pytest.mark.parametrize("problem", ["truncated", "corrupt", "shape", "base"])
def test_broken_bank_member(w, tmp_path, problem):
    bank = tmp_path / "bank"
    shutil.copytree(w.bank, bank)
    st = bank / "m2" / "adapter_model.safetensors"
    if problem == "truncated":
        st.write_bytes(st.read_bytes()[:-7])
    elif problem == "corrupt":
        st.write_bytes(b"garbage" * 40)
    elif problem == "shape":
        from safetensors.numpy import load_file, save_file
        t = load_file(str(st))
        save_file({k: (np.zeros((v.shape[0], 48), np.float32) if "lora_A" in k else v) for k, v in t.items()}, str(st))
    else:
        c = json.loads((bank / "m2" / "adapter_config.json").read_text())
        c["base_model_name_or_path"] = "someone/else"
        (bank / "m2" / "adapter_config.json").write_text(json.dumps(c))
    out = tmp_path / "out"
    with pytest.raises(BankError, match="'m2'"):
        generate(w.queries["animals_q"], bank, out)
    _no_output(tmp_path, out)


def test_mix_failure_midway_leaves_nothing(w, tmp_path, monkeypatch):
    from loramix.mixing import modes as mix

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mix, "mix_exact", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        generate(w.queries["animals_q"], w.bank, out, mode="concat")
    _no_output(tmp_path, out)


# ---------------------------------------------------------------- CLI

def test_cli_end_to_end(w, tmp_path):
    bank = tmp_path / "bank"
    shutil.copytree(w.bank, bank)
    (bank / "bank.json").unlink()
    r = _tiny.run_cli("bank", "build", bank, "--tokenizer", w.model, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["members"] == ["m0", "m1", "m2", "m3"]
    r = _tiny.run_cli("--json", "bank", "info", bank)
    assert r.returncode == 0 and json.loads(r.stdout)["members"] == 4
    r = _tiny.run_cli("profile", w.queries["music_q"], "--bank", bank, "-o", tmp_path / "music.npz", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_examples"] == 16
    r = _tiny.run_cli("generate", tmp_path / "music.npz", "--bank", bank, "-o", tmp_path / "a",
                      "--mode", "svd", "--rank", "2", "--top-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mode"] == "svd" and sum(v != 0 for v in doc["weights"].values()) == 2
    r = _tiny.run_cli("generate", w.queries["animals_q"], w.queries["music_q"], "--bank", bank,
                      "-o", tmp_path / "many", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["adapters"]) == 2
    assert (tmp_path / "many" / "music_q" / "adapter_model.safetensors").is_file()
    r = _tiny.run_cli("explain", tmp_path / "a", "--json")
    assert r.returncode == 0, r.stderr
    png = tmp_path / "a" / "weights.png"
    assert not png.exists() and json.loads(r.stdout)["png"] is None   # a chart only when asked for
    r = _tiny.run_cli("explain", tmp_path / "a", "--json", "--png")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = _tiny.run_cli("explain", tmp_path / "a")
    assert "weight" in r.stdout and "m" in r.stdout
    # errors: one line, non-zero exit, no traceback
    r = _tiny.run_cli("generate", w.queries["animals_q"], "--bank", bank, "-o", tmp_path / "a")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("loramix: error: output") and "Traceback" not in r.stderr
    r = _tiny.run_cli("generate", w.queries["animals_q"], "--bank", bank, "-o", bank / "x")
    assert r.returncode == 1 and "inside the bank" in r.stderr
    r = _tiny.run_cli("generate", tmp_path / "nope.jsonl", "--bank", bank, "-o", tmp_path / "b", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_generation_never_imports_torch(w, tmp_path):
    code = (
        "import sys, _tiny\n"
        "from loramix.pipeline import generate\n"
        f"generate({str(w.queries['animals_q'])!r}, {str(w.bank)!r}, {str(tmp_path / 'o')!r}, mode='svd')\n"
        "from loramix.explain import explain; explain(" + repr(str(tmp_path / "o")) + ")\n"
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {"PYTHONPATH": f"{_tiny.PKG_PARENT}:{_tiny.ROOT / 'tests'}"}
    import os
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=120)
    assert r.returncode == 0, r.stderr


def _fake_hub(root, w):
    """A HF cache at ROOT/hub holding two Lots-of-LoRAs-style adapter repos and their datasets."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    hub = root / "hub"
    repos = []
    for i, (member, topic) in enumerate((("m0", "animals"), ("m1", "food"))):
        rid = f"Lots-of-LoRAs/Mistral-tiny-r4-task00{i}"
        did = f"Lots-of-LoRAs/task00{i}_{topic}_generation"
        sha = f"{i + 1:040x}"
        snap = hub / f"models--{rid.replace('/', '--')}" / "snapshots" / sha
        snap.mkdir(parents=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(w.members[member] / f, snap / f)
        (snap / "README.md").write_text(f"---\nlibrary_name: peft\ndatasets:\n- {did}\n---\n# card\n")
        (snap.parents[1] / "refs").mkdir()
        (snap.parents[1] / "refs" / "main").write_text(sha)
        dsnap = hub / f"datasets--{did.replace('/', '--')}" / "snapshots" / sha
        (dsnap / "data").mkdir(parents=True)
        rows = _tiny.make_examples(topic, 10, seed=i)
        pq.write_table(pa.Table.from_pylist(rows), dsnap / "data" / "train-00000-of-00001.parquet")
        pq.write_table(pa.Table.from_pylist(rows[:2]), dsnap / "data" / "test-00000-of-00001.parquet")
        (dsnap.parents[1] / "refs").mkdir()
        (dsnap.parents[1] / "refs" / "main").write_text(sha)
        repos.append(rid)
    return repos


def test_bank_pull_from_offline_hub_cache(w, tmp_path):
    repos = _fake_hub(tmp_path / "hf", w)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    r = _tiny.run_cli("bank", "pull", *repos, "--to", tmp_path / "bank", "--tokenizer", w.tokenizer,
                      "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [m["dataset"] for m in doc["members"]] == ["Lots-of-LoRAs/task000_animals_generation",
                                                       "Lots-of-LoRAs/task001_food_generation"]
    b = Bank.open(tmp_path / "bank")
    assert b.names == ["Mistral-tiny-r4-task000", "Mistral-tiny-r4-task001"]
    assert b.members[0].info["n_examples"] == 10    # the train split only
    r = _tiny.run_cli("generate", w.queries["animals_q"], "--bank", tmp_path / "bank", "-o", tmp_path / "g", env=env)
    assert r.returncode == 0, r.stderr
    # a repo not in the cache, offline: a one-line error
    r = _tiny.run_cli("bank", "pull", "Lots-of-LoRAs/nope", "--to", tmp_path / "b2", env=env)
    assert r.returncode == 1 and r.stderr.startswith("loramix: error: adapter Lots-of-LoRAs/nope")


def test_bank_pull_api_with_explicit_dataset(w, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from loramix.bank import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repos = _fake_hub(tmp_path / "hf", w)
    recs = hub.pull(repos[:1], tmp_path / "bank", datasets=["Lots-of-LoRAs/task001_food_generation"],
                    cache_dir=tmp_path / "hf" / "hub")
    assert recs[0]["dataset"] == "Lots-of-LoRAs/task001_food_generation"
    assert (tmp_path / "bank" / "Mistral-tiny-r4-task000" / "dataset" / "data" /
            "train-00000-of-00001.parquet").is_file()


def test_member_files_opened_ahead_while_profiling(w, tmp_path):
    """Without top_k the members' files are opened in a background thread while the datasets are
    profiled (after the version and the stored js index): the same adapter, the thread gone when
    generate returns; a file that fails there (changed after the bank was opened) fails in the mix,
    naming it."""
    import threading

    from loramix import pipeline

    def ahead_alive():
        return [t for t in threading.enumerate() if t.name == "loramix-ahead"]

    ref = generate(w.queries["animals_q"], w.bank, tmp_path / "ref")
    bank = Bank.open(w.bank)
    res = generate(w.queries["animals_q"], bank, tmp_path / "out")
    assert not ahead_alive()
    assert all(m._file is not None for m in bank.members)
    assert (res.out / "adapter_model.safetensors").read_bytes() == (ref.out / "adapter_model.safetensors").read_bytes()

    copy = tmp_path / "bank"
    shutil.copytree(w.bank, copy)
    bank = Bank.open(copy)
    (copy / "m2" / "adapter_model.safetensors").write_bytes(b"garbage" * 40)
    out = tmp_path / "broken"
    with pytest.raises(ValueError, match=r"m2/adapter_model\.safetensors"):
        generate(w.queries["animals_q"], bank, out)
    assert not ahead_alive()
    _no_output(tmp_path, out)

    class Member:   # the thread stops at the first file that fails, and at stop()
        def __init__(self, i, seen):
            self.i, self.seen = i, seen

        @property
        def file(self):
            self.seen.append(self.i)
            if self.i == 1:
                raise ValueError("broken")
            return self.i

    seen = []
    ahead = pipeline._Ahead([lambda m=Member(i, seen): m.file for i in range(4)])
    ahead._thread.join(10)
    assert seen == [0, 1] and not ahead_alive()
    ahead.stop()
    seen = []
    entered, gate = threading.Event(), threading.Event()

    class Slow(Member):
        @property
        def file(self):
            self.seen.append(self.i)
            entered.set()
            gate.wait(10)
            return self.i

    ahead = pipeline._Ahead([lambda m=Slow(i, seen): m.file for i in range(4)])
    assert entered.wait(10)
    threading.Timer(0.05, gate.set).start()
    ahead.stop()   # returns once the file being opened is done; no other is started
    assert seen == [0] and not ahead_alive()


def test_the_version_is_looked_up_when_needed_and_ahead_of_the_mix(w, tmp_path):
    """``import loramix`` does not load importlib.metadata (~15 ms); generate looks the version up
    in its background thread, and the outputs record the same version as ``loramix.__version__``."""
    import loramix
    from loramix.version import version

    env = dict(os.environ, PYTHONPATH=str(_tiny.PKG_PARENT))
    r = subprocess.run([sys.executable, "-c", "import sys, loramix, loramix.cli, loramix.pipeline; "
                        "print('importlib.metadata' in sys.modules)"], capture_output=True, text=True, env=env)
    assert r.stdout.strip() == "False", r.stderr
    version.cache_clear()
    res = generate(w.queries["animals_q"], w.bank, tmp_path / "o", top_k=2)
    assert version.cache_info().currsize == 1
    prov = json.loads((res.out / "loramix.json").read_text())
    assert prov["loramix_version"] == loramix.__version__ == version()


def test_factors_inputs_gathered_ahead_fail_at_their_module(w, tmp_path, monkeypatch):
    """The modules' core inputs are gathered by a helper thread while the core's pass mixes: an
    error there is raised once the modules before it are mixed (none after is added to the
    pass), and nothing is written; with a progress bar the mix is the same."""
    from loramix.mixing import factors as mix

    ref = generate(w.queries["animals_q"], w.bank, tmp_path / "ref")
    real, seen, mixed = mix.factors_inputs, [], []
    real_add = mix.add_factors_jobs

    def failing(bank, W, name, *a, **k):
        seen.append(name)
        if len(seen) == 3:
            raise RuntimeError(f"disk error at {name}")
        return real(bank, W, name, *a, **k)

    monkeypatch.setattr(mix, "factors_inputs", failing)
    monkeypatch.setattr(mix, "add_factors_jobs", lambda mp, name, *a: mixed.append(name) or real_add(mp, name, *a))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as e:
        generate(w.queries["animals_q"], w.bank, out)
    assert str(e.value) == f"disk error at {seen[2]}" and len(seen) == 3
    assert mixed == seen[:2]
    _no_output(tmp_path, out)
    monkeypatch.setattr(mix, "factors_inputs", real)
    res = generate(w.queries["animals_q"], w.bank, tmp_path / "bar", progress=True)
    assert (res.out / "adapter_model.safetensors").read_bytes() == (ref.out / "adapter_model.safetensors").read_bytes()
