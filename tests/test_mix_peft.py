"""Mix modes against real PEFT on a tiny Mistral: loading, exactness, PEFT's own merges, oracles."""
from __future__ import annotations

import json

import numpy as np
import pytest

import _tiny
from loramix.bank.bank import Bank
from loramix.mixing.local import mix_adapters
from loramix.bank import peft_io

import torch
import peft  # noqa: F401  (the test extra installs it; never skip)


@pytest.fixture(scope="module")
def bank(w):
    return Bank.open(w.bank)


def _factors(out):
    from safetensors.numpy import load_file

    t = load_file(str(out / "adapter_model.safetensors"))
    mods = sorted({k[len(peft_io.KEY_PREFIX):].rsplit(".lora_", 1)[0] for k in t})
    return {m: (t[peft_io.tensor_key(m, "B")].astype(np.float64), t[peft_io.tensor_key(m, "A")].astype(np.float64))
            for m in mods}


def _member_factors(bank, name):
    m = bank.members[bank.index(name)]
    return {k: (m.file.to_f32(s.b_key).astype(np.float64), m.file.to_f32(s.a_key).astype(np.float64), s.scaling)
            for k, s in m.modules.items()}


MODES = ["factors", "concat", "svd"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("member", ["m1", "m2", "m3"])
def test_single_member_weight_one_reproduces_it(w, bank, tmp_path, mode, member):
    out = tmp_path / "out"
    mix_adapters(bank, {member: 1.0}, out, mode=mode, dtype="f32", rank=64)
    missing, unexpected = _tiny.load_report(w.model, out)
    assert missing == [] and unexpected == []
    got = _tiny.logits_adapter(w.model, out)
    ref = _tiny.logits_adapter(w.model, w.members[member])
    base = _tiny.logits_base(w.model)
    assert np.abs(ref - base).max() > 1e-3          # the adapter does something
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


WEIGHTS = {"m0": 0.45, "m1": 0.2, "m2": 0.35, "m3": -0.15}


@pytest.fixture(scope="module")
def merged(w):
    return {n: _tiny.merged_delta(w.model, d) for n, d in w.members.items()}


def _weighted_delta(merged, weights):
    out = {}
    for n, wt in weights.items():
        for mod, d in merged[n].items():
            out[mod] = out.get(mod, 0) + wt * d
    return out


def test_concat_equals_weighted_merged_deltas_and_peft_cat(w, bank, merged, tmp_path):
    out = tmp_path / "cat"
    res = mix_adapters(bank, WEIGHTS, out, mode="concat", dtype="f32")[0]
    assert _tiny.load_report(w.model, out) == ([], [])
    got = _tiny.logits_adapter(w.model, out)
    ref = _tiny.logits_base(w.model, _weighted_delta(merged, WEIGHTS))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # ranks: sum over the members holding each module
    assert res.ranks["model.layers.0.self_attn.q_proj"] == 4 + 4 + 8 + 2
    assert res.ranks["model.layers.1.self_attn.q_proj"] == 4 + 4 + 2
    assert res.ranks["model.layers.0.self_attn.o_proj"] == 2
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == cfg["r"]
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]

    # PEFT's own cat on the same weights (it folds w_i * s_i into A; same product)
    sub = {k: WEIGHTS[k] for k in ("m0", "m1", "m2")}
    out2 = tmp_path / "cat3"
    mix_adapters(bank, sub, out2, mode="concat", dtype="f32")
    peft = _tiny.peft_weighted_logits(w.model, {k: w.members[k] for k in sub}, list(sub.values()), "cat")
    np.testing.assert_allclose(_tiny.logits_adapter(w.model, out2), peft, atol=1e-5, rtol=0)


