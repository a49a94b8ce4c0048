"""Mixing the bank's LoRA tensors with given weights, streamed through the compiled core.

Notation: member ``i`` has, per module, factors ``A_i`` (r_i × in), ``B_i`` (out × r_i) and
PEFT scaling ``s_i`` (``alpha/r`` or ``alpha/sqrt(r)``, per-module patterns applied), so its
update is ``ΔW_i = s_i B_i A_i``. A module a member lacks counts as zero for it. The output
always has scaling exactly 1 (``lora_alpha = r`` per module), so every scale is carried in
the factors.

Modes:

``factors`` (the paper's mix; LoraHub's and PEFT ``linear``'s family)
    ``A = Σ w_i A_i`` and ``B = Σ w_i s_i B_i`` — A and B mixed separately with the same
    weights, each member's scaling folded into B only. When all members share one scaling
    ``s`` this is exactly the paper's ``coefficients @ flattened_bank`` applied to A and B,
    with ``s`` carried in B; the delta ``B A`` has cross terms ``w_i w_j s_i B_i A_j``. A member
    of lower rank is zero-padded to the largest rank among the members used for that module.
    PEFT's ``add_weighted_adapter(combination_type="linear")`` differs: it puts
    ``sqrt(w_i s_i)`` on *each* factor, so a single adapter with weight ``w`` gives ``w s B A``
    there and ``w² s B A`` here (and in the paper). Streamed: one pass over the bank for all
    targets and tensors (:mod:`loramix.mixing.factors`: a ``tensors.MixPass`` of one Q × K
    weighted sum per tensor); zero weights are never read.

``concat`` (exact)
    ``Σ w_i s_i B_i A_i`` as one adapter of rank ``Σ r_i`` over the members used:
    ``B = [w_1 s_1 B_1 … w_k s_k B_k]``, ``A = [A_1; …; A_k]``. Equals PEFT's
    ``add_weighted_adapter(combination_type="cat")`` with the same weights (PEFT folds
    ``w_i s_i`` into A instead of B; the product is the same).

``svd`` (best rank-r approximation of the exact mix)
    From thin QRs of the stacked factors ``B_stack = Q_b R_b``, ``A_stackᵀ = Q_a R_a`` and an
    SVD of the small core ``R_b R_aᵀ = U S Vᵀ`` (float64): ``B = Q_b U_r √S_r``,
    ``A = √S_r V_rᵀ Q_aᵀ``. Never forms an out × in matrix. When ``Σ r_i`` is large (above
    :data:`SVD_DENSE_MAX`, e.g. hundreds of members with non-zero weight) the top-r triplets
    come from Lanczos bidiagonalization on the factored operator instead (machine precision,
    cost linear in ``Σ r_i``); ``top_k`` keeps ``Σ r_i`` small and the mode fast. Rank per
    module is ``min(r, rank available)``; at ``r ≥ Σ r_i`` it equals ``concat``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from loramix.bank import peft_io
from loramix.mixing import factors

MODES = ("factors", "concat", "svd")
_DTYPES = {"f32": "F32", "float32": "F32", "fp32": "F32", "f16": "F16", "float16": "F16",
           "fp16": "F16", "half": "F16", "bf16": "BF16", "bfloat16": "BF16"}


class MixError(ValueError):
    pass


def normalize_dtype(dtype: str | None, default: str = "F32") -> str:
    if dtype is None:
        return default
    d = _DTYPES.get(str(dtype).lower())
    if d is None:
        raise MixError(f"unknown dtype {dtype!r}; use f32, f16 or bf16")
    return d


@dataclass
class MixInfo:
    """What one output holds: its modules' ranks and the members that entered it."""

    ranks: dict[str, int] = field(default_factory=dict)
    members: list[int] = field(default_factory=list)
    #: SHA-256 of the written safetensors file (:func:`mix_to_files` with ``digest``), else "".
    sha256: str = ""
    #: with ``digest``: whether every value written is finite (None: not known, check the file)
    finite: bool | None = None


