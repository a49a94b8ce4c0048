"""The synthetic paper-scale generator of ``loramix bench``: its layout is a bank the library
opens and mixes, with the published shapes and plausible values and profiles. Nothing is timed."""
from __future__ import annotations

import json

import numpy as np
import pytest

from loramix.bank.bank import Bank
from loramix_bench import synth
from loramix.pipeline import generate
from loramix.profiles.tokens import build_profile
from loramix.core.tensors import SafetensorsFile

SMALL = synth.Shape(hidden=64, layers=2, kv_out=16, r=4, alpha=8)


@pytest.fixture(scope="module")
def small_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    b = synth.make_bank(root / "bank", 5, "BF16", shape=SMALL)
    return root, b


def test_mistral_shapes_match_lots_of_loras():
    s = synth.MISTRAL
    assert len(s.modules()) == 96
    assert s.params == 32 * (3 * 16 * 4096 + 16 * 4096 + 2 * 16 * 1024)
    assert synth.adapter_bytes("F32") == 37_748_736          # "about 37.8 MB each"
    assert 18.9e9 < 502 * synth.adapter_bytes("F32") < 19.0e9
    cfg = synth.adapter_config()
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (16, 32, ["q_proj", "k_proj", "v_proj"])


def test_one_full_size_adapter(tmp_path):
    pool = synth._Pool(np.random.default_rng(0))
    d = synth.write_adapter(tmp_path / "m", pool, "BF16")
    f = SafetensorsFile(d / "adapter_model.safetensors")
    assert len(f) == 192
    q_a = "base_model.model.model.layers.31.self_attn.q_proj.lora_A.weight"
    k_b = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    assert f.shape(q_a) == (16, 4096) and f.shape(k_b) == (1024, 16) and f.dtype(q_a) == "BF16"
    a, b = f.to_f32(q_a), f.to_f32(k_b)
    bound = 1 / np.sqrt(4096)
    assert np.abs(a).max() <= 1.2 * bound * 1.01
    assert 0.8 * bound / np.sqrt(3) * 0.9 < a.std() < 1.2 * bound / np.sqrt(3) * 1.1
    assert 0.5 * 2e-3 * 0.9 < b.std() < 1.5 * 2e-3 * 1.1 and np.count_nonzero(b) > 0.99 * b.size
    assert (d / "adapter_config.json").is_file()


def test_bank_opens_with_the_bank_code(small_bank):
    _, path = small_bank
    b = Bank.open(path)
    assert b.names == [f"m{i:03d}" for i in range(5)]
    assert (b.dtype, b.rank, b.vocab_size, b.base_model) == ("BF16", 4, 32000, synth.BASE_MODEL)
    for m in b.members:
        assert len(m.modules) == 6
        ms = m.modules["model.layers.1.self_attn.k_proj"]
        assert (ms.in_features, ms.out_features, ms.rank, ms.scaling) == (64, 16, 4, 2.0)
    P = b.profiles()
    assert P.shape == (5, 32000)
    nnz = np.diff(P.indptr)
    assert nnz.min() >= 2000 and nnz.max() <= 8000
    assert np.all((P.sum(axis=1) >= 30000) & (P.sum(axis=1) <= 150000))
    assert P[:, :3].sum() == 0   # special tokens are never drawn


def test_profiles_are_zipf_like_and_share_common_tokens():
    H = synth.make_histograms(20, seed=3)
    nnz = np.diff(H.indptr)
    assert nnz.min() >= 2000 and nnz.max() <= 8000
    r = np.sort(H.getrow(0).toarray().ravel())[::-1]
    assert r[0] > 20 * np.median(r[r > 0])           # heavy head
    share = (H[0].toarray() > 0) & (H[1].toarray() > 0)
    assert share.sum() > 200                           # common tokens shared between datasets
    assert np.array_equal(synth.make_histograms(5, seed=3).toarray(), H[:5].toarray())


def test_tokenizer_and_target_dataset(small_bank, tmp_path):
    root, path = small_bank
    from loramix.profiles.tokens import load_tokenizer

    tok = load_tokenizer(path / "tokenizer.json")
    assert tok.get_vocab_size(with_added_tokens=True) == 32000
    assert tok.encode("t5 t31999").ids == [1, 5, 31999]
    ds = synth.make_dataset(tmp_path / "target.jsonl", n_examples=1000)
    rows = [json.loads(x) for x in ds.read_text().splitlines()]
    assert len(rows) == 1000 and isinstance(rows[0]["output"], list)
    p = build_profile(ds, path / "tokenizer.json")
    assert p.n_examples == 1000 and 1000 < p.ids.size <= 8000 and p.counts[p.ids == 1].sum() == 1000 and 0 not in p.ids


def test_generate_runs_on_the_synthetic_bank(small_bank, tmp_path):
    root, path = small_bank
    ds = synth.make_dataset(tmp_path / "target.jsonl", n_examples=50)
    res = generate(ds, path, tmp_path / "out", top_k=3, metric="js")   # members hold no datasets: no instructions
    f = SafetensorsFile(res.out / "adapter_model.safetensors")
    assert len(f) == 12 and np.count_nonzero(res.weights) == 3


def test_make_bank_resumes(small_bank):
    _, path = small_bank
    w = path / "m002" / "adapter_model.safetensors"
    before = w.stat().st_mtime_ns
    synth.make_bank(path, 5, "BF16", shape=SMALL)
    assert w.stat().st_mtime_ns == before
    assert len(Bank.open(path).members) == 5
