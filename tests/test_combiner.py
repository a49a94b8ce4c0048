"""Neural combiner: Gram-based loss, Gram matrices, gradients, ONNX export, and that training helps."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from loramix.weights import combiner as C
from loramix.weights import gram as G_
from loramix.weights import mlp as M_


def planted_bank(N=80, K=5, P=400, seed=0, noise=0.3):
    """Members are random mixtures (Dirichlet, mostly one dominant) of K latent adapters plus noise;
    the distance between two members is the distance of their mixture coefficients, plus
    non-negative noise (symmetric). The structure is real, the distances imperfect."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((K, P))
    c = rng.dirichlet(np.full(K, 0.3), size=N)
    X = c @ latent + 0.05 * rng.standard_normal((N, P))
    D = np.linalg.norm(c[:, None] - c[None], axis=-1)
    D = D + noise * D.std() * np.abs(rng.standard_normal((N, N)))
    return X, 0.5 * (D + D.T)


def test_gram_loss_equals_explicit_reconstruction(rng):
    N, P = 7, 50
    X = rng.standard_normal((N, P))
    G = X @ X.T
    W = rng.random((N, N))
    np.fill_diagonal(W, 0)
    W /= W.sum(1, keepdims=True)
    explicit = ((W @ X - X) ** 2).sum(1)
    got = C.reconstruction_loss(W, G)
    np.testing.assert_allclose(got, explicit, rtol=1e-9)
    # arbitrary targets (rows reconstructing other members)
    t = np.array([3, 3, 0, 6])
    W2 = rng.random((4, N))
    np.testing.assert_allclose(C.reconstruction_loss(W2, G, t), ((W2 @ X - X[t]) ** 2).sum(1), rtol=1e-9)
    # and the training loss is the same quantity, relative to the energy of the rows
    feats, _ = C.pair_features({"d": rng.random((N, N))}, exclude=np.eye(N, dtype=bool))
    comb, _ = C.train_combiner(feats, G, hidden=4, max_epochs=1, val_frac=0, seed=1)
    _, Wc = comb.forward(feats, np.eye(N, dtype=bool))
    rows = np.arange(N)
    loss, _ = M_.loss_and_grad(comb.params, np.where(np.eye(N, dtype=bool)[..., None], 0, feats),
                               np.eye(N, dtype=bool), G, rows, float(np.trace(G)), need_grad=False)
    np.testing.assert_allclose(loss, ((Wc @ X - X) ** 2).sum() / (X ** 2).sum(), rtol=1e-9)


def _dense_delta_gram(modules):
    n = len(modules[0][0])
    G = np.zeros((n, n))
    for As, Bs, s in modules:
        deltas = [None if A is None else s[i] * (B.astype(np.float64) @ A.astype(np.float64))
                  for i, (A, B) in enumerate(zip(As, Bs))]
        for i in range(n):
            for j in range(n):
                if deltas[i] is not None and deltas[j] is not None:
                    G[i, j] += (deltas[i] * deltas[j]).sum()
    return G


@pytest.mark.parametrize("block_rank", [2048, 5])
def test_delta_gram_equals_dense(rng, block_rank):
    n = 5
    shapes = [(9, 7), (4, 11)]  # (out, in) per module
    modules = []
    for m, (out, inn) in enumerate(shapes):
        ranks = [2, 3, 1, 4, 2]
        As = [rng.standard_normal((r, inn)).astype(np.float32) for r in ranks]
        Bs = [rng.standard_normal((out, r)).astype(np.float32) for r in ranks]
        if m == 1:  # member 2 lacks the second module
            As[2] = Bs[2] = None
        modules.append((As, Bs, rng.random(n) + 0.5))
    got = G_.delta_gram(iter(modules), n, block_rank=block_rank)
    np.testing.assert_allclose(got, _dense_delta_gram(modules), rtol=1e-10)
    assert np.allclose(got, got.T)
    # without scales: plain <B_i A_i, B_j A_j>
    As, Bs, _ = modules[0]
    np.testing.assert_allclose(G_.delta_gram_module(As, Bs), _dense_delta_gram([(As, Bs, np.ones(n))]), rtol=1e-10)
    with pytest.raises(ValueError):
        G_.delta_gram_module([As[0]], [Bs[1][:, :1]])