def plan(bank, W: np.ndarray, mode: str, rank: int | None = None) -> list[MixInfo]:
    """Per target, the output modules with their ranks (no tensor is read)."""
    if mode not in MODES:
        raise MixError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if rank is not None and int(rank) < 1:
        raise MixError(f"rank must be >= 1, got {rank}")
    W = np.atleast_2d(W)
    mem = bank.members
    modules = bank.module_index()
    module_ranks = bank.module_ranks()
    infos = [MixInfo(members=[int(i) for i in np.flatnonzero(W[q])]) for q in range(W.shape[0])]
    for name, holders in modules.items():
        nz = W[:, np.asarray(holders)] != 0                  # (Q, holders)
        ranks = module_ranks[name]
        ms = mem[holders[0]].modules[name]
        for q in np.flatnonzero(nz.any(axis=1)):
            used = ranks[nz[q]]
            if mode == "factors":
                r = int(used.max())
            elif mode == "concat":
                r = int(used.sum())
            else:
                r = min(int(rank or bank.rank), int(used.sum()), ms.in_features, ms.out_features)
            infos[q].ranks[name] = r
    for q, info in enumerate(infos):
        if not info.ranks:
            raise MixError(f"target {q}: the members with non-zero weight hold no LoRA modules")
    return infos


def check_rank(bank, W, mode: str, rank: int | None) -> None:
    """What ``generate`` asks of ``rank``: only mode ``svd`` has a free output rank, so ``rank``
    with ``factors`` (the members' largest rank) or ``concat`` (their sum) is refused; in ``svd``
    a rank above what a module's exact mix holds (``Σ r_i`` of its members used, or its layer
    size) is lowered to that (the exact mix) with a warning naming how many modules got less.
    ``W``: the weights (Q, N), or None to check only the mode."""
    if rank is None:
        return
    if mode != "svd":
        raise MixError(f"rank={rank} applies to mode svd only: mode {mode} keeps "
                       + ("the members' largest rank" if mode == "factors" else "the sum of the members' ranks")
                       + "; drop --rank or use --mode svd")
    if W is None:
        return
    got = [r for info in plan(bank, W, mode, rank) for r in info.ranks.values()]
    short = [r for r in got if r < int(rank)]
    if short:
        import warnings

        warnings.warn(f"rank {rank} is more than the exact mix holds in {len(short)} of {len(got)} "
                      f"module(s): they get rank {min(short)}-{max(short)} (the sum of the ranks of the members "
                      "used, or the layer size), i.e. the exact mix", stacklevel=3)


def mix_to_files(bank, W, paths, mode: str = "factors", *, rank: int | None = None,
                 dtype: str | None = None, metadata: dict | None = None,
                 progress: bool = False, threads: int | None = None, digest: bool = False) -> list[MixInfo]:
    """Mix the bank with weights ``W`` (Q, N) into Q safetensors files at ``paths``.

    Each file is written by the core's :class:`SafetensorsWriter` (temp file, atomic rename);
    on any error every writer is aborted and nothing is left at ``paths``. ``digest``: also
    each file's SHA-256 and whether all its values are finite, into ``MixInfo.sha256`` and
    ``MixInfo.finite`` (taken behind the mix, :class:`loramix.mixing.digests.HashBehind`, or
    while the files are committed).
    """
    from loramix.core import tensors

    W = np.atleast_2d(np.asarray(W, dtype=np.float64))
    if W.shape != (len(paths), len(bank.members)):
        raise MixError(f"weights have shape {W.shape}, expected ({len(paths)}, {len(bank.members)})")
    out_dtype = normalize_dtype(dtype, bank.dtype)
    infos = plan(bank, W, mode, rank)
    modules = bank.module_index()
    writers, behind, bar = [], None, None
    try:
        entries = [entries_for(bank, infos[q], out_dtype, modules) for q in range(len(paths))]
        for q, path in enumerate(paths):
            md = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
            writers.append(tensors.SafetensorsWriter(str(path), entries[q], md))
        items = list(modules.items())
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(items), desc=f"mix ({mode})", unit="module", file=sys.stderr, leave=False)
        if mode == "svd":
            _mix_exact_parallel(bank, W, items, infos, writers, mode, threads, bar)
        elif digest:   # the outputs are hashed behind the mix, module by module
            from loramix.mixing.digests import HashBehind

            key_module = {peft_io.tensor_key(n, ab): n for n in modules for ab in "AB"}
            try:
                behind = HashBehind([w.temp_path for w in writers], key_module.get)
            except OSError:   # e.g. out of descriptors: the outputs are hashed after the mix instead
                behind = None
        written = behind.written if behind is not None else (lambda name: None)
        if mode == "factors":
            factors.mix_factors(bank, W, items, infos, lambda q, key: (writers[q], key), threads, written, bar)
        for name, holders in (items if mode == "concat" else ()):
            mix_exact(bank, W, name, holders, infos, writers, mode)
            written(name)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        known, behind = (behind.finish() if behind is not None else None), None
        commit_all(writers, infos if digest else None, out_dtype, known)
    except BaseException:
        if bar is not None:
            bar.close()
        if behind is not None:
            behind.close()
        for w in writers:
            try:
                w.abort()
            except Exception:  # noqa: BLE001 - already failing; keep the first error
                pass
        raise
    return infos


