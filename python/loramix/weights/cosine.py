"""The ``cosine`` metric: ``1 - cos(query embedding, member embedding)`` of dataset sentence
embeddings (:mod:`loramix.profiles.embeddings`, ONNX Runtime), so the softmin pipelines apply
unchanged; ``attentional`` on it equals :func:`loramix.profiles.encoder.cosine_weights`.
"""
from __future__ import annotations

import numpy as np

from loramix.profiles.embeddings import DEFAULT_CAP, DEFAULT_SEED, bank_embeddings, query_embeddings
from loramix.weights.pipelines import register_metric


def cosine_distances(A, B=None) -> np.ndarray:
    """All pairs ``1 - cos(a_i, b_j)`` (Q, N) float64 of embedding rows ``A`` (Q, d) and ``B``
    (N, d) (``B=None``: all pairs within ``A``); rows need not be normalized. The ``cosine``
    metric's distance, for embeddings already at hand."""
    from loramix.profiles import encoder as embed

    A = np.asarray(A, dtype=np.float64)
    return 1.0 - embed.cosine_scores(A, A if B is None else np.asarray(B, dtype=np.float64))


def cosine_metric(datasets, bank, *, fields, split="train", cache=None, encoder=None, quantize=None,
                  cap=DEFAULT_CAP, seed=DEFAULT_SEED, threads=None, max_length=None, progress=False,
                  **_) -> np.ndarray:
    """``1 - cos`` between the queries' and the members' dataset embeddings, (Q, N); ``progress``:
    a bar on stderr while the bank's datasets are embedded (first run)."""
    opts = dict(encoder=encoder, quantize=quantize, cap=cap, seed=seed, threads=threads, max_length=max_length)
    E = bank_embeddings(bank, progress=progress, **opts)
    Q = query_embeddings(datasets, bank, fields=fields, split=split, cache=cache, **opts)
    return cosine_distances(Q, E)


register_metric("cosine", cosine_metric, kind="embedding")