def test_factor_gram_matches_explicit(rng):
    n = 4
    groups, scales = [], []
    for shape in [(3, 10), (6, 4), (5,)]:
        groups.append([rng.standard_normal(shape).astype(np.float32) for _ in range(n)])
        scales.append(rng.random(n) + 0.5)
    groups[1][3] = None  # member 3 lacks a tensor
    want = np.zeros((n, n))
    for g, c in zip(groups, scales):
        M = np.stack([np.zeros(g[0].size) if t is None else t.astype(np.float64).ravel() for t in g])
        want += (M * c[:, None]) @ (M * c[:, None]).T
    got = G_.factor_gram(iter(groups), scales=iter(scales), threads=1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain = G_.factor_gram(groups[:1], threads=1)
    M = np.stack([t.astype(np.float64).ravel() for t in groups[0]])
    np.testing.assert_allclose(plain, M @ M.T, rtol=1e-6)


def test_factor_gram_reads_safetensors(tmp_path, rng):
    from loramix.core import tensors
    from safetensors.numpy import save_file

    mats = [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(3)]
    refs = []
    for i, m in enumerate(mats):
        save_file({"lora_A": m}, str(tmp_path / f"a{i}.safetensors"))
        refs.append(tensors.SafetensorsFile(str(tmp_path / f"a{i}.safetensors")).tensor("lora_A"))
    M = np.stack([m.astype(np.float64).ravel() for m in mats])
    np.testing.assert_allclose(G_.factor_gram([refs], threads=1), M @ M.T, rtol=1e-6)


def test_analytic_gradients_match_finite_differences(rng):
    N, F, H, P = 6, 3, 4, 12
    X = rng.standard_normal((N, P))
    G = X @ X.T
    feats = rng.standard_normal((N, N, F))
    ex = np.eye(N, dtype=bool)
    ex[2, 4] = True  # an extra exclusion
    rows = np.array([0, 2, 3, 5])
    p = C.MLPParams(mean=rng.standard_normal(F), std=rng.random(F) + 0.5, W1=rng.standard_normal((F, H)),
                    b1=rng.standard_normal(H), w2=rng.standard_normal(H), skip=rng.standard_normal(F))
    Xr = np.where(ex[rows][..., None], 0, feats[rows])
    energy = float(G[rows, rows].sum())
    _, grad = M_.loss_and_grad(p, Xr, ex[rows], G, rows, energy)
    h = 1e-6
    for k in C.MLPParams.TRAINABLE:
        arr = getattr(p, k)
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + h
            lp = M_.loss_and_grad(p, Xr, ex[rows], G, rows, energy, need_grad=False)[0]
            arr[idx] = old - h
            lm = M_.loss_and_grad(p, Xr, ex[rows], G, rows, energy, need_grad=False)[0]
            arr[idx] = old
            num[idx] = (lp - lm) / (2 * h)
        np.testing.assert_allclose(grad[k], num, rtol=1e-5, atol=1e-8, err_msg=k)


@pytest.mark.parametrize("M,F,H", [(0, 2, 16), (1, 2, 16), (4095, 3, 7), (9001, 4, 32)])
def test_core_mlp_kernels_match_numpy_oracle(rng, M, F, H):
    """The core's forward pass equals the numpy reference (:func:`mlp.forward`), its backward pass
    equals the float64 chain rule written out in numpy, zero ``ds`` rows contribute nothing, and
    the bits do not depend on the thread count."""
    from loramix import _core

    Z = rng.standard_normal((M, F)) * 2.0
    W1, b1, w2, skip = (rng.standard_normal((F, H)), rng.standard_normal(H), rng.standard_normal(H),
                        rng.standard_normal(F))
    p = C.MLPParams(np.zeros(F), np.ones(F), W1, b1, w2, skip)
    want_s = M_.forward(p, Z)[0]
    s = np.empty(M)
    _core.mlp_forward(Z, W1, b1, w2, skip, s, 2)
    np.testing.assert_allclose(s, want_s, rtol=1e-12, atol=1e-12)
    ds = rng.standard_normal(M)
    ds[::3] = 0.0
    a = Z @ W1 + b1
    t = a / (1 + np.abs(a))
    da = ds[:, None] * w2[None, :] / (1 + np.abs(a)) ** 2
    want = (Z.T @ da, da.sum(0), t.T @ ds, Z.T @ ds)
    got = _core.mlp_backward(Z, W1, b1, w2, ds, 1)
    for g, w, name in zip(got, want, ("W1", "b1", "w2", "skip")):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10 * max(1, M), err_msg=name)
    for th in (2, 3):
        s2 = np.empty(M)
        _core.mlp_forward(Z, W1, b1, w2, skip, s2, th)
        assert np.array_equal(s, s2)
        for g1, g2 in zip(got, _core.mlp_backward(Z, W1, b1, w2, ds, th)):
            assert np.array_equal(g1, g2)


