"""loramix.core.divergence against a float64 numpy oracle of the paper's formulas, on every ISA."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats

from loramix import _core
from loramix.core.divergence import CSR, divergence, prepare

METRICS = ("js", "kl", "wd")
FORMS = ("dense64", "dense32", "csr64", "csr32")


# ---- oracle: normalize, + eps on every bin, then the sums directly (float64) -----------------
def _rows(X):
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    X = np.asarray(X, dtype=np.float64)
    return X / X.sum(axis=1, keepdims=True)


def _kl(p, q):
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t = np.where(p > 0, p * np.log(p / q), 0.0)
    return t.sum()


def oracle(P, R, metric, eps):
    a = _rows(P)
    b = a if R is None else _rows(R)
    out = np.empty((a.shape[0], b.shape[0]))
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            if metric == "wd":
                # extended precision: a float64 cumsum over 32k bins is itself off by ~1e-12
                d = np.cumsum(a[i].astype(np.longdouble)) - np.cumsum(b[j].astype(np.longdouble))
                out[i, j] = float(np.abs(d)[:-1].sum())
                continue
            p, q = a[i] + eps, b[j] + eps
            if metric == "kl":
                out[i, j] = _kl(p, q)
            else:
                m = 0.5 * (p + q)
                out[i, j] = 0.5 * _kl(p, m) + 0.5 * _kl(q, m)
    return out


def rtol_for(form):
    return 1e-6 if form.endswith("32") else 1e-12


def assert_close(got, want, rtol, atol=1e-13):
    """Relative `rtol`; the absolute floor `atol` only matters for entries that are (nearly) 0
    (identical rows: kl = F_i + G_j - corrections cancels ~20 nats to 0, leaving ~1e-15)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == np.float64
    inf = np.isinf(want)
    np.testing.assert_array_equal(np.isinf(got), inf)
    np.testing.assert_array_equal(got[inf], want[inf])
    np.testing.assert_allclose(got[~inf], want[~inf], rtol=rtol, atol=atol)


def as_form(X, form):
    X = np.asarray(X, dtype=np.float64)
    dt = np.float32 if form.endswith("32") else np.float64
    if form.startswith("dense"):
        return X.astype(dt)
    return sp.csr_matrix(X.astype(dt))


def random_counts(rng, rows, V, density=0.3, scale=50):
    X = rng.integers(0, scale, size=(rows, V)).astype(np.float64)
    X *= rng.random((rows, V)) < density
    X[np.arange(rows), rng.integers(0, V, rows)] += 1.0  # never an all-zero row
    return X


# ---- agreement with the oracle ------------------------------------------------------------------
# density 0.9: dense inputs take the dense SIMD loop; 0.3: they take the sparse path (see
# kDenseFill in divergence.cpp), as CSR inputs always do.
@pytest.mark.parametrize("density", [0.3, 0.9])
@pytest.mark.parametrize("V", [1, 7, 15, 16, 17, 31, 33, 32000, 32001])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("metric", METRICS)
def test_random_vs_oracle(isa, rng, metric, form, V, density):
    P, R = random_counts(rng, 3, V, density), random_counts(rng, 4, V, density)
    P[0] *= 1e6  # unnormalized rows of very different scales
    R[1] *= 1e-3
    got = divergence(as_form(P, form), as_form(R, form), metric)
    want = oracle(as_form(P, form), as_form(R, form), metric, 1e-10)
    assert_close(got, want, rtol_for(form))


@pytest.mark.parametrize("V", [1, 7, 16, 17, 33, 32001])
@pytest.mark.parametrize("form", ("dense32", "csr64"))
@pytest.mark.parametrize("metric", METRICS)
def test_symmetric_vs_oracle(isa, rng, metric, form, V):
    X = random_counts(rng, 6, V, density=0.4)
    want = oracle(as_form(X, form), None, metric, 1e-10)
    np.fill_diagonal(want, 0.0)
    assert_close(divergence(as_form(X, form), None, metric), want, rtol_for(form))


@pytest.mark.parametrize("V", [7, 33, 400, 32001])
@pytest.mark.parametrize("eps", [0.0, 1e-10])
@pytest.mark.parametrize("metric", ("js", "kl"))
def test_few_rows_path_agrees(isa, rng, metric, eps, V):
    """Up to 2 rows of P against R go through the direct (gather) path, more through the index;
    both sum the same terms in the same order, so they agree bit for bit."""
    P, R = random_counts(rng, 5, V, density=0.3), random_counts(rng, 12, V, density=0.5)
    R[0] += 1.0
    csr = sp.csr_matrix
    many = divergence(csr(P), csr(R), metric, eps=eps)
    want = oracle(P[:2], R, metric, eps)
    want32 = oracle(P[:2].astype(np.float32), R, metric, eps)
    for q in (1, 2):
        few = divergence(csr(P[:q]), csr(R), metric, eps=eps)
        np.testing.assert_array_equal(few, many[:q])
        assert_close(few, want[:q], 1e-12)
        assert_close(divergence(P[:q].astype(np.float32), csr(R), metric, eps=eps), want32[:q], 1e-6)