def test_svd_full_rank_equals_concat_and_low_rank_equals_truncated_svd(w, bank, merged, tmp_path):
    mix_adapters(bank, WEIGHTS, tmp_path / "cat", mode="concat", dtype="f32")
    mix_adapters(bank, WEIGHTS, tmp_path / "svdfull", mode="svd", rank=1000, dtype="f32")
    np.testing.assert_allclose(_tiny.logits_adapter(w.model, tmp_path / "svdfull"),
                               _tiny.logits_adapter(w.model, tmp_path / "cat"), atol=1e-5, rtol=0)
    assert _tiny.load_report(w.model, tmp_path / "svdfull") == ([], [])

    r = 3
    res = mix_adapters(bank, WEIGHTS, tmp_path / "svd3", mode="svd", rank=r, dtype="f32")[0]
    assert _tiny.load_report(w.model, tmp_path / "svd3") == ([], [])
    got = _factors(tmp_path / "svd3")
    exact = _weighted_delta(merged, WEIGHTS)
    for mod, (b, a) in got.items():
        d = exact[mod]
        u, s, vt = np.linalg.svd(d)
        k = min(r, s.size)
        assert b.shape[1] == a.shape[0] == res.ranks[mod] <= r
        approx = (u[:, :k] * s[:k]) @ vt[:k]
        np.testing.assert_allclose(b @ a, approx, rtol=0, atol=1e-5 * np.abs(approx).max())


def test_factors_equals_papers_flattened_formula(bank, tmp_path):
    # the paper: new = coefficients @ flattened_bank, A and B separately; here s_i is folded into B
    names = ["m0", "m1"]
    coeff = np.array([0.7, 0.3])
    mix_adapters(bank, dict(zip(names, coeff)), tmp_path / "f", mode="factors", dtype="f32")
    got = _factors(tmp_path / "f")
    facs = [_member_factors(bank, n) for n in names]
    mods = sorted(facs[0])
    flat_a = np.stack([np.concatenate([f[m][1].ravel() for m in mods]) for f in facs])
    flat_b = np.stack([np.concatenate([(f[m][0] * f[m][2]).ravel() for m in mods]) for f in facs])
    a_ref, b_ref = coeff @ flat_a, coeff @ flat_b
    np.testing.assert_allclose(np.concatenate([got[m][1].ravel() for m in mods]), a_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.concatenate([got[m][0].ravel() for m in mods]), b_ref, rtol=1e-6, atol=1e-7)


