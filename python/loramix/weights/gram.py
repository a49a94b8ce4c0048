"""Gram matrices of a bank's adapters, streamed once: what the neural combiner trains on.

``factors`` space: inner products of the members' flattened tensors (A, and B times the member's
scaling), as the ``factors`` mix sees them (:func:`factor_gram`). ``delta`` space:
``G[i,j] = Σ_modules s_i s_j trace((B_iᵀB_j)(A_j A_iᵀ))``, the inner products of the updates
themselves, from r×r products only (:func:`delta_gram`).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

SPACES = ("factors", "delta")


def factor_groups(bank):
    """Per tensor (A then B of each module): N sources (None where absent) and N scales."""
    n = len(bank.members)
    for name, holders in bank.module_index().items():
        r = max(bank.members[i].modules[name].rank for i in holders)
        for which, axis in (("a_key", 0), ("b_key", 1)):
            srcs, sc = [None] * n, np.ones(n)
            for i in holders:
                m = bank.members[i]
                ms = m.modules[name]
                key = getattr(ms, which)
                srcs[i] = m.file.tensor(key) if ms.rank == r else m.padded(key, r, axis)
                if which == "b_key":
                    sc[i] = ms.scaling
            yield srcs, sc


def bank_gram(bank, space: str = "factors", threads=None) -> np.ndarray:
    """The bank's (N, N) Gram matrix in ``space``: ``"factors"`` (inner products of the members'
    flattened, scaled A and B) or ``"delta"`` (of their updates ``s·B·A``), streamed once."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, not {space!r}")
    n = len(bank.members)
    if space == "factors":
        groups = list(factor_groups(bank))
        return factor_gram((g for g, _ in groups), n, scales=(s for _, s in groups), threads=threads)

    def modules():
        for name, holders in bank.module_index().items():
            As, Bs, sc = [None] * n, [None] * n, np.ones(n)
            for i in holders:
                m = bank.members[i]
                ms = m.modules[name]
                As[i], Bs[i], sc[i] = m.file.to_f32(ms.a_key), m.file.to_f32(ms.b_key), ms.scaling
            yield As, Bs, sc
    return delta_gram(modules(), n)


def delta_gram_module(As: Sequence[np.ndarray | None], Bs: Sequence[np.ndarray | None],
                      scales: Sequence[float] | None = None, *, block_rank: int = 2048,
                      dtype=np.float64) -> np.ndarray:
    """One module's contribution to the delta-space Gram:
    ``G[i,j] = s_i s_j <B_i A_i, B_j A_j>_F = s_i s_j trace((B_iᵀ B_j)(A_j A_iᵀ))``.

    ``As[i]`` (r_i, in), ``Bs[i]`` (out, r_i), ``scales[i]`` (alpha / r, or the rsLoRA scale);
    ``None`` for a member lacking the module (zero row and column). Ranks may differ. Computed
    from stacked-factor products ``BᵀB`` and ``AAᵀ`` in blocks of about ``block_rank`` stacked
    ranks — never an out×in matrix; cost O(R² (in + out)) for R = Σ r_i.
    """
    n = len(As)
    if len(Bs) != n:
        raise ValueError("As and Bs must have one entry per member")
    s = np.ones(n) if scales is None else np.asarray(scales, np.float64)
    if s.shape != (n,):
        raise ValueError("scales must have one entry per member")
    present = [i for i in range(n) if As[i] is not None]
    if any((As[i] is None) != (Bs[i] is None) for i in range(n)):
        raise ValueError("a member has A without B (or B without A)")
    G = np.zeros((n, n), np.float64)
    if not present:
        return G
    in_f = As[present[0]].shape[1]
    out_f = Bs[present[0]].shape[0]
    for i in present:
        A, B = As[i], Bs[i]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_f or B.shape[0] != out_f or A.shape[0] != B.shape[1]:
            raise ValueError(f"member {i}: A {A.shape} and B {B.shape} do not form a ({out_f}, {in_f}) delta")
    # blocks of members whose stacked ranks stay under block_rank
    blocks, cur, cur_r = [], [], 0
    for i in present:
        r = As[i].shape[0]
        if cur and cur_r + r > block_rank:
            blocks.append(cur)
            cur, cur_r = [], 0
        cur.append(i)
        cur_r += r
    blocks.append(cur)

    def stack(block):
        A = np.concatenate([np.asarray(As[i], dtype) * s[i] for i in block], axis=0)  # (R, in)
        B = np.concatenate([np.asarray(Bs[i], dtype) for i in block], axis=1)         # (out, R)
        starts = np.cumsum([0] + [As[i].shape[0] for i in block])[:-1]
        return A, B, starts

    stacked = [stack(b) for b in blocks]
    for bi, (Ai, Bi, si) in enumerate(stacked):
        for bj in range(bi, len(blocks)):
            Aj, Bj, sj = stacked[bj]
            M = (Bi.T @ Bj) * (Ai @ Aj.T)  # (Ri, Rj): [a, b] = (B_iᵀB_j)[a,b] (A_i A_jᵀ)[a,b]
            blk = np.add.reduceat(np.add.reduceat(M, si, axis=0), sj, axis=1)
            ii, jj = np.asarray(blocks[bi]), np.asarray(blocks[bj])
            G[np.ix_(ii, jj)] = blk
            if bj != bi:
                G[np.ix_(jj, ii)] = blk.T
    return G


