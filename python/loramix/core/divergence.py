"""Batched divergences between token histograms (JS, KL, 1-D Wasserstein).

The work runs in the compiled core (``loramix._core``): sparse inputs go through an inverted
index so that a pair of histograms costs one log per bin the two share; dense inputs through a
blocked SIMD loop. The numerical contract is in ``cpp/include/loramix/divergence.h``.
"""
from __future__ import annotations

from typing import NamedTuple

import sys

import numpy as np

from loramix import _core

__all__ = ["CSR", "divergence", "prepare", "PreparedHistograms", "METRICS", "EPS"]

METRICS = ("js", "kl", "wd")
#: the smoothing every default uses (the paper's profile: normalize, then + 1e-10 per bin)
EPS = 1e-10


class CSR(NamedTuple):
    """A CSR histogram matrix without scipy: row ``r`` holds ``data[indptr[r]:indptr[r+1]]``
    at columns ``indices[indptr[r]:indptr[r+1]]`` (strictly increasing within a row) of
    ``n_cols`` bins."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    n_cols: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, n_cols)``, as a scipy sparse matrix reports it."""
        return len(self.indptr) - 1, int(self.n_cols)


def csr_matrix(indptr, indices, data, n_cols: int, *, core: bool = False):
    """Histograms in CSR parts as a ``scipy.sparse.csr_array``, or as a :class:`CSR` with
    ``core`` or without scipy (the compiled metrics take both; :class:`CSR` needs no scipy
    import, 0.2-0.4 s)."""
    if not core:
        try:
            import scipy.sparse as sp
        except ImportError:
            pass
        else:
            return sp.csr_array((data, indices, indptr), shape=(len(indptr) - 1, n_cols))
    return CSR(indptr, indices, data, n_cols)


def _value_dtype(dtype: np.dtype, what: str) -> np.dtype:
    """float32/float64 stay as they are; integer counts become float64 (exact below 2**53)."""
    if dtype == np.float32 or dtype == np.float64:
        return dtype
    if dtype.kind in "iu":
        return np.dtype(np.float64)
    raise TypeError(
        f"{what}: unsupported dtype {dtype} (expected float32, float64 or integer counts)"
    )


def _is_scipy_sparse(x) -> bool:
    # scipy is not imported to ask (0.2-0.4 s): a scipy matrix exists only once scipy.sparse is loaded
    sp = sys.modules.get("scipy.sparse")
    return sp is not None and sp.issparse(x)


def _csr_parts(indptr, indices, data, n_cols: int, what: str):
    indptr = np.asarray(indptr)
    indices = np.asarray(indices)
    data = np.asarray(data)
    if indptr.ndim != 1 or indices.ndim != 1 or data.ndim != 1:
        raise ValueError(f"{what}: CSR indptr, indices and data must be 1-D")
    if indices.shape != data.shape:
        raise ValueError(f"{what}: CSR indices and data must have the same length")
    n_cols = int(n_cols)
    if n_cols < 1 or n_cols > np.iinfo(np.int32).max:
        raise ValueError(f"{what}: n_cols must be in [1, 2**31 - 1], got {n_cols}")
    if indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu":
        raise TypeError(f"{what}: CSR indptr and indices must be integer arrays")
    if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
        raise ValueError(f"{what}: CSR column index outside [0, {n_cols})")
    data = np.ascontiguousarray(data, dtype=_value_dtype(data.dtype, f"{what}.data"))
    return (
        np.ascontiguousarray(indptr, dtype=np.int64),
        np.ascontiguousarray(indices, dtype=np.int32),
        data,
        n_cols,
    )


def _as_core_input(x, what: str):
    """A C-contiguous 2-D float array (dense) or an (indptr, indices, data, n_cols) tuple."""
    if isinstance(x, CSR):
        return _csr_parts(x.indptr, x.indices, x.data, x.n_cols, what)
    if _is_scipy_sparse(x):
        if x.ndim != 2:
            raise ValueError(f"{what}: expected a 2-D sparse matrix")
        m = x.tocsr()  # no copy when already CSR; O(nnz) for COO/CSC, never dense
        if not m.has_canonical_format:
            m = m.copy()  # never modify the caller's matrix
            m.sum_duplicates()  # sorts indices and merges duplicates
        return _csr_parts(m.indptr, m.indices, m.data, m.shape[1], what)
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array (rows x bins), got {a.ndim}-D")
    # A contiguous copy only when needed (non-contiguous views, integer counts).
    return np.ascontiguousarray(a, dtype=_value_dtype(a.dtype, what))


def _check_metric(metric) -> None:
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (expected one of {', '.join(METRICS)})")


def _check_eps(eps) -> float:
    eps = float(eps)
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def _n_threads(threads) -> int:
    if threads is None:
        return 0
    if isinstance(threads, bool) or int(threads) != threads or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return int(threads)


def _n_cols(x) -> int:
    return x[3] if isinstance(x, tuple) else x.shape[1]