def test_core_mlp_kernels_reject_bad_input(rng):
    from loramix import _core

    Z = rng.standard_normal((5, 2))
    W1, b = rng.standard_normal((2, 3)), rng.standard_normal(3)
    with pytest.raises(TypeError, match="float64"):
        _core.mlp_forward(Z.astype(np.float32), W1, b, b, np.zeros(2), np.empty(5), 1)
    with pytest.raises(ValueError, match="skip"):
        _core.mlp_forward(Z, W1, b, b, np.zeros(3), np.empty(5), 1)
    with pytest.raises(ValueError, match="W1"):
        _core.mlp_backward(Z, W1.T.copy(), b, b, np.zeros(5), 1)
    with pytest.raises(ValueError, match="hidden"):
        big = rng.standard_normal((2, 300))
        _core.mlp_forward(Z, big, np.zeros(300), np.zeros(300), np.zeros(2), np.empty(5), 1)


def test_onnx_matches_numpy_forward_and_round_trips(tmp_path, rng):
    X, D = planted_bank(N=30, seed=3)
    D2 = D + rng.random(D.shape)
    N = len(D)
    feats, names = C.pair_features({"js": D, "kl": D2}, exclude=np.eye(N, dtype=bool),
                                   embedding_cos=rng.random((N, N)))
    assert names == ["js", "js:z", "kl", "kl:z", "cos", "cos:z"]
    comb, hist = C.train_combiner(feats, X @ X.T, hidden=8, max_epochs=30, seed=2, feature_names=names)
    ex = rng.random((N, N)) < 0.3
    ex[:, 0] = False
    logits, w_np = comb.forward(feats, ex)
    w_ort = comb.weights(feats, ex)
    np.testing.assert_allclose(w_ort, w_np, atol=1e-6)
    assert np.all(w_ort[ex] == 0) and np.allclose(w_ort.sum(1), 1)

    path = comb.save(tmp_path / "bank" / "combiner.onnx", bank_hash="abc123", pipeline={"metrics": ["js", "kl"],
                                                                                         "mix_mode": "factors"})
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["loramix.bank_hash"] == "abc123" and json.loads(meta["loramix.feature_names"]) == names
    assert json.loads(meta["loramix.pipeline"])["mix_mode"] == "factors"
    back = C.NeuralCombiner.load(path, expected_bank_hash="abc123")
    assert back.feature_names == names and back.pipeline == {"metrics": ["js", "kl"], "mix_mode": "factors"}
    np.testing.assert_allclose(back.weights(feats, ex), w_ort, atol=1e-7)
    np.testing.assert_allclose(back.forward(feats, ex)[1], w_np, atol=1e-6)  # float32-stored params
    with pytest.raises(C.StaleCombinerError, match="stale"):
        C.NeuralCombiner.load(path, expected_bank_hash="other")
    # one target row (N, F) works too; wrong feature count fails clearly
    assert comb.weights(feats[0], ex[0]).shape == (1, N)
    with pytest.raises(ValueError, match="features must be"):
        comb.weights(feats[..., :2])
    with pytest.raises(ValueError, match="no bank member"):
        comb.weights(feats, np.ones((N, N), bool))
    with pytest.raises(ValueError, match="bank_hash"):
        comb.save(tmp_path / "x.onnx", bank_hash="")