def test_factors_mixed_ranks_zero_pads_and_missing_modules_count_as_zero(bank, tmp_path):
    wts = {"m0": 0.6, "m2": 0.4}
    res = mix_adapters(bank, wts, tmp_path / "f", mode="factors", dtype="f32")[0]
    got = _factors(tmp_path / "f")
    f0, f2 = _member_factors(bank, "m0"), _member_factors(bank, "m2")
    for mod, (b, a) in got.items():
        r = res.ranks[mod]
        a_ref, b_ref = np.zeros((r, a.shape[1])), np.zeros((b.shape[0], r))
        for f, wt in ((f0, 0.6), (f2, 0.4)):
            if mod in f:
                bb, aa, s = f[mod]
                a_ref[: aa.shape[0]] += wt * aa
                b_ref[:, : bb.shape[1]] += wt * s * bb
        np.testing.assert_allclose(a, a_ref, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(b, b_ref, rtol=1e-6, atol=1e-7)
    assert "model.layers.0.self_attn.k_proj" in got          # only m2 has k_proj
    assert res.ranks["model.layers.1.self_attn.q_proj"] == 4   # m0's 4 vs m2's pattern rank 2


def test_batch_in_one_pass_equals_separate_runs(bank, tmp_path):
    W = np.array([[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    for mode in MODES:
        outs = [tmp_path / f"{mode}-b{q}" for q in range(2)]
        mix_adapters(bank, W, outs, mode=mode, dtype="f32")
        for q in range(2):
            one = tmp_path / f"{mode}-s{q}"
            mix_adapters(bank, W[q], [one], mode=mode, dtype="f32")
            a, b = _factors(outs[q]), _factors(one)
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_allclose(a[k][0], b[k][0], atol=1e-7)
                np.testing.assert_allclose(a[k][1], b[k][1], atol=1e-7)


@pytest.mark.parametrize("dtype,st", [("bf16", "BF16"), ("f16", "F16"), (None, "F32")])
def test_output_dtype(w, bank, tmp_path, dtype, st):
    from loramix.core import tensors

    out = tmp_path / "o"
    mix_adapters(bank, {"m0": 1.0}, out, mode="factors", dtype=dtype)
    f = tensors.SafetensorsFile(str(out / "adapter_model.safetensors"))
    assert {f.dtype(k) for k in f.keys()} == {st}
    assert _tiny.load_report(w.model, out) == ([], [])
    got = _tiny.logits_adapter(w.model, out)
    ref = _tiny.logits_adapter(w.model, w.members["m0"])
    np.testing.assert_allclose(got, ref, atol={"F32": 1e-5, "F16": 5e-3, "BF16": 3e-2}[st])


def test_svd_lanczos_path_equals_truncated_svd(rng, monkeypatch):
    from loramix.mixing import modes as mix

    b = rng.standard_normal((70, 40)) * np.exp(-np.arange(40) / 8)[None, :]
    a = rng.standard_normal((40, 90))
    d = b @ a
    u, s, vt = np.linalg.svd(d)
    for path_max in (512, 0):          # the default paths with and without Lanczos fallback
        monkeypatch.setattr(mix, "SVD_DENSE_MAX", path_max)
        for r in (1, 5, 12):
            bb, aa = mix.truncated_factors(b, a, r)
            ref = (u[:, :r] * s[:r]) @ vt[:r]
            np.testing.assert_allclose(bb @ aa, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    for method in ("gram", "qr"):      # each exact path on its own, up to and past full rank
        for r in (1, 5, 12, 40, 100):
            bb, aa = mix.truncated_factors(b, a, r, method)
            k = min(r, 40)
            ref = (u[:, :k] * s[:k]) @ vt[:k]
            assert bb.shape == (70, k) and aa.shape == (k, 90)
            np.testing.assert_allclose(bb @ aa, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
            # the singular values are split evenly between the factors
            np.testing.assert_allclose(np.linalg.norm(bb, axis=0), np.sqrt(s[:k]), rtol=1e-9)
            np.testing.assert_allclose(np.linalg.norm(aa, axis=1), np.sqrt(s[:k]), rtol=1e-9)
    _, sl, _ = mix._lanczos_svd(b, a, 5)      # the Lanczos path itself converges
    np.testing.assert_allclose(sl, s[:5], rtol=1e-10)


def test_svd_gram_path_refuses_rank_deficient_stacks_and_auto_falls_back(rng):
    from loramix.mixing import modes as mix

    # a member entered twice: the stacked factors are rank deficient, their Gram singular
    b = rng.standard_normal((50, 8)) * np.linspace(1, 3, 8)[None, :]
    a = rng.standard_normal((8, 60))
    b2, a2 = np.concatenate([b, 2 * b], axis=1), np.concatenate([a, a], axis=0)
    assert mix._gram_factors(b2, a2, 3) is None
    with pytest.raises(mix.MixError, match="rank deficient"):
        mix.truncated_factors(b2, a2, 3, "gram")
    d = b2 @ a2
    u, s, vt = np.linalg.svd(d)
    bb, aa = mix.truncated_factors(b2, a2, 3)              # auto: the Householder path
    ref = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(bb @ aa, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    # more stacked columns than output rows: the input side's Gram takes it
    b3, a3 = rng.standard_normal((6, 10)), rng.standard_normal((10, 40))
    u, s, vt = np.linalg.svd(b3 @ a3)
    bb, aa = mix.truncated_factors(b3, a3, 2, "gram")
    np.testing.assert_allclose(bb @ aa, (u[:, :2] * s[:2]) @ vt[:2], rtol=0, atol=1e-12 * s[0])
    with pytest.raises(mix.MixError, match="unknown svd method"):
        mix.truncated_factors(b3, a3, 2, "eig")
    # the taller side (B, tried first) ill-conditioned, A well-conditioned: the Gram path takes
    # the A side, with B's Gram (scaled in place by the first try) computed again
    b4 = rng.standard_normal((80, 10))
    b4[:, 1] = b4[:, 0] + 1e-7 * rng.standard_normal(80)
    a4 = rng.standard_normal((10, 60))
    u, s, vt = np.linalg.svd(b4 @ a4)
    got = mix._gram_factors(b4, a4, 3)
    assert got is not None
    np.testing.assert_allclose(got[0] @ got[1], (u[:, :3] * s[:3]) @ vt[:3], rtol=0, atol=1e-10 * s[0])