def commit_all(writers, infos=None, dtype: str | None = None, known=None) -> None:
    """Commit every writer (fsync, rename into place), the Q commits in concurrent threads (the
    core releases the GIL): Q outputs wait about one fsync, not Q in a row. With ``infos``, each
    file's SHA-256 goes into ``infos[q].sha256``, hashed while the commits run (hashlib and numpy
    release the GIL too) from a descriptor opened on the finished temporary file before its commit
    renames it, and with ``dtype`` (every tensor's) whether all its values are finite, from the same
    read, into ``infos[q].finite``; ``known[q]``: output q's ``(sha256, finite)`` already taken
    (:class:`loramix.mixing.digests.HashBehind`), or None. The first error (in writer order) is
    raised once every commit has returned."""
    if len(writers) == 1 and infos is None:
        writers[0].commit()
        return
    from concurrent.futures import ThreadPoolExecutor

    from loramix.bank.integrity import safetensors_sha256_finite
    from loramix.core import default_threads

    fhs = []
    try:
        known = list(known or [None] * len(writers))
        if infos is not None:
            fhs = [open(w.temp_path, "rb") if known[q] is None else None for q, w in enumerate(writers)]
        todo = [fh for fh in fhs if fh is not None]
        with ThreadPoolExecutor(max_workers=min(len(writers), 16)) as commits, \
                ThreadPoolExecutor(max_workers=max(1, min(len(todo), default_threads()))) as hashes:
            done = [commits.submit(w.commit) for w in writers]
            sums = [hashes.submit(safetensors_sha256_finite, fh, dtype) if fh is not None else None for fh in fhs]
            for f in done:
                f.result()
            for q, (info, f) in enumerate(zip(infos or (), sums)):
                info.sha256, info.finite = f.result() if f is not None else known[q]
    finally:
        for fh in fhs:
            if fh is not None:
                fh.close()


def entries_for(bank, info: MixInfo, out_dtype: str, modules: dict) -> list[tuple]:
    """The writer entries ``(key, dtype, shape)`` of one output, for the modules in ``modules``."""
    entries = []
    for name, r in info.ranks.items():
        if name not in modules:
            continue
        inn, out = bank.module_shape(name)
        entries.append((peft_io.tensor_key(name, "A"), out_dtype, (r, inn)))
        entries.append((peft_io.tensor_key(name, "B"), out_dtype, (out, r)))
    return entries


def mix_exact(bank, W, name, holders, infos, writers, mode):
    """Mix module ``name`` for every target in ``concat`` or ``svd`` mode and write its A and B."""
    if mode == "svd":
        with _blas_single_thread():
            out = exact_factors(bank, W, name, holders, infos, mode)
    else:
        out = exact_factors(bank, W, name, holders, infos, mode)
    _write_exact(writers, name, out)


def _write_exact(writers, name, out):
    for q, (b, a) in out.items():
        writers[q].write(peft_io.tensor_key(name, "A"), np.ascontiguousarray(a, dtype=np.float32))
        writers[q].write(peft_io.tensor_key(name, "B"), np.ascontiguousarray(b, dtype=np.float32))