@pytest.mark.parametrize("density", [0.2, 0.8])
@pytest.mark.parametrize("eps", [0.0, 1e-10, 1e-3])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("metric", METRICS)
def test_eps_values(isa, rng, metric, form, eps, density):
    P, R = random_counts(rng, 4, 300, density=density), random_counts(rng, 5, 300, density=0.6)
    R[0] += 1.0  # full support: kl(P_i || R_0) stays finite at eps = 0
    got = divergence(as_form(P, form), as_form(R, form), metric, eps=eps)
    want = oracle(as_form(P, form), as_form(R, form), metric, eps)
    if metric == "kl" and eps == 0.0:
        assert np.isinf(want).any() and np.isfinite(want).any()
    assert_close(got, want, rtol_for(form))


def adversarial_rows(V=40):
    rows = []
    one = np.zeros(V); one[3] = 5.0; rows.append(one)               # a single non-zero bin
    same = np.zeros(V); same[3] = 0.25; rows.append(same)           # same bin, other scale
    lo = np.zeros(V); lo[: V // 2] = 1.0; rows.append(lo)           # disjoint supports
    hi = np.zeros(V); hi[V // 2:] = 2.0; rows.append(hi)
    sup = np.zeros(V); sup[: V // 2] = np.arange(1, V // 2 + 1); sup[V - 1] = 1.0
    rows.append(sup)                                                 # superset of lo
    full = np.arange(1, V + 1, dtype=np.float64); rows.append(full)  # every bin
    rows.append(full * 1e9)                                          # identical after normalizing
    last = np.zeros(V); last[V - 1] = 1.0; rows.append(last)
    tiny = np.zeros(V); tiny[0] = 1e300; tiny[1] = 1e-20; rows.append(tiny)  # subnormal after normalizing
    return np.array(rows)


@pytest.mark.parametrize("eps", [0.0, 1e-10])
@pytest.mark.parametrize("form", ("dense64", "csr64"))
@pytest.mark.parametrize("metric", METRICS)
def test_adversarial(isa, metric, form, eps):
    X = adversarial_rows()
    got = divergence(as_form(X, form), as_form(X, form), metric, eps=eps)
    want = oracle(X, X, metric, eps)
    assert_close(got, want, 1e-12)
    if metric == "js":
        if eps == 0.0:  # disjoint supports without smoothing: exactly ln 2
            assert got[2, 3] == pytest.approx(np.log(2), rel=1e-14)
        assert abs(got[0, 1]) < 1e-15 and abs(got[5, 6]) < 1e-15  # same after normalizing
    if metric == "kl" and eps == 0.0:
        assert np.isinf(got[2, 3]) and np.isfinite(got[2, 4])  # supp(lo) inside supp(sup)


@pytest.mark.parametrize("form", ("dense64", "csr64"))
@pytest.mark.parametrize("metric", ("js", "kl"))
def test_subnormal_eps(isa, rng, metric, form):
    X = random_counts(rng, 4, 50, density=0.3)
    eps = 1e-320  # (a + eps)/eps overflows; logs of subnormals
    a = _rows(X)
    with np.errstate(divide="ignore", invalid="ignore"):
        lg = np.log(a + eps)
    want = np.empty((4, 4))
    for i in range(4):
        for j in range(4):
            p, q, lp, lq = a[i] + eps, a[j] + eps, lg[i], lg[j]
            if metric == "kl":
                want[i, j] = np.sum(p * (lp - lq))
            else:
                m = 0.5 * (p + q)
                want[i, j] = 0.5 * np.sum(p * (lp - np.log(m))) + 0.5 * np.sum(q * (lq - np.log(m)))
    assert np.isfinite(want).all()
    assert_close(divergence(as_form(X, form), as_form(X, form), metric, eps=eps), want, 1e-12, atol=1e-12)


def test_eps_zero_js_disjoint_is_ln2(isa):
    X = np.array([[1.0, 0, 0, 0], [0, 0, 3.0, 1.0]])
    for form in ("dense64", "csr64"):
        assert divergence(as_form(X, form), metric="js", eps=0.0)[0, 1] == pytest.approx(np.log(2), rel=1e-15)


def test_many_rows_shared_bins(isa, rng):
    """Inverted-index runs of every length around the vector widths, contiguous or not."""
    X = random_counts(rng, 37, 60, density=0.5, scale=7)
    X[:, 0] = 1.0  # a bin every row holds: one contiguous run of 37
    for metric in ("js", "kl"):
        want = oracle(X, None, metric, 1e-10)
        got = divergence(sp.csr_matrix(X), metric=metric)
        np.fill_diagonal(want, 0.0)
        assert_close(got, want, 1e-12)
        assert_close(divergence(sp.csr_matrix(X[:5]), sp.csr_matrix(X), metric), want[:5], 1e-12)


def test_wd_matches_scipy(isa, rng):
    V = 257
    P, R = random_counts(rng, 3, V, density=0.1), random_counts(rng, 4, V, density=0.5)
    ids = np.arange(V)
    for form in ("dense64", "csr64", "dense32"):
        got = divergence(as_form(P, form), as_form(R, form), "wd")
        dt = np.float32 if form.endswith("32") else np.float64
        Pf, Rf = P.astype(dt).astype(np.float64), R.astype(dt).astype(np.float64)
        want = np.array([[scipy.stats.wasserstein_distance(ids, ids, p, q) for q in Rf] for p in Pf])
        np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize("form", ("csr64", "dense64"))
def test_wd_very_sparse_rows(isa, rng, form):
    """Few entries over many bins: the index-merge wd (the CDF-chunk one serves denser rows)."""
    V = 32001
    X = np.zeros((5, V))
    for r in range(5):
        X[r, rng.choice(V, 4, replace=False)] = rng.integers(1, 9, 4)
    X[0, V - 1] = 3.0  # the last bin
    X[1, 0] = 2.0  # the first
    got = divergence(as_form(X, form), metric="wd")
    want = oracle(X, None, "wd", 0.0)
    np.fill_diagonal(want, 0.0)
    assert_close(got, want, 1e-12)
    assert_close(divergence(as_form(X, form), as_form(X[:2], form), "wd"), want[:, :2], 1e-12)


# ---- input forms -----------------------------------------------------------------------------
@pytest.mark.parametrize("metric", METRICS)
def test_sparse_dense_mixed_agree(isa, rng, metric):
    P, R = random_counts(rng, 5, 500, density=0.05), random_counts(rng, 6, 500, density=0.2)
    ref = divergence(P, R, metric)
    for a, b in [(sp.csr_matrix(P), sp.csr_matrix(R)), (sp.csr_matrix(P), R), (P, sp.csr_array(R)),
                 (sp.coo_matrix(P), sp.csc_matrix(R))]:
        assert_close(divergence(a, b, metric), ref, 1e-12)
    assert_close(ref, oracle(P, R, metric, 1e-10), 1e-12)


def test_csr_tuple_and_integer_counts(isa, rng):
    P = random_counts(rng, 4, 100)
    m = sp.csr_matrix(P)
    ref = divergence(P, metric="js")
    t = CSR(m.indptr.astype(np.int32), m.indices.astype(np.int64), m.data.astype(np.int64), 100)
    assert_close(divergence(t, metric="js"), ref, 1e-12)
    assert_close(divergence(P.astype(np.int32), metric="js"), ref, 1e-12)
    assert_close(divergence(sp.csr_matrix(P.astype(np.int64)), metric="js"), ref, 1e-12)


def test_noncanonical_scipy_not_modified(isa):
    cols, vals = [5, 2, 5, 2], [1.0, 2.0, 3.0, 4.0]  # row 0: duplicate column 5, unsorted
    m = sp.csr_matrix((np.array(vals), np.array(cols), np.array([0, 3, 4])), shape=(2, 8))
    assert not m.has_canonical_format
    before = (m.indices.copy(), m.data.copy())
    got = divergence(m, metric="kl")
    dense = np.zeros((2, 8)); dense[0, 2] = 2; dense[0, 5] = 4; dense[1, 2] = 4
    want = oracle(dense, None, "kl", 1e-10); np.fill_diagonal(want, 0.0)
    assert_close(got, want, 1e-12)
    np.testing.assert_array_equal(m.indices, before[0])
    np.testing.assert_array_equal(m.data, before[1])


def test_explicit_zeros_in_csr(isa):
    m = sp.csr_matrix((np.array([0.0, 2.0, 0.0, 1.0]), np.array([0, 1, 2, 3]), np.array([0, 2, 4])), shape=(2, 4))
    dense = m.toarray()
    for metric in METRICS:
        assert_close(divergence(m, metric=metric), divergence(dense, metric=metric), 1e-12)


def test_noncontiguous_and_misaligned(isa, rng):
    X = random_counts(rng, 6, 70)
    for metric in METRICS:
        ref = divergence(np.ascontiguousarray(X[:, ::2]), metric=metric)
        assert_close(divergence(X[:, ::2], metric=metric), ref, 1e-12)
        assert_close(divergence(np.asfortranarray(X), metric=metric), divergence(X, metric=metric), 1e-12)
        buf = np.zeros(X.size + 3)
        Y = buf[3:].reshape(X.shape)  # contiguous, base 24 bytes off any vector alignment
        Y[...] = X
        assert_close(divergence(Y, metric=metric), divergence(X, metric=metric), 1e-12)


@pytest.mark.parametrize("form", ("dense64", "csr64"))
@pytest.mark.parametrize("metric", METRICS)
def test_r_none_vs_explicit(isa, rng, metric, form):
    X = random_counts(rng, 9, 130, density=0.4)
    full = divergence(as_form(X, form), as_form(X, form), metric)
    sym = divergence(as_form(X, form), None, metric)
    np.fill_diagonal(full, 0.0)
    assert_close(sym, full, 1e-12)
    assert np.all(np.diag(sym) == 0.0)
    if metric != "kl":
        np.testing.assert_array_equal(sym, sym.T)


@pytest.mark.parametrize("eps", [0.0, 1e-10])
def test_symmetric_js_equals_explicit(isa, rng, eps):
    """js with R=None runs its own index and pair loop (work-balanced row blocks, runs padded
    over every row for bins most rows hold, gather/scatter for the others); off the diagonal it
    must equal P against P bit for bit, for any thread count, and the oracle."""
    X = random_counts(rng, 45, 400, density=0.35)
    X[:, :30] += rng.integers(0, 3, size=(45, 30)) * (rng.random((45, 30)) < 0.9)  # bins ~90% hold
    X[:40, 30:40] += 1.0  # bins held by 40 of 45 rows
    X[3, 40:] = 0.0  # a row with few bins
    X[3, 41] = 2.0
    csr = sp.csr_matrix(X)
    full = divergence(csr, csr, "js", eps=eps)
    np.fill_diagonal(full, 0.0)
    want = oracle(X, None, "js", eps)
    np.fill_diagonal(want, 0.0)
    for threads in (1, 2, 3, 7):
        sym = divergence(csr, None, "js", eps=eps, threads=threads)
        np.testing.assert_array_equal(sym, full)
        assert_close(sym, want, 1e-12)


def test_symmetric_js_wide_vocabulary(isa, rng):
    """With very many bins and blocks the all-pairs loop finds each block's stretch of a bin by
    binary search instead of a (blocks x bins) table (more than 2^24 entries at 7 threads here,
    under at 1 thread): same bits either way."""
    V, rows = 1 << 20, 45
    cols = np.concatenate([rng.choice(V, size=300, replace=False), np.arange(40)])  # 40 held by all
    X = np.zeros((rows, cols.size))
    for i in range(rows):
        X[i] = rng.integers(1, 9, size=cols.size) * (rng.random(cols.size) < 0.5)
        X[i, -40:] += 1.0
    csr = sp.csr_matrix((X[:, np.argsort(cols)]), shape=(rows, cols.size))
    csr = sp.csr_matrix((csr.data, np.sort(cols)[csr.indices], csr.indptr), shape=(rows, V))
    want = oracle(X, None, "js", 1e-10)  # bins no row holds contribute exactly 0
    np.fill_diagonal(want, 0.0)
    full = divergence(csr, csr, "js")
    np.fill_diagonal(full, 0.0)
    for threads in (1, 7):
        sym = divergence(csr, None, "js", threads=threads)
        np.testing.assert_array_equal(sym, full)
        assert_close(sym, want, 1e-12)


@pytest.mark.parametrize("density", [0.3, 0.9])
@pytest.mark.parametrize("form", ("dense64", "csr64", "csr32"))
@pytest.mark.parametrize("metric", METRICS)
def test_threads_identical(isa, rng, metric, form, density):
    P, R = random_counts(rng, 11, 300, density=density), random_counts(rng, 70, 300, density=density)
    for a, b in [(P, R), (P[:2], R), (P, None)]:
        a, b = as_form(a, form), (None if b is None else as_form(b, form))
        np.testing.assert_array_equal(divergence(a, b, metric, threads=1), divergence(a, b, metric, threads=2))


def test_empty_and_shapes(isa, rng):
    X = random_counts(rng, 3, 10)
    assert divergence(X[:0], X).shape == (0, 3)
    assert divergence(X, X[:0]).shape == (3, 0)
    assert divergence(X[0], X).shape == (1, 3)  # 1-D: one row


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ("dense64", "dense32", "csr64"))
@pytest.mark.parametrize("bad", ["nan", "neg", "inf", "zero_row"])
def test_bad_values_raise(isa, form, bad):
    X = np.ones((3, 9))
    if bad == "nan":
        X[1, 4], msg = np.nan, "NaN"
    elif bad == "neg":
        X[1, 4], msg = -1.0, "negative"
    elif bad == "inf":
        X[1, 4], msg = np.inf, "infinite"
    else:
        X[1], msg = 0.0, "all zero"
    A = as_form(X, form)
    for metric in METRICS:
        with pytest.raises(ValueError, match=msg):
            divergence(A, metric=metric)
        with pytest.raises(ValueError, match=msg):
            divergence(np.ones((2, 9)), A, metric=metric)


def test_bad_arguments_raise():
    X = np.ones((2, 5))
    with pytest.raises(ValueError, match="bins"):
        divergence(X, np.ones((2, 6)))
    with pytest.raises(ValueError, match="bins"):
        divergence(sp.csr_matrix(X), sp.csr_matrix(np.ones((2, 6))))
    with pytest.raises(ValueError, match="unknown metric"):
        divergence(X, metric="hellinger")
    with pytest.raises(ValueError, match="eps"):
        divergence(X, eps=-1e-3)
    with pytest.raises(ValueError, match="eps"):
        divergence(X, eps=float("nan"))
    with pytest.raises(ValueError, match="threads"):
        divergence(X, threads=0)
    for dt in (np.complex128, np.bool_, np.float16, object):
        with pytest.raises(TypeError, match="dtype"):
            divergence(X.astype(dt))
    with pytest.raises(TypeError, match="dtype"):
        divergence(sp.csr_matrix(X.astype(np.complex64)))
    with pytest.raises(ValueError, match="unsorted or duplicate"):
        divergence(CSR(np.array([0, 2]), np.array([3, 1]), np.array([1.0, 1.0]), 5))
    with pytest.raises(ValueError, match="column index"):
        divergence(CSR(np.array([0, 1]), np.array([7]), np.array([1.0]), 5))


def test_log_kernel_accuracy(isa, rng):
    """The vector logs the kernels use: ~1 ulp over the whole positive range, subnormals too."""
    x = np.concatenate([
        np.exp(rng.uniform(np.log(1e-308), np.log(1e308), 20000)),
        rng.uniform(0.5, 2.0, 20000),  # around 1, where log is small
        1.0 + rng.uniform(-1e-6, 1e-6, 1000),
        np.array([1.0, 0.75, 1.5, 2.0, 0.5, np.nextafter(0.75, 0), np.nextafter(1.5, 0), 5e-324,
                  2.2250738585072014e-308, 1e-310, 1.7976931348623157e308]),
        rng.uniform(1e-320, 2e-308, 1000),  # subnormal
    ])
    want = np.log(x.astype(np.longdouble))
    from loramix import _core_testing  # test hooks: built with LORAMIX_TESTING (pip builds)
    got = _core_testing.divergence_log(x, isa)
    err = np.abs(got.astype(np.longdouble) - want)
    ulp = np.spacing(np.abs(want.astype(np.float64))).astype(np.longdouble)
    # measured: <= 1.83 ulp of the result, or <= 1.8e-17 absolute where log x is near 0
    assert np.all(err <= np.maximum(2.5 * ulp, 4e-17)), float(np.max(err / np.maximum(ulp, 1e-300)))


def test_log_abs_kernel_accuracy(isa, rng):
    """The sparse js loop's log: only ever called on m <= 1 and weighted by m (sum m <= 1), so it
    is held to 2 ulp of the result or 2.5e-16 absolute (no relative bound just below 1)."""
    x = np.concatenate([
        np.exp(rng.uniform(np.log(1e-308), 0.0, 200000)),
        rng.uniform(0.0, 1.0, 200000),
        1.0 - rng.uniform(0.0, 1e-6, 10000),
        np.array([1.0, 0.75, 0.5, np.nextafter(1.0, 0), np.nextafter(0.5, 0), 1.0 / 1.03125,
                  5e-324, 2.2250738585072014e-308, 1e-310]),
        rng.uniform(1e-320, 2e-308, 1000),  # subnormal
    ])
    x = x[x > 0]
    want = np.log(x.astype(np.longdouble))
    from loramix import _core_testing  # test hooks: built with LORAMIX_TESTING (pip builds)
    err = np.abs(_core_testing.divergence_log_abs(x, isa).astype(np.longdouble) - want)
    ulp = np.spacing(np.abs(want.astype(np.float64))).astype(np.longdouble)
    # measured: avx512 <= 1.1 ulp, or <= 1.3e-16 absolute where |log x| < 1; avx2 = its log_f64
    assert np.all(err <= np.maximum(2.0 * ulp, 2.5e-16)), float(np.max(err / ulp))


@pytest.mark.parametrize("eps", [1e-10, 0.0, 1e-3, 1e-300])
def test_js_row_kernel_bits(isa, rng, eps):
    """build_sparse's js values of a row (one kernel: divisions and logs vectorized) are, bit for
    bit, the formula it replaced: each step rounded as written, the logs by the ISA's log_f64."""
    from loramix import _core_testing  # test hooks: built with LORAMIX_TESTING (pip builds)
    for n in (0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 1000):
        for x in (np.round(rng.uniform(1, 300, n)), rng.uniform(1e-300, 1e-290, n)):
            x = x.copy()
            s = float(np.sum(x)) * rng.uniform(1.0, 1.5)
            p, w, u = _core_testing.divergence_js_row(x, s, eps, isa)
            a = x / s
            want_p, d = a + eps, a + 2.0 * eps
            lg = lambda v: _core_testing.divergence_log(np.ascontiguousarray(v), isa)  # noqa: E731
            want_u = 0.5 * (want_p * lg(2.0 * want_p / d)
                            + eps * lg(2.0 * eps / d if eps > 0 else np.ones(n)))
            want_w = 0.5 * want_p * lg(want_p) - want_u
            for got, want in ((p, want_p), (u, want_u), (w, want_w)):
                assert got.tobytes() == want.tobytes(), (n, eps)
            xo = np.concatenate([[0.0], x])[1:]  # offset by one element: unaligned loads
            assert _core_testing.divergence_js_row(xo, s, eps, isa)[1].tobytes() == want_w.tobytes()


def test_check_row_kernel(isa, rng):
    """build_sparse's vector check of a CSR row against the rule it stands for, with one fault
    (or two) at every position of rows around the vector widths; valid rows count their
    non-zeros."""
    from loramix import _core_testing  # test hooks: built with LORAMIX_TESTING (pip builds)

    def want(idx, x, cols):
        i = idx.astype(np.int64)
        ok = bool(np.all(i < cols) and np.all(np.diff(np.concatenate([[-1], i])) > 0)
                  and np.all(x >= 0) and np.all(x < np.inf))
        return ok, int(np.sum(x > 0))

    faults = [("col", -1), ("col", -5), ("col", "cols"), ("col", "dup"), ("col", "down"),
              ("x", np.nan), ("x", np.inf), ("x", -np.inf), ("x", -1e-300), ("x", -0.0), ("x", 0.0)]
    for n in (0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33):
        cols = 3 * n + 10
        for trial in range(3):
            idx = np.sort(rng.choice(cols, n, replace=False)).astype(np.int32)
            x = rng.uniform(0, 5, n) * (rng.random(n) > 0.2)
            assert _core_testing.divergence_check_row(idx, x, cols, isa) == want(idx, x, cols)
            for pos in range(n):
                for kind, val in faults:
                    i2, x2 = idx.copy(), x.copy()
                    if kind == "x":
                        x2[pos] = val
                    elif val == "cols":
                        i2[pos] = cols + trial
                    elif val == "dup":
                        i2[pos] = i2[pos - 1] if pos else -1
                    elif val == "down":
                        i2[pos] = i2[pos - 1] - 1 if pos else -2
                    else:
                        i2[pos] = val
                    got = _core_testing.divergence_check_row(i2, x2, cols, isa)
                    assert got[0] == want(i2, x2, cols)[0], (n, pos, kind, val)
                    if got[0]:
                        assert got == want(i2, x2, cols)


def test_invalid_sparse_rows_name_the_first_fault(isa):
    """Sparse float64 rows are checked by a vector kernel and summed in pairs; the message is still
    the one for the first bad row, whatever the faults' positions in the vectors."""
    V = 40
    for n in (5, 8, 9, 17):
        for pos in (0, n // 2, n - 1):
            for bad_row in (0, 1, 2, 3):
                # (a column out of range is refused in Python, before the core)
                for fault, msg in (("nan", "NaN"), ("neg", "negative"), ("dup", "unsorted or duplicate"),
                                   ("zero", "all zero")):
                    indptr = np.arange(5) * n
                    indices = np.tile(np.arange(n, dtype=np.int32) * 2, 4)
                    data = np.ones(4 * n)
                    k = bad_row * n + pos
                    if fault == "nan":
                        data[k] = np.nan
                    elif fault == "neg":
                        data[k] = -1.0
                    elif fault == "dup":
                        indices[k] = indices[k - 1] if pos else indices[k + 1]
                    else:
                        data[bad_row * n:(bad_row + 1) * n] = 0.0
                    if bad_row < 3:  # a second bad row after it: its fault must not be the one named
                        data[3 * n] = np.inf
                    with pytest.raises(ValueError, match=f"row {bad_row} of P .*{msg}"):
                        divergence(CSR(indptr, indices, data, V), None, "js", threads=1)


def test_core_refuses_silent_copies():
    X = np.ones((3, 4))
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.divergence(X[:, ::2], None, "js", 1e-10, 1)
    with pytest.raises(TypeError, match="dtype"):
        _core.divergence(X.astype(np.int64), None, "js", 1e-10, 1)


# ---- prepared bank ------------------------------------------------------------------------------
@pytest.mark.parametrize("q", [1, 2, 3, 9])
@pytest.mark.parametrize("density", [0.3, 0.9])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("metric", METRICS)
def test_prepared_equals_unprepared(isa, rng, metric, form, density, q):
    """Every path (direct, index in tiles, dense loop, wd) gives bit-identical results prepared."""
    P, R = random_counts(rng, q, 400, density), random_counts(rng, 11, 400, density)
    R[0] += 1.0
    Pf, Rf = as_form(P, form), as_form(R, form)
    bank = prepare(Rf)
    for threads in (1, 2):  # tiles depend on threads; results must not
        want = divergence(Pf, Rf, metric, threads=threads)
        np.testing.assert_array_equal(bank.divergence(Pf, metric, threads=threads), want)
        np.testing.assert_array_equal(bank.divergence(Pf, metric, threads=threads), want)  # cached
        np.testing.assert_array_equal(divergence(Pf, bank, metric, threads=threads), want)
    assert_close(bank.divergence(Pf, metric), oracle(Pf, Rf, metric, 1e-10), rtol_for(form))


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_prepared_eps_isa_switch_and_copy(rng, eps):
    """The bank keeps its own copy of R, and its caches follow the active ISA."""
    P, R = random_counts(rng, 4, 300, 0.3), random_counts(rng, 6, 300, 0.5)
    R[0] += 1.0
    Rc = sp.csr_matrix(R)
    bank = prepare(Rc, eps=eps)
    assert bank.shape == (6, 300) and bank.eps == eps and len(bank) == 6
    want = {m: divergence(P, Rc, m, eps=eps) for m in METRICS}
    Rc.data[:] = 1.0  # the caller's arrays change; the bank must not
    before = _core.active_isa()
    try:
        for isa in _core.available_isas():
            _core.set_active_isa(isa)
            ref = {m: divergence(P, sp.csr_matrix(R), m, eps=eps) for m in METRICS}
            for m in METRICS:
                np.testing.assert_array_equal(bank.divergence(P, m), ref[m])
                assert_close(bank.divergence(P, m), want[m], 1e-12)
    finally:
        _core.set_active_isa(before)
    with pytest.raises(ValueError, match="eps"):
        divergence(P, bank, "js", eps=eps + 1.0)


def test_prepared_rejects_bad_input(rng):
    R = random_counts(rng, 3, 50, 0.5)
    R[1, 3] = np.nan
    with pytest.raises(ValueError, match="row 1 of R holds NaN"):
        prepare(R)
    with pytest.raises(ValueError, match="eps"):
        prepare(random_counts(rng, 3, 50), eps=-1.0)
    bank = prepare(random_counts(rng, 3, 50))
    with pytest.raises(ValueError, match="bins"):
        bank.divergence(random_counts(rng, 2, 51))
    with pytest.raises(ValueError, match="unknown metric"):
        bank.divergence(random_counts(rng, 2, 50), "cos")
    bad = random_counts(rng, 2, 50)
    bad[0, 0] = -1.0
    with pytest.raises(ValueError, match="negative"):
        bank.divergence(bad)
    assert bank.divergence(np.zeros((0, 50))).shape == (0, 3)


# ---- a stored js index (what `bank build` writes into bank.index) ------------------------------
def _sparse_bank(rng, n, v, fill):
    R = random_counts(rng, n, v, fill)
    R[:, 0] += 1.0          # a bin every row holds: a dense run in every tile
    return R


@pytest.mark.parametrize("form", ["csr64", "dense32"])
def test_stored_js_index_round_trip_is_bit_identical(isa, rng, form):
    """export_js_index -> (any file-like trip: copies) -> from_js_index gives, for any query size,
    thread count and tiling, exactly what divergence(P, R) gives."""
    R = _sparse_bank(rng, 37, 400, 0.2)
    Rf = sp.csr_matrix(R) if form == "csr64" else R.astype(np.float32)
    for tiles in (1, 3, 8):
        arrays = {k: np.array(v) for k, v in prepare(Rf).export_js_index(tiles).items()}
        assert {k: v.dtype.str for k, v in arrays.items()} == prepare(Rf).JS_INDEX_ARRAYS
        assert len(arrays["tile_rows"]) == tiles + 1 and arrays["voff"].shape == (tiles, 401)
        for k in arrays:
            arrays[k].setflags(write=False)           # as mapped from a read-only file
        stored = type(prepare(Rf)).from_js_index(arrays, R.shape, 1e-10, isa)
        for q in (1, 2, 5, 40):
            P = random_counts(rng, q, 400, 0.3)
            want = divergence(P, Rf, "js")
            assert_close(want, oracle(P, R, "js", 1e-10), 1e-12)
            for threads in (1, 2, 3):
                np.testing.assert_array_equal(stored.divergence(P, "js", threads=threads), want)
            np.testing.assert_array_equal(divergence(sp.csr_matrix(P), stored, "js"), want)


def test_stored_js_index_answers_js_on_its_isa_only(rng):
    R = _sparse_bank(rng, 9, 120, 0.3)
    bank = prepare(R)
    arrays = bank.export_js_index(4)
    stored = type(bank).from_js_index(arrays, R.shape, 1e-10, _core.active_isa())
    P = random_counts(rng, 2, 120, 0.3)
    for m in ("kl", "wd"):
        with pytest.raises(ValueError, match=f"stored js index; it cannot answer {m}"):
            stored.divergence(P, m)
    with pytest.raises(ValueError, match="eps"):
        divergence(P, stored, "js", eps=1e-9)
    others = [i for i in _core.available_isas() if i != _core.active_isa()]
    before = _core.active_isa()
    try:
        for other in others:
            _core.set_active_isa(other)
            with pytest.raises(ValueError, match=f"built with the {before} kernels but {other} is active"):
                stored.divergence(P, "js")
    finally:
        _core.set_active_isa(before)
    np.testing.assert_array_equal(stored.divergence(P, "js"), divergence(P, R, "js"))


def _damaged(arrays, what):
    a = {k: np.array(v) for k, v in arrays.items()}
    if what == "row":
        a["row"][len(a["row"]) // 2] = 10_000
    elif what == "row_negative":
        a["row"][0] = -1
    elif what == "voff_order":
        a["voff"][1, 5], a["voff"][1, 6] = a["voff"][1, 6] + 1, a["voff"][1, 5]
    elif what == "voff_end":
        a["voff"][0, -1] -= 1
    elif what == "tile_rows":
        a["tile_rows"][1] = a["tile_rows"][2]
    elif what == "sizes":
        a["x1"] = a["x1"][:-1]
    elif what == "missing":
        del a["c1"]
    elif what == "dtype":
        a["row"] = a["row"].astype(np.int64)
    return a


@pytest.mark.parametrize("what,match", [
    ("row", "row number lies outside"), ("row_negative", "row number lies outside"),
    ("voff_order", "bin offsets decrease|do not span"), ("voff_end", "do not span"),
    ("tile_rows", "has no rows"), ("sizes", "sizes disagree"), ("missing", "'c1' is missing"),
    ("dtype", "expected dtype int32"),
])
def test_damaged_stored_js_index_is_refused_before_use(rng, what, match):
    """Every offset and row number is checked: a damaged file can never make the kernel read or
    write out of bounds."""
    R = _sparse_bank(rng, 12, 90, 0.3)
    bank = prepare(R)
    arrays = bank.export_js_index(3)
    with pytest.raises((ValueError, TypeError), match=match):
        type(bank).from_js_index(_damaged(arrays, what), R.shape, 1e-10, _core.active_isa())
    with pytest.raises(ValueError, match="rows 12, cols 91"):
        type(bank).from_js_index(arrays, (12, 91), 1e-10, _core.active_isa())
