"""Weighted sums, Gram matrices and bf16/f16 conversions against float64 / torch / numpy
oracles, on every ISA this CPU supports."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file as np_save_file

from loramix.core.tensors import (SafetensorsFile, SafetensorsWriter, bf16_to_f32, f16_to_f32, f32_to_bf16,
                             f32_to_f16, gram, mix_into, weighted_sum)

U32 = 2.0**-24
SIZES = [0, 1, 15, 16, 17, 31, 32, 33, 65536 + 3]
DTYPES = ["F32", "F16", "BF16"]


def _bf16_bits_to_f64(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _decode(out: np.ndarray, dtype: str) -> np.ndarray:
    return _bf16_bits_to_f64(out) if dtype == "BF16" else out.astype(np.float64)


class Bank:
    """Sources of each dtype: numpy arrays (F32/F16, misaligned slices) and TensorRefs
    (F32/F16/BF16) from a safetensors file written with the safetensors library."""

    def __init__(self, tmp_path, rng, n, k, dtypes, offset=0):
        self.values = []  # float64 exact values of each source
        self.sources = []
        tensors = {}
        kinds = []
        for i in range(k):
            dt = dtypes[i % len(dtypes)]
            x = (rng.standard_normal(n) * 4).astype(np.float32)
            if dt == "BF16":
                bits = f32_to_bf16(x)
                tensors[f"t{i}"] = bits
                kinds.append(("file", i))
                self.values.append(_bf16_bits_to_f64(bits))
            else:
                npdt = np.float32 if dt == "F32" else np.float16
                xv = x.astype(npdt)
                self.values.append(xv.astype(np.float64))
                if i % 2 == 0:  # numpy source, misaligned start
                    buf = np.zeros(n + offset, npdt)
                    buf[offset:] = xv
                    kinds.append(("np", buf[offset:]))
                else:
                    tensors[f"t{i}"] = xv
                    kinds.append(("file", i))
        self.file = None
        if tensors:
            path = str(tmp_path / f"bank_{n}_{k}_{offset}.safetensors")
            # safetensors.numpy cannot store bf16: write via our writer (bits as uint16)
            entries = [(name, "BF16" if arr.dtype == np.uint16 else ("F32" if arr.dtype == np.float32 else "F16"),
                        arr.shape) for name, arr in tensors.items()]
            with SafetensorsWriter(path, entries) as w:
                for name, arr in tensors.items():
                    w.write(name, arr)
            self.file = SafetensorsFile(path)
        for kind, v in kinds:
            self.sources.append(v if kind == "np" else self.file.tensor(f"t{v}"))
        self.X = np.stack(self.values) if k else np.zeros((0, n))


def _check_wsum(out, W, X, dtype):
    W32 = W.astype(np.float32).astype(np.float64)
    ref = W32 @ X
    bound = (X.shape[0] + 1) * U32 * (np.abs(W32) @ np.abs(X))
    got = _decode(out, dtype).reshape(ref.shape)
    if dtype == "BF16":
        bound = bound + 2.0**-8 * np.abs(ref)
    elif dtype == "F16":
        bound = bound + 2.0**-11 * np.abs(ref) + 2.0**-25
    bound = bound + 1e-30
    err = np.abs(got - ref)
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound)}"


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("src_dtypes", [["F32"], ["F16"], ["BF16"], ["BF16", "F32", "F16"]])
def test_weighted_sum_vs_float64(isa, tmp_path, rng, src_dtypes, out_dtype):
    for n in SIZES:
        for k, q in [(1, 1), (5, 1), (6, 37)]:
            bank = Bank(tmp_path, rng, n, k, src_dtypes, offset=(n % 3) + 1)
            W = rng.standard_normal((q, k))
            if k > 1:
                W[rng.random(q) < 0.3, 0] = 0.0  # a column with some zeros
                W[:, 1] = 0.0  # an all-zero column; the others are dense
            if k > 3:
                W[rng.random(q) < 0.3, 3] = 0.0
            out = weighted_sum(bank.sources, W, out_dtype)
            assert out.shape == (q, n)
            assert out.dtype == {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[out_dtype]
            _check_wsum(out, W, bank.X, out_dtype)
            out1 = weighted_sum(bank.sources, W[0].astype(np.float32), out_dtype)
            assert out1.shape == (n,)
            _check_wsum(out1[None], W[:1], bank.X, out_dtype)


def test_weighted_sum_dense_large_q(isa, tmp_path, rng):
    # the GEMM-like path: Q >= 4, all weights non-zero, several K blocks
    n, k, q = 5000, 70, 37
    bank = Bank(tmp_path, rng, n, k, ["BF16", "F16", "F32"])
    W = rng.standard_normal((q, k))
    _check_wsum(weighted_sum(bank.sources, W), W, bank.X, "F32")
    _check_wsum(weighted_sum(bank.sources, W, "BF16"), W, bank.X, "BF16")


@pytest.mark.parametrize("q", [4, 16, 37])
def test_panel_rows_equal_single_row_calls(isa, tmp_path, rng, q):
    """The contract's chain of terms: a row of the Q >= 4 GEMM panel path is bit for bit the
    single-row (fused axpy) call with that row's weights, whatever the panel's blocking (sources
    staged as read, Kc at a time, widened a slab of columns at a time). Covered here: several
    chunks and slabs per chunk, several Kc blocks, sources read by pread (BF16/F16/F32 files) and
    from memory, and NaN/inf sources with zero weights in some rows (they leave the panel and are
    added in their place) near block boundaries; 1 and 2 threads."""
    n, k = 70_003, 70
    bank = Bank(tmp_path, rng, n, k, ["BF16", "F16", "F32"], offset=1)
    srcs = list(bank.sources)
    for j in (3, 31, 32, 33, 64):   # poisoned sources around the Kc blocks' edges
        x = (rng.standard_normal(n) * 4).astype(np.float32)
        x[rng.integers(0, n, 7)] = np.nan
        x[rng.integers(0, n, 3)] = np.inf
        srcs[j] = x
    W = rng.standard_normal((q, k)).astype(np.float32)
    W[rng.random((q, k)) < 0.2] = 0.0
    W[0, [3, 31, 32, 33, 64]] = 0.0     # row 0 excludes every poisoned source: stays finite
    # every source used by at least half the rows, so that all of them take the panel (a source
    # used by fewer rows is added after the panel's, by the contract)
    for j in range(k):
        zeros = np.flatnonzero(W[1:, j] == 0) + 1
        W[zeros[: max(0, len(zeros) - (q // 2 - 1))], j] = 1.0 + j
    for threads in (1, 2):
        for out_dtype in ("F32", "BF16"):
            got = weighted_sum(srcs, W, out_dtype, threads=threads)
            assert np.all(np.isfinite(got[0])) if out_dtype == "F32" else True
            for r in range(q):
                one = weighted_sum(srcs, W[r], out_dtype, threads=threads)
                np.testing.assert_array_equal(got[r].view(np.uint8), one.view(np.uint8), err_msg=f"row {r}")


def test_weighted_sum_threads_deterministic(isa, tmp_path, rng):
    bank = Bank(tmp_path, rng, 100_003, 9, ["BF16", "F32"])
    W = rng.standard_normal((5, 9))
    a = weighted_sum(bank.sources, W, threads=1)
    b = weighted_sum(bank.sources, W, threads=2)
    np.testing.assert_array_equal(a, b)


def test_zero_weight_never_reads_source(isa, rng):
    n = 1000
    good = [rng.standard_normal(n).astype(np.float32) for _ in range(5)]
    bad = np.full(n, np.nan, np.float32)
    bad[::3] = np.inf
    srcs = good[:2] + [bad] + good[2:]
    # Q = 1: weight 0 on the NaN source
    w = np.array([1.0, -2.0, 0.0, 0.5, 0.25, 3.0])
    out = weighted_sum(srcs, w)
    assert np.all(np.isfinite(out))
    # Q = 37, the NaN column mixed (zero in some rows): those rows stay finite
    W = rng.standard_normal((37, 6))
    W[::2, 2] = 0.0
    out = weighted_sum(srcs, W)
    assert np.all(np.isfinite(out[::2])) and np.all(np.isnan(out[1::2]) | np.isinf(out[1::2]))
    # all-zero column
    W[:, 2] = 0.0
    assert np.all(np.isfinite(weighted_sum(srcs, W)))
    # the NaN column used by most rows (GEMM panel path): the rows with weight 0 stay finite
    W = rng.standard_normal((37, 6))
    W[::5, 2] = 0.0
    out = weighted_sum(srcs, W)
    assert np.all(np.isfinite(out[::5]))
    rows = np.setdiff1d(np.arange(37), np.arange(0, 37, 5))
    assert np.all(np.isnan(out[rows]) | np.isinf(out[rows]))


def test_leave_one_out_batch_matches_oracle(isa, rng):
    """One zero weight per row (the leave-one-out pattern): sources are used by most rows, so they
    go through the GEMM panel with their zero weights; a source with NaN/inf in a few chunks only
    must still add nothing to the rows that exclude it, and its finite chunks must stay exact."""
    K, n = 23, 70_003
    srcs = [rng.standard_normal(n).astype(np.float32) for _ in range(K)]
    poison = srcs[4].copy()
    poison[40_000:40_010] = np.nan
    poison[5] = np.inf
    srcs[4] = poison
    W = rng.standard_normal((K, K))
    np.fill_diagonal(W, 0.0)
    out = weighted_sum(srcs, W)
    # row 4 excludes the poisoned source: finite everywhere and equal to the float64 oracle
    clean = [s if k != 4 else np.zeros(n, np.float32) for k, s in enumerate(srcs)]
    ref = W @ np.stack(clean).astype(np.float64)
    bound = (K + 1) * 2.0**-24 * (np.abs(W) @ np.abs(np.stack(clean).astype(np.float64))) + 1e-30
    assert np.all(np.isfinite(out[4]))
    assert np.all(np.abs(out[4] - ref[4]) <= bound[4])
    # every other row uses it: non-finite exactly where it is, oracle-exact elsewhere
    bad = ~np.isfinite(poison)
    others = np.setdiff1d(np.arange(K), [4])
    assert np.all(~np.isfinite(out[np.ix_(others, np.flatnonzero(bad))]))
    ref_full = W @ np.where(np.isfinite(np.stack(srcs)), np.stack(srcs), 0).astype(np.float64)
    good = np.flatnonzero(~bad)
    err = np.abs(out[np.ix_(others, good)] - ref_full[np.ix_(others, good)])
    assert np.all(err <= bound[np.ix_(others, good)] + (K + 1) * 2.0**-24 * np.abs(W[others, 4])[:, None]
                  * np.abs(poison[good])[None, :])


def test_nan_inf_propagate_quiet(isa):
    x = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    for dt in DTYPES:
        out = _decode(weighted_sum([x], np.array([2.0]), dt), dt)
        assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf and out[3] == 2.0


def test_weighted_sum_errors(rng):
    a = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="elements"):
        weighted_sum([a, np.ones(5, np.float32)], [1.0, 1.0])
    with pytest.raises(TypeError, match="float32 or float16"):
        weighted_sum([np.ones(4, np.float64)], [1.0])
    with pytest.raises(ValueError, match="C-contiguous"):
        weighted_sum([np.ones(8, np.float32)[::2]], [1.0])
    with pytest.raises(ValueError, match="columns"):
        weighted_sum([a], [1.0, 2.0])
    with pytest.raises(ValueError, match="out_dtype"):
        weighted_sum([a], [1.0], "I8")
    with pytest.raises(ValueError, match="no sources"):
        weighted_sum([], np.zeros(0))
    with pytest.raises(TypeError):
        weighted_sum([a], np.array([1], np.int64))
    np.testing.assert_array_equal(weighted_sum([a, a], [1, 2]), 3 * a)  # a list of ints is fine


@pytest.mark.parametrize("src_dtypes", [["F32"], ["BF16"], ["F16", "BF16", "F32"]])
def test_gram_vs_float64(isa, tmp_path, rng, src_dtypes):
    for n in SIZES:
        for k in (1, 3, 9):
            bank = Bank(tmp_path, rng, n, k, src_dtypes, offset=1)
            G = gram(bank.sources)
            assert G.shape == (k, k) and G.dtype == np.float64
            X = bank.X
            ref = X @ X.T
            bound = 72 * U32 * (np.abs(X) @ np.abs(X).T) + 1e-300
            assert np.all(np.abs(G - ref) <= bound)
            np.testing.assert_array_equal(G, G.T)


def test_gram_threads_deterministic(isa, rng):
    xs = [rng.standard_normal(50_001).astype(np.float32) for _ in range(6)]
    assert np.array_equal(gram(xs, threads=2), gram(xs, threads=2))
    np.testing.assert_allclose(gram(xs, threads=1), gram(xs, threads=2), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("dtypes", [("F32", "F16", "BF16"), ("BF16", "F32", "F16", "F32", "BF16")])
def test_mix_into_and_write_weighted_sum(isa, tmp_path, rng, dtypes):
    n, k = 10_007, 7
    bank = Bank(tmp_path, rng, n, k, ["BF16", "F16", "F32"])
    W = rng.standard_normal((len(dtypes), k))
    W[0, 3] = 0.0
    paths = [str(tmp_path / f"out{q}.safetensors") for q in range(len(dtypes))]
    writers = [SafetensorsWriter(p, [("m", dt, (n,)), ("x", "F32", (2,))], {"q": str(q)})
               for q, (p, dt) in enumerate(zip(paths, dtypes))]
    mix_into(writers, "m", bank.sources, W)
    for w in writers:
        w.write("x", np.zeros(2, np.float32))
        w.commit()
    for q, (p, dt) in enumerate(zip(paths, dtypes)):
        f = SafetensorsFile(p)
        assert f.metadata == {"q": str(q)}
        # same batch, same path: bit-identical to the in-memory result
        np.testing.assert_array_equal(f.numpy("m"), weighted_sum(bank.sources, W, dt)[q])
    p = str(tmp_path / "one.safetensors")
    with SafetensorsWriter(p, [("m", "BF16", (n,))]) as w:
        w.write_weighted_sum("m", bank.sources, W[1])
    np.testing.assert_array_equal(SafetensorsFile(p).numpy("m"), weighted_sum(bank.sources, W[1], "BF16"))
    with SafetensorsWriter(str(tmp_path / "bad.safetensors"), [("m", "F32", (n + 1,))]) as w:
        with pytest.raises(ValueError, match="elements"):
            w.write_weighted_sum("m", bank.sources, W[1])
        w.write("m", np.zeros(n + 1, np.float32))


# --- conversions ---------------------------------------------------------------------------

SPECIAL_F32 = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 65504.0, 65519.99, 65520.0, 65536.0, 1e30,
                        -1e30, 3.4028235e38, 2.0**-14, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 2.0**-26,
                        1.5 * 2.0**-24, 2.5 * 2.0**-24, 1e-40, -1e-45, 1.1754942e-38, 1.00390625, 1.01171875,
                        1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11], np.float32)


def _f32_samples(rng):
    rand_bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    # values near rounding ties for both formats
    base = rng.integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32)
    ties = np.concatenate([(base & ~np.uint32(0xFFFF)) | np.uint32(0x8000),
                           (base & ~np.uint32(0x1FFF)) | np.uint32(0x1000),
                           (base & ~np.uint32(0xFFFF)) | np.uint32(0x7FFF)])
    return np.concatenate([SPECIAL_F32, -SPECIAL_F32, rand_bits.view(np.float32), ties.view(np.float32)])


def _assert_same_or_quiet_nan(got_bits, ref_bits, x, quiet_bit, sign_bit):
    nan = np.isnan(x)
    np.testing.assert_array_equal(got_bits[~nan], ref_bits[~nan])
    g = got_bits[nan].astype(np.uint32)
    assert np.all(g & quiet_bit)  # quiet
    xs = x[nan].view(np.uint32) >> 31
    assert np.array_equal((g & sign_bit) != 0, xs == 1)  # sign kept


def test_f32_to_bf16_matches_torch(isa, rng):
    import torch
    x = _f32_samples(rng)
    got = f32_to_bf16(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    _assert_same_or_quiet_nan(got, ref, x, 0x40, 0x8000)
    from loramix import _core_testing  # test hooks: built with LORAMIX_TESTING (pip builds)
    scalar = np.array([_core_testing.scalar_f32_to_bf16(float(v)) for v in x[np.isnan(x)][:200]], np.uint16)
    np.testing.assert_array_equal(got[np.isnan(x)][:200], scalar)  # NaN bits == the scalar source of truth


def test_f32_to_f16_matches_numpy(isa, rng):
    x = _f32_samples(rng)
    got = f32_to_f16(x).view(np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    _assert_same_or_quiet_nan(got, ref, x, 0x200, 0x8000)
    from loramix import _core_testing  # test hooks: built with LORAMIX_TESTING (pip builds)
    scalar = np.array([_core_testing.scalar_f32_to_f16(float(v)) for v in x[np.isnan(x)][:200]], np.uint16)
    np.testing.assert_array_equal(got[np.isnan(x)][:200], scalar)


def test_f16_to_f32_all_patterns(isa):
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got = f16_to_f32(h)
    ref = h.astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
    gb = got.view(np.uint32)[nan]
    assert np.all(np.isnan(got[nan])) and np.all(gb & 0x400000)
    # payload kept
    np.testing.assert_array_equal((gb >> 13) & 0x1FF, h[nan].view(np.uint16) & 0x1FF)


def test_bf16_to_f32_all_patterns(isa):
    b = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = bf16_to_f32(b)
    np.testing.assert_array_equal(got.view(np.uint32), b.astype(np.uint32) << 16)


def test_round_trip_conversions_and_shapes(isa, rng):
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)
    assert f32_to_bf16(x).shape == (3, 5, 7) and f32_to_bf16(x).dtype == np.uint16
    np.testing.assert_array_equal(bf16_to_f32(f32_to_bf16(x)).view(np.uint32) & 0xFFFF, 0)
    np.testing.assert_array_equal(f16_to_f32(f32_to_f16(x)), x.astype(np.float16).astype(np.float32))
    with pytest.raises(TypeError):
        f32_to_bf16(x.astype(np.float64))
    # non-contiguous input of the right dtype is accepted (copied)
    np.testing.assert_array_equal(f32_to_f16(x[:, ::2]), x[:, ::2].astype(np.float16))


def test_tensor_ref_sources_match_numpy(isa, tmp_path, rng):
    x = rng.standard_normal(1234).astype(np.float16)
    p = str(tmp_path / "s.safetensors")
    np_save_file({"x": x}, p)
    ref = SafetensorsFile(p).tensor("x")
    np.testing.assert_array_equal(weighted_sum([ref], [1.5]), weighted_sum([x], [1.5]))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("kernel", ["gram", "weighted_sum"])
def test_long_calls_are_interruptible(kernel):
    """A signal handler that raises stops a long kernel within a few chunks."""
    import signal
    import time

    x = np.ones(2_000_000, np.float32)
    srcs = [x] * 2000  # full run: ~8e12 FLOP for gram, 5e11 FLOP for the Q=64 mix

    def handler(signum, frame):
        raise _Stop()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        t0 = time.perf_counter()
        with pytest.raises(_Stop):
            if kernel == "gram":
                gram(srcs)
            else:
                weighted_sum(srcs, np.ones((64, 2000), np.float32))
        assert time.perf_counter() - t0 < 3.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