def exact_factors(bank, W, name, holders, infos, mode) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{q: (B, A)}`` of module ``name`` for the targets that hold it (``concat`` or ``svd``),
    computed without writing; each member's factors are read once for all targets."""
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    read: set[int] = set()   # members whose factors were read: their pages are released at the end

    def factors(i):
        if i not in cache:
            read.add(i)
            m = bank.members[i]
            ms = m.modules[name]
            cache[i] = (m.file.to_f32(ms.a_key), m.file.to_f32(ms.b_key))
        return cache[i]

    out = {}
    last = max((q for q in range(W.shape[0]) if name in infos[q].ranks), default=-1)
    for q in range(W.shape[0]):
        if name not in infos[q].ranks:
            continue
        j = [i for i in holders if W[q, i] != 0]
        if mode == "concat":
            a = np.concatenate([factors(i)[0] for i in j], axis=0)
            b = np.concatenate([factors(i)[1] * np.float32(W[q, i] * bank.members[i].modules[name].scaling)
                                for i in j], axis=1)
        else:
            # stacked in place (no list of float64 copies next to the stack: half the peak)
            ranks = [factors(i)[0].shape[0] for i in j]
            a64 = np.empty((sum(ranks), factors(j[0])[0].shape[1]))
            b64 = np.empty((factors(j[0])[1].shape[0], sum(ranks)))
            o = 0
            for i, r in zip(j, ranks):
                a64[o:o + r] = factors(i)[0]
                np.multiply(factors(i)[1], float(W[q, i] * bank.members[i].modules[name].scaling), out=b64[:, o:o + r],
                            dtype=np.float64)   # in float64, as astype(float64) * s
                o += r
            if q == last:     # the members' float32 copies are not needed by any later target
                cache.clear()
            b, a = truncated_factors(b64, a64, infos[q].ranks[name])
        out[q] = (b, a)
    from loramix.core import tensors

    tensors.release_pages([bank.members[i].file.tensor(bank.members[i].modules[name].a_key) for i in read] +
                          [bank.members[i].file.tensor(bank.members[i].modules[name].b_key) for i in read])
    return out


