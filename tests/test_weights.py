"""Weights pipelines and metrics against the paper's formulas (torch Softmin, sklearn StandardScaler)."""
from __future__ import annotations

import numpy as np
import pytest


from loramix import weights as W


@pytest.fixture
def dist(rng):
    return rng.uniform(0.01, 0.7, size=(5, 9))


def test_attentional_equals_torch_softmin(dist):
    torch = pytest.importorskip("torch")
    ref = torch.nn.Softmin(dim=-1)(torch.tensor(dist, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(W.mixing_weights(dist, "attentional"), ref, rtol=0, atol=1e-12)


def test_normalized_equals_standard_scaler_then_softmin(dist):
    torch = pytest.importorskip("torch")
    from sklearn.preprocessing import StandardScaler

    z = np.stack([StandardScaler().fit_transform(row.reshape(-1, 1)).ravel() for row in dist])
    ref = torch.nn.Softmin(dim=-1)(torch.tensor(z, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(W.mixing_weights(dist, "normalized"), ref, rtol=0, atol=1e-12)


def test_temperature_topk_exclude(dist):
    torch = pytest.importorskip("torch")
    row = dist[0]
    t = 0.3
    ref = torch.nn.Softmin(dim=-1)(torch.tensor(row / t)).numpy()
    np.testing.assert_allclose(W.mixing_weights(row, "attentional", temperature=t), ref, atol=1e-12)
    # leave-one-out: excluded members get 0 and do not enter the row's statistics
    ex = np.zeros(9, bool)
    ex[[2, 5]] = True
    got = W.mixing_weights(row, "normalized", exclude=ex)
    assert np.all(got[ex] == 0)
    keep = row[~ex]
    z = (keep - keep.mean()) / keep.std()
    np.testing.assert_allclose(got[~ex], np.exp(-z) / np.exp(-z).sum(), atol=1e-12)
    # top-k: the k nearest keep their weights, renormalized
    full = W.mixing_weights(row, "attentional")
    k = W.mixing_weights(row, "attentional", top_k=3)
    near = np.argsort(row)[:3]
    assert np.count_nonzero(k) == 3 and set(np.flatnonzero(k)) == set(near)
    np.testing.assert_allclose(k[near], full[near] / full[near].sum(), atol=1e-12)
    assert k.sum() == pytest.approx(1.0, abs=1e-12)


def test_constant_row_and_bad_weights():
    w = W.mixing_weights(np.full(4, 0.3), "normalized")
    np.testing.assert_allclose(w, 0.25, atol=1e-15)
    with pytest.raises(W.WeightsError, match="NaN"):
        W.mixing_weights(np.array([0.1, np.nan]), "attentional")
    with pytest.raises(W.WeightsError, match="all zero"):
        W.check_weights(np.zeros(3))
    with pytest.raises(W.WeightsError, match="NaN"):
        W.check_weights(np.array([1.0, np.nan]))
    with pytest.raises(W.WeightsError, match="excluded"):
        W.mixing_weights(np.ones(2), exclude=np.ones(2, bool))
    with pytest.raises(W.WeightsError, match="unknown pipeline"):
        W.mixing_weights(np.ones(2), "nope")


def test_pipeline_registry_hook():
    @W.register_pipeline("_uniform_test")
    def uniform(d, *, temperature=1.0, **_):
        return np.full(d.shape, 1.0 / d.size)

    try:
        np.testing.assert_allclose(W.mixing_weights(np.arange(4.0), "_uniform_test"), 0.25)
    finally:
        W.PIPELINES.pop("_uniform_test")


def _mmd_sampled_oracle(p, q, bw=W.MMD_BANDWIDTHS):
    """float64 oracle: the expectation of the sampled estimator, by explicit V×V kernel."""
    v = p.size
    x = np.arange(v, dtype=np.float64)
    d2 = (x[:, None] - x[None, :]) ** 2
    K = sum(a * a / (a * a + d2) for a in bw)
    p, q = p / p.sum(), q / q.sum()
    return p @ K @ p + q @ K @ q - 2 * p @ K @ q


def test_mmd_exact_equals_dense_kernel_oracle(rng):
    P = rng.integers(0, 5, size=(3, 37)).astype(float)
    R = rng.integers(0, 5, size=(4, 37)).astype(float)
    R[1, :20] = 0
    got = W.mmd_distance(P, R)
    import scipy.sparse as sp
    np.testing.assert_allclose(W.mmd_distance(sp.csr_array(P), sp.csr_array(R), chunk=3), got, atol=1e-15)
    ref = np.array([[_mmd_sampled_oracle(p, r) for r in R] for p in P])
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(W.mmd_distance(P, P).diagonal(), 0, atol=1e-12)


def test_mmd_matches_sampling_estimator_on_average(rng):
    p = np.array([5.0, 1, 0, 0, 3, 1])
    q = np.array([0.0, 1, 4, 4, 0, 1])
    ids = np.arange(6)

    def k(x, y):
        d2 = (x[:, None] - y[None, :]) ** 2
        return sum(a * a / (a * a + d2) for a in W.MMD_BANDWIDTHS)

    est = []
    for _ in range(200):
        x = rng.choice(ids, 300, p=p / p.sum()).astype(float)
        y = rng.choice(ids, 300, p=q / q.sum()).astype(float)
        est.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    assert np.mean(est) == pytest.approx(W.mmd_distance(p, q)[0, 0], rel=0.02)


def test_metrics_registry_and_core_metrics(rng):
    import scipy.sparse as sp

    P = rng.integers(0, 4, size=(2, 50)).astype(float)
    R = rng.integers(0, 4, size=(3, 50)).astype(float)
    d = W.distances(sp.csr_array(P), sp.csr_array(R), "js")
    p = P / P.sum(1, keepdims=True) + 1e-10
    r = R / R.sum(1, keepdims=True) + 1e-10
    m = 0.5 * (p[:, None] + r[None])
    ref = 0.5 * (p[:, None] * np.log(p[:, None] / m)).sum(-1) + 0.5 * (r[None] * np.log(r[None] / m)).sum(-1)
    np.testing.assert_allclose(d, ref, rtol=1e-9, atol=1e-12)
    assert set(W.METRICS) >= {"js", "kl", "wd", "mmd"}
    with pytest.raises(W.WeightsError, match="unknown metric"):
        W.distances(P, R, "nope")