def test_normalized_weights_is_the_paper_pipeline(rng):
    D = rng.random((4, 6))
    ex = np.zeros((4, 6), bool)
    ex[np.arange(4), np.arange(4)] = True
    W = C.normalized_weights(D, exclude=ex)
    for q in range(4):
        keep = ~ex[q]
        z = (D[q, keep] - D[q, keep].mean()) / D[q, keep].std()
        e = np.exp(-z)
        np.testing.assert_allclose(W[q, keep], e / e.sum(), rtol=1e-12)
        assert np.all(W[q, ~keep] == 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_training_beats_the_normalized_pipeline_on_planted_structure(seed, caplog):
    X, D = planted_bank(N=80, seed=seed)
    G = X @ X.T
    N = len(G)
    ex = np.eye(N, dtype=bool)
    feats, names = C.pair_features({"js": D}, exclude=ex)
    with caplog.at_level(logging.INFO, logger="loramix.weights.combiner"):
        comb, hist = C.train_combiner(feats, G, hidden=16, val_frac=0.2, seed=seed, max_epochs=1500,
                                      patience=100, lr=0.02, feature_names=names, log_every=100)
    assert any("epoch 0" in r.message for r in caplog.records)
    vr = np.array(hist.val_members)
    assert len(vr) == 16 and not set(vr) & set(hist.train_members)
    # the baseline is the normalized pipeline on the same validation members
    Wn = C.normalized_weights(D, exclude=ex)
    base = C.reconstruction_loss(Wn[vr], G, vr).sum() / G[vr, vr].sum()
    assert hist.baseline_val_loss == pytest.approx(base, rel=1e-9)
    # the combiner's own validation loss, recomputed from its ONNX weights
    W = comb.weights(feats, ex)
    val = C.reconstruction_loss(W[vr], G, vr).sum() / G[vr, vr].sum()
    assert val == pytest.approx(hist.best_val_loss, rel=1e-4)
    assert val < 0.5 * base, (val, base)
    # honest about temperature too: the normalized pipeline at its best temperature for these
    # validation members (chosen with hindsight) still does not beat the trained combiner
    tuned = min(C.reconstruction_loss(C.normalized_weights(D, exclude=ex, temperature=T)[vr], G, vr).sum()
                / G[vr, vr].sum() for T in (0.1, 0.2, 0.3, 0.5, 1.0))
    assert val < tuned, (val, tuned)
    # the curve went down and early stopping kept the best epoch
    assert hist.train_loss[hist.best_epoch] < hist.train_loss[0]
    assert hist.best_val_loss == min(hist.val_loss)


def test_train_combiner_validates_inputs(rng):
    f = rng.random((5, 5, 1))
    with pytest.raises(ValueError, match="features"):
        C.train_combiner(f[:, :4], np.eye(5))
    with pytest.raises(ValueError, match="gram"):
        C.train_combiner(f, np.eye(4))
    with pytest.raises(ValueError, match="symmetric"):
        C.train_combiner(f, np.triu(np.ones((5, 5))))
    comb, hist = C.train_combiner(f, np.eye(5) + 0.1, val_frac=0, max_epochs=5)
    assert len(hist.train_loss) == 5 and not hist.stopped_early and hist.val_members == []


@pytest.mark.parametrize("min_delta", [0.0, 1e-4, 1e-2])
def test_early_stopping_counts_patience_from_the_last_real_improvement(min_delta):
    """Training stops ``patience`` epochs after the last validation loss that beat the loss of the
    previous reset by at least ``min_delta`` (relative), and still returns the best epoch seen."""
    X, D = planted_bank(N=40, seed=4)
    N = len(D)
    feats, _ = C.pair_features({"js": D}, exclude=np.eye(N, dtype=bool))
    patience = 7
    _, hist = C.train_combiner(feats, X @ X.T, hidden=4, seed=0, max_epochs=400, patience=patience,
                               min_delta=min_delta)
    assert hist.stopped_early
    mark, last = np.inf, 0
    for e, v in enumerate(hist.val_loss):   # the rule, replayed on the recorded curve
        if not np.isfinite(mark) or v < mark - min_delta * abs(mark):
            mark, last = v, e
    assert len(hist.val_loss) == last + patience + 1
    assert hist.best_val_loss == min(hist.val_loss)
    assert hist.val_loss[hist.best_epoch] == hist.best_val_loss