def delta_gram(modules: Iterable, n: int, **kwargs) -> np.ndarray:
    """Delta-space Gram of a bank of N members, summed module by module.

    ``modules`` yields, per LoRA module (e.g. ``layers.3.self_attn.q_proj``), a tuple
    ``(As, Bs)`` or ``(As, Bs, scales)`` as :func:`delta_gram_module` takes them — so a bank can
    stream one module of every member at a time. Returns (N, N) float64.
    """
    G = np.zeros((n, n), np.float64)
    for item in modules:
        As, Bs, *rest = item
        if len(As) != n:
            raise ValueError(f"a module has {len(As)} members, expected {n}")
        G += delta_gram_module(As, Bs, rest[0] if rest else None, **kwargs)
    return G


def factor_gram(tensor_groups: Iterable[Sequence], n: int | None = None, *,
                scales: Iterable[Sequence[float] | None] | None = None, threads: int | None = None) -> np.ndarray:
    """Factor-space Gram (``factors`` mode): ``G[i,j] = Σ_tensors c_i c_j <T_i, T_j>`` over the
    members' flattened tensors.

    ``tensor_groups`` yields, per tensor name, a sequence of N sources (``TensorRef`` from
    ``SafetensorsFile.tensor`` or float32/float16 arrays; ``None`` for a member lacking it);
    ``scales`` (optional) yields per group N multipliers (the scale folded into that factor).
    Uses the core's ``loramix.core.tensors.gram`` (f64 accumulation, streamed); numpy if the core
    lacks it (arrays only).
    """
    try:
        from loramix.core.tensors import gram as _gram
    except ImportError:  # core without tensors: numpy fallback
        _gram = None
    G = None
    scale_iter = iter(scales) if scales is not None else None
    for group in tensor_groups:
        group = list(group)
        if n is None:
            n = len(group)
        if len(group) != n:
            raise ValueError(f"a tensor group has {len(group)} members, expected {n}")
        if G is None:
            G = np.zeros((n, n), np.float64)
        c = next(scale_iter) if scale_iter is not None else None
        c = np.ones(n) if c is None else np.asarray(c, np.float64)
        idx = [i for i, t in enumerate(group) if t is not None]
        if not idx:
            continue
        srcs = [group[i] for i in idx]
        if _gram is not None:
            g = np.asarray(_gram(srcs, threads=threads), np.float64)
        else:
            M = np.stack([np.asarray(t, np.float64).reshape(-1) for t in srcs])
            g = M @ M.T
        ii = np.asarray(idx)
        G[np.ix_(ii, ii)] += g * np.outer(c[ii], c[ii])
    if G is None:
        if n is None:
            raise ValueError("factor_gram needs at least one tensor group (or n)")
        G = np.zeros((n, n))
    return G
