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
    targets (``tensors.mix_into`` with a Q × K weight matrix); zero weights are never read.

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


def plan(bank, W: np.ndarray, mode: str, rank: int | None = None) -> list[MixInfo]:
    """Per target, the output modules with their ranks (no tensor is read)."""
    if mode not in MODES:
        raise MixError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if rank is not None and int(rank) < 1:
        raise MixError(f"rank must be >= 1, got {rank}")
    W = np.atleast_2d(W)
    mem = bank.members
    modules = bank.module_index()
    infos = [MixInfo(members=[int(i) for i in np.flatnonzero(W[q])]) for q in range(W.shape[0])]
    for name, holders in modules.items():
        h = np.asarray(holders)
        ranks = np.array([mem[i].modules[name].rank for i in holders])
        nz = W[:, h] != 0                                    # (Q, holders)
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
                 progress: bool = False, threads: int | None = None) -> list[MixInfo]:
    """Mix the bank with weights ``W`` (Q, N) into Q safetensors files at ``paths``.

    Each file is written by the core's :class:`SafetensorsWriter` (temp file, atomic rename);
    on any error every writer is aborted and nothing is left at ``paths``.
    """
    from loramix.core import tensors

    W = np.atleast_2d(np.asarray(W, dtype=np.float64))
    if W.shape != (len(paths), len(bank.members)):
        raise MixError(f"weights have shape {W.shape}, expected ({len(paths)}, {len(bank.members)})")
    out_dtype = normalize_dtype(dtype, bank.dtype)
    infos = plan(bank, W, mode, rank)
    modules = bank.module_index()
    writers = []
    try:
        for q, path in enumerate(paths):
            md = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
            writers.append(tensors.SafetensorsWriter(str(path), entries_for(bank, infos[q], out_dtype, modules), md))
        items = list(modules.items())
        if progress:
            from tqdm import tqdm
            items = tqdm(items, desc=f"mix ({mode})", unit="module", file=sys.stderr, leave=False)
        for name, holders in items:
            if mode == "factors":
                _mix_factors(bank, W, name, holders, infos, writers, threads)
            else:
                mix_exact(bank, W, name, holders, infos, writers, mode)
        for w in writers:
            w.commit()
    except BaseException:
        for w in writers:
            try:
                w.abort()
            except Exception:  # noqa: BLE001 - already failing; keep the first error
                pass
        raise
    return infos


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


def _mix_factors(bank, W, name, holders, infos, writers, threads):
    groups: dict[int, list[int]] = {}   # targets grouped by their output rank (usually one group)
    for q in range(W.shape[0]):
        if name in infos[q].ranks:
            groups.setdefault(infos[q].ranks[name], []).append(q)
    for r_out, targets in groups.items():
        _mix_factors_group(bank, W, name, holders, targets, r_out, writers, threads)


def _mix_factors_group(bank, W, name, holders, targets, r_out, writers, threads):
    from loramix.core import tensors

    a_src, b_src, wa, wb = factors_inputs(bank, W, name, holders, targets, r_out)
    ws = [writers[q] for q in targets]
    tensors.mix_into(ws, peft_io.tensor_key(name, "A"), a_src, wa, threads=threads)
    tensors.mix_into(ws, peft_io.tensor_key(name, "B"), b_src, wb, threads=threads)


def factors_inputs(bank, W, name, holders, targets, r_out):
    """The sources and weights of one ``factors`` core call: ``(a_src, b_src, wa, wb)``."""
    h = np.asarray(holders)
    used = h[(W[np.ix_(targets, h)] != 0).any(axis=0)].tolist()   # one numpy call, not one per member
    a_src, b_src, scale = [], [], []
    for i in used:
        m = bank.members[i]
        ms = m.modules[name]
        if ms.rank == r_out:
            a_src.append(m.file.tensor(ms.a_key))
            b_src.append(m.file.tensor(ms.b_key))
        else:   # zero-pad a lower-rank member: extra rows of A / columns of B are zero
            a_src.append(m.padded(ms.a_key, r_out, 0))
            b_src.append(m.padded(ms.b_key, r_out, 1))
        scale.append(ms.scaling)
    wa = W[np.ix_(targets, used)]
    wb = wa * np.asarray(scale)[None, :]
    return a_src, b_src, wa, wb


def mix_exact(bank, W, name, holders, infos, writers, mode):
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def factors(i):
        if i not in cache:
            m = bank.members[i]
            ms = m.modules[name]
            cache[i] = (m.file.to_f32(ms.a_key), m.file.to_f32(ms.b_key))
        return cache[i]

    for q in range(W.shape[0]):
        if name not in infos[q].ranks:
            continue
        j = [i for i in holders if W[q, i] != 0]
        if mode == "concat":
            a = np.concatenate([factors(i)[0] for i in j], axis=0)
            b = np.concatenate([factors(i)[1] * np.float32(W[q, i] * bank.members[i].modules[name].scaling)
                                for i in j], axis=1)
        else:
            a64 = np.concatenate([factors(i)[0].astype(np.float64) for i in j], axis=0)
            b64 = np.concatenate([factors(i)[1].astype(np.float64) * (W[q, i] * bank.members[i].modules[name].scaling)
                                  for i in j], axis=1)
            b, a = truncated_factors(b64, a64, infos[q].ranks[name])
        writers[q].write(peft_io.tensor_key(name, "A"), np.ascontiguousarray(a, dtype=np.float32))
        writers[q].write(peft_io.tensor_key(name, "B"), np.ascontiguousarray(b, dtype=np.float32))


# Up to this stacked rank Σr the svd mode takes thin QRs of both stacked factors and an SVD of
# the Σr × Σr core. Above it, it finds the top-r triplets by Lanczos bidiagonalization (PROPACK,
# tolerance 0: to machine precision) on the factored operator x -> B_stack (A_stack x), which
# costs O(Σr · (out + in)) per step and never forms an out × in (or in × Σr square) matrix.
SVD_DENSE_MAX = 512


def truncated_factors(b_stack: np.ndarray, a_stack: np.ndarray, r: int):
    """Best rank-``r`` factors ``(B, A)`` of ``b_stack @ a_stack`` without forming it.

    ``b_stack`` (out × R), ``a_stack`` (R × in), float64. ``R`` up to :data:`SVD_DENSE_MAX`
    (or ``r`` near full rank): thin QR of each stacked factor and an SVD of the small core
    ``R_b R_aᵀ``. Larger ``R``: PROPACK Lanczos on the factored operator.
    The singular values are split evenly: ``B = U √S``, ``A = √S Vᵀ``.
    """
    kmax = min(b_stack.shape[0], a_stack.shape[1], b_stack.shape[1])
    r = min(int(r), kmax)
    if b_stack.shape[1] > SVD_DENSE_MAX and r < kmax // 2:
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