def _mix_exact_parallel(bank, W, items, infos, writers, mode, threads, bar=None):
    """``svd`` over all modules: modules run in a pool of ``threads`` workers, each with
    single-threaded BLAS (small LAPACK calls on a loaded machine are 10-30x slower with
    OpenBLAS's own threads), and are written in module order by this thread. At most two
    modules per worker are in flight, so memory stays a few modules' stacks."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from loramix.core import default_threads

    n = threads or default_threads()
    with _blas_single_thread(), ThreadPoolExecutor(max_workers=n) as ex:
        pending = deque()
        for name, holders in items:
            pending.append((name, ex.submit(exact_factors, bank, W, name, holders, infos, mode)))
            while len(pending) > 2 * n:
                done, fut = pending.popleft()
                _write_exact(writers, done, fut.result())
                if bar is not None:
                    bar.update(1)
        while pending:
            done, fut = pending.popleft()
            _write_exact(writers, done, fut.result())
            if bar is not None:
                bar.update(1)


class _blas_single_thread:
    """BLAS/LAPACK limited to one thread inside (threadpoolctl); a no-op without it."""

    def __enter__(self):
        try:
            import scipy.linalg  # noqa: F401 - load its own BLAS now, so that the limit covers it
        except ImportError:
            pass
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:   # pragma: no cover - threadpoolctl is a dependency
            self._ctx = None
            return self
        self._ctx = threadpool_limits(limits=1, user_api="blas")
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.restore_original_limits()


# Above this stacked rank Σr, a stack the Gram path cannot take (ill-conditioned or rank
# deficient) goes to Lanczos bidiagonalization (PROPACK, tolerance 0: to machine precision) on the
# factored operator x -> B_stack (A_stack x) instead of Householder QRs: O(Σr · (out + in)) per
# step, never an out × in (or in × Σr square) matrix.
SVD_DENSE_MAX = 512

# The Gram path is taken when cond(stack)² · eps stays below this (its subspace error is ~eps·κ²).
_GRAM_MAX_ERR = 1e-9
SVD_METHODS = ("auto", "gram", "qr", "lanczos")


def truncated_factors(b_stack: np.ndarray, a_stack: np.ndarray, r: int, method: str = "auto"):
    """Best rank-``r`` factors ``(B, A)`` of ``b_stack @ a_stack`` without forming it.

    ``b_stack`` (out × R), ``a_stack`` (R × in), float64. ``method``:

    - ``"gram"``: Cholesky of one factor's R × R Gram matrix (the better conditioned side, its
      taller one first), the other's Gram congruent to it, and the top-``r`` eigenpairs of that
      R × R matrix — the thin QR of both stacks and the SVD of their core, done through BLAS-3
      products (``out·R² + in·R²`` flops, one pass over each stack) instead of Householder
      reflections, which are 20-30x slower here. Refused (``None``) when the stack is rank
      deficient or ``cond² · eps`` exceeds ``1e-9``.
    - ``"qr"``: Householder thin QR of each stacked factor and an SVD of the small core
      ``R_b R_aᵀ`` (any stack, exact, slow for large R).
    - ``"lanczos"``: PROPACK on the factored operator (for large R and r ≪ R).
    - ``"auto"``: ``gram``, else ``lanczos`` when ``R >`` :data:`SVD_DENSE_MAX` and ``r`` is
      small, else ``qr``.

    The singular values are split evenly: ``B = U √S``, ``A = √S Vᵀ``.
    """
    if method not in SVD_METHODS:
        raise MixError(f"unknown svd method {method!r}; use one of {', '.join(SVD_METHODS)}")
    kmax = min(b_stack.shape[0], a_stack.shape[1], b_stack.shape[1])
    r = min(int(r), kmax)
    if method in ("auto", "gram"):
        got = _gram_factors(b_stack, a_stack, r)
        if got is not None or method == "gram":
            if got is None:
                raise MixError("svd method 'gram': the stacked factors are rank deficient or too "
                               "ill-conditioned for it; use 'qr' or 'lanczos'")
            return got
    if method == "lanczos" or (method == "auto" and b_stack.shape[1] > SVD_DENSE_MAX and r < kmax // 2
                               and _have_scipy()):
        try:
            u, s, vt = _lanczos_svd(b_stack, a_stack, r)
            root = np.sqrt(s)
            return u * root[None, :], root[:, None] * vt
        except np.linalg.LinAlgError:   # no convergence: the dense path is exact, only slower
            pass
    qb, rb = np.linalg.qr(b_stack)            # out×k_b, k_b×R
    qa, ra = np.linalg.qr(a_stack.T)          # in×k_a, k_a×R
    u, s, vt = np.linalg.svd(rb @ ra.T)       # k_b×k_a
    r = min(r, s.size)
    root = np.sqrt(s[:r])
    b = qb @ (u[:, :r] * root[None, :])
    a = (root[:, None] * vt[:r]) @ qa.T
    return b, a


def _have_scipy() -> bool:
    try:
        import scipy.sparse.linalg  # noqa: F401
    except ImportError:
        return False
    return True


def _gram_factors(b_stack, a_stack, r):
    """The ``gram`` method of :func:`truncated_factors`, or None where it does not apply.

    With the stack ``X`` that is Cholesky-factored (``XᵀX = L Lᵀ``, so ``Q = X L⁻ᵀ`` is an
    orthonormal basis of its range) and the other one ``Y`` (Gram ``G``), ``ΔW = Q (Lᵀ Y)``;
    the eigenvectors ``U`` of ``M = Lᵀ G L`` are the singular vectors of the core, so the best
    rank-r part is ``(Q U_r)(U_rᵀ Lᵀ Y)``. The row norms of ``U_rᵀ Lᵀ Y`` are the singular values
    (taken from there, not from the squared eigenvalues, so small ones keep their accuracy).
    """
    R = b_stack.shape[1]
    eigh = solve_triangular = None
    if R > SVD_DENSE_MAX:   # large R: scipy's top-r eigenpairs (syevr) and triangular solve, where
        try:                # installed; up to SVD_DENSE_MAX numpy alone, so that a run without
            from scipy.linalg import eigh, solve_triangular   # scipy gives the same bytes
        except ImportError:
            pass
    if R == 0 or r < 1:
        return None
    eps = np.finfo(np.float64).eps
    # the taller side first: its Gram is the better conditioned one for random-like factors
    sides = [("b", b_stack.shape[0]), ("a", a_stack.shape[1])]
    sides.sort(key=lambda s: -s[1])
    grams = {}
    for side, rows in sides:
        if rows < R:
            continue
        x = b_stack.T if side == "b" else a_stack          # R × rows
        g = grams.pop(side, None)
        if g is None:
            g = x @ x.T
        # equilibrated first: members enter with very different weights, a column scaling the
        # Cholesky factor absorbs exactly; what is left measures the conditioning
        dg = np.sqrt(np.diag(g))
        if not np.all(dg > 0):
            grams[side] = g                                 # may serve the other side
            continue
        # R × R temporaries are scaled in place and dropped as soon as used (two workers' svd
        # of all 64 laptop members held ~60 MB each above their stacks; now ~25 MB). A Gram
        # scaled here is recomputed if the other side needs it (a stack that fails below).
        g /= dg[:, None]
        g /= dg[None, :]
        try:
            c = np.linalg.cholesky(g)
        except np.linalg.LinAlgError:
            continue
        del g
        d = np.abs(np.diag(c))
        if d.min() <= 0 or (d.max() / d.min()) ** 2 * eps > _GRAM_MAX_ERR:
            continue
        L = c
        L *= dg[:, None]
        other = "a" if side == "b" else "b"
        y = a_stack if side == "b" else b_stack.T           # R × (other rows)
        go = grams.pop(other, None)
        if go is None:
            go = y @ y.T
        t = L.T @ go
        del go
        m = t @ L
        del t
        m = m + m.T   # the old m is freed as m is rebound: one R × R temporary at a time
        m *= 0.5
        if r < R and eigh is not None:
            # m is exactly symmetric, so m.T (Fortran order) is the same matrix that LAPACK
            # can overwrite without a copy
            _, u = eigh(m.T, subset_by_index=[R - r, R - 1], check_finite=False, overwrite_a=True)
        else:
            _, u = np.linalg.eigh(m)
            u = u[:, R - r:]
        u = u[:, ::-1]                                      # descending
        core = (L @ u).T @ y                                # r × other rows: U_rᵀ Lᵀ Y
        s = np.sqrt(np.einsum("ij,ij->i", core, core))
        z = solve_triangular(L, u, lower=True, trans="T", check_finite=False) if solve_triangular \
            else np.linalg.solve(L.T, u)                    # L⁻ᵀ U_r
        basis = x.T @ z                                     # X L⁻ᵀ U_r
        root = np.sqrt(s)
        inv = np.divide(1.0, root, out=np.zeros_like(root), where=root > 0)
        left, right = basis * root[None, :], core * inv[:, None]
        order = np.argsort(-s, kind="stable")
        left, right = left[:, order], right[order]
        return (left, right) if side == "b" else (right.T, left.T)
    return None


def _lanczos_svd(b_stack, a_stack, r):
    try:
        from scipy.sparse.linalg import LinearOperator, svds
    except ImportError:
        raise ImportError(f"mode svd with a stacked rank above {SVD_DENSE_MAX} needs scipy, which is not "
                          "installed: pip install 'loramix[scipy]'") from None

    op = LinearOperator(
        (b_stack.shape[0], a_stack.shape[1]), dtype=np.float64,
        matvec=lambda x: b_stack @ (a_stack @ x), rmatvec=lambda y: a_stack.T @ (b_stack.T @ y),
        matmat=lambda x: b_stack @ (a_stack @ x), rmatmat=lambda y: a_stack.T @ (b_stack.T @ y))
    kdim = min(op.shape)
    u, s, vt = svds(op, k=r, tol=0, solver="propack", random_state=0,
                    maxiter=min(kdim, max(10 * (r + 10), 100)))
    order = np.argsort(-s, kind="stable")
    return u[:, order], s[order], vt[order]