class PreparedHistograms:
    """A bank of histograms ``R`` (N x V) prepared once for many ``divergence(P, R)`` calls.

    Holds, in the compiled core, a copy of ``R`` and -- built at the first query of each metric
    and then kept -- its normalized rows, per-row one-sided sums and inverted index: the part
    of a call that grows with N. ``bank.divergence(P, metric)`` returns exactly (bit for bit)
    what ``divergence(P, R, metric, bank.eps)`` returns; ``divergence(P, bank, metric)`` is the
    same call. ``R`` is validated here (ValueError). Queries may run from several threads.
    """

    def __init__(self, R, eps: float = EPS, *, threads: int | None = None):
        self.eps = _check_eps(eps)
        r = _as_core_input(R, "R")
        self._core = _core.PreparedHistograms(r, self.eps, _n_threads(threads))
        self.shape = (int(self._core.rows), int(self._core.cols))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"PreparedHistograms(shape={self.shape}, eps={self.eps!r})"

    #: the arrays of a stored js index (:meth:`export_js_index`), with their dtypes
    JS_INDEX_ARRAYS = {"tile_rows": "<i8", "tile_offset": "<i8", "voff": "<i8", "row": "<i4",
                       "x1": "<f8", "x2": "<f8", "c1": "<f8"}

    def export_js_index(self, tiles: int = 8, *, threads: int | None = None) -> dict:
        """This bank's js index as plain arrays (:attr:`JS_INDEX_ARRAYS`), built with the active
        ISA's kernels, its rows cut into ``tiles`` tiles (at most the row count): what
        :meth:`from_js_index` takes back, e.g. after a trip through a file. Its layout does not
        depend on the thread count, so one stored index serves any number of threads."""
        return self._core.export_js_index(int(min(tiles, self.shape[0])), _n_threads(threads))

    @classmethod
    def from_js_index(cls, arrays: dict, shape: tuple[int, int], eps: float, isa: str) -> "PreparedHistograms":
        """A bank over a stored js index (:meth:`export_js_index`'s arrays, e.g. mapped from a
        file: borrowed, not copied, and kept alive with the result). It answers ``js`` only, with
        the kernels of ``isa`` active, bit for bit as the bank it was exported from; any offset or
        row number out of place raises ValueError before the first use. Queries raise ValueError
        while another ISA is active (``loramix.bank.index`` checks that before using one)."""
        self = cls.__new__(cls)
        self.eps = _check_eps(eps)
        rows, cols = int(shape[0]), int(shape[1])
        self._core = _core.PreparedHistograms.from_js_index(dict(arrays), rows, cols, self.eps, str(isa))
        self.shape = (rows, cols)
        return self

    def divergence(self, P, metric: str = "js", *, threads: int | None = None) -> np.ndarray:
        """Divergences (Q, N) between the rows of ``P`` and the bank; see :func:`divergence`."""
        _check_metric(metric)
        nthreads = _n_threads(threads)
        p = _as_core_input(P, "P")
        if _n_cols(p) != self.shape[1]:
            raise ValueError(
                f"P has {_n_cols(p)} bins but R has {self.shape[1]} (histograms must share one vocabulary)"
            )
        return self._core.divergence(p, metric, nthreads)


def prepare(R, eps: float = EPS, *, threads: int | None = None) -> PreparedHistograms:
    """``PreparedHistograms(R, eps)``: prepare a bank once, query it with ``.divergence(P, metric)``."""
    return PreparedHistograms(R, eps, threads=threads)


def divergence(P, R=None, metric: str = "js", eps: float = EPS, *, threads: int | None = None):
    """Divergences between the rows of ``P`` (Q x V) and the rows of ``R`` (N x V).

    Returns a float64 array of shape (Q, N); ``R=None`` compares ``P`` with itself (each
    unordered pair computed once for ``js``/``wd``; the diagonal is 0).

    Inputs: dense float32/float64 numpy arrays, ``scipy.sparse`` matrices/arrays (used as CSR,
    never densified; non-canonical ones are canonicalized on a copy) or :class:`CSR` tuples;
    integer counts are read as float64. Dense and sparse may be mixed (the dense side is then
    read sparsely). A non-contiguous dense array is copied to a contiguous one first. Each row
    is normalized to sum 1, then ``eps`` is added to every one of the V bins (no
    renormalization). Natural log (nats). All arithmetic is float64 whatever the input dtype.

    Speed: for ``js``/``kl`` a pair costs the bins both rows hold (an inverted index); dense
    inputs that are at least half non-zero use a blocked SIMD loop over all bins instead. The
    kernels follow ``loramix.info()["active"]`` (``LORAMIX_ISA`` overrides it).

    * ``"js"``: 0.5 KL(p||m) + 0.5 KL(q||m), m = (p+q)/2.
    * ``"kl"``: KL(P_i || R_j); ``eps=0`` gives +inf where R_j is 0 and P_i is not.
    * ``"wd"``: sum_v |CDF_p(v) - CDF_q(v)| over the V ordered bins of the normalized rows without
      eps (``scipy.stats.wasserstein_distance`` on token ids).

    ``R`` may be a :class:`PreparedHistograms` (see :func:`prepare`): the bank's preparation
    (normalization, per-row sums, inverted index) is then done once, not per call; ``eps`` must
    equal the bank's.

    Raises ValueError for NaN/inf/negative values, an all-zero row, a width mismatch, an
    unknown metric or a negative eps; TypeError for unsupported dtypes. ``threads=None`` uses
    ``LORAMIX_NUM_THREADS`` or all cores; the GIL is released and Ctrl-C interrupts the call.
    """
    _check_metric(metric)
    eps = _check_eps(eps)
    nthreads = _n_threads(threads)
    if isinstance(R, PreparedHistograms):
        if eps != R.eps:
            raise ValueError(f"eps={eps} differs from the prepared bank's eps={R.eps}")
        return R.divergence(P, metric, threads=threads)
    p = _as_core_input(P, "P")
    r = None if R is None else _as_core_input(R, "R")
    if r is not None and _n_cols(p) != _n_cols(r):
        raise ValueError(f"P has {_n_cols(p)} bins but R has {_n_cols(r)} (histograms must share one vocabulary)")
    return _core.divergence(p, r, metric, eps, nthreads)
