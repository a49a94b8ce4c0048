"""loramix: LoRA adapters for a new dataset on a CPU, without gradient training.

Measures how close a dataset is to the datasets behind a bank of LoRA adapters and mixes
those adapters accordingly (arXiv 2507.01806), with exact delta mixing, bounded memory and
SIMD kernels.
"""
from __future__ import annotations

import numpy as np

from loramix import _core
from loramix.version import version as _version


def __getattr__(name: str):
    if name == "__version__":   # looked up on first use (loramix.version)
        return _version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def info() -> dict:
    """What this build can run and what it uses.

    Returns a dict with ``compiled`` (ISAs compiled in), ``available`` (ISAs this CPU and
    OS support), ``active`` (the ISA kernels dispatch to; ``LORAMIX_ISA`` overrides it),
    ``threads`` (default thread count; ``LORAMIX_NUM_THREADS`` overrides it), ``cpu``
    (detected features) and ``version``.
    """
    return {
        "version": _version(),
        "compiled": list(_core.compiled_isas()),
        "available": list(_core.available_isas()),
        "active": _core.active_isa(),
        "threads": int(_core.default_threads()),
        "cpu": dict(_core.cpu_features()),
    }


from loramix.core import divergence as _core_divergence  # noqa: E402
from loramix.core.divergence import CSR, PreparedHistograms  # noqa: E402
from loramix.core.divergence import prepare as prepare_histograms  # noqa: E402
from loramix.core.tensors import (  # noqa: E402
    SafetensorsFile,
    SafetensorsWriter,
    bf16_to_f32,
    f16_to_f32,
    f32_to_bf16,
    f32_to_f16,
    gram,
    mix_into,
    weighted_sum,
)
from loramix.bank import Bank, build_bank  # noqa: E402
from loramix.profiles.tokens import Profile, build_profile  # noqa: E402
from loramix.weights.pipelines import mixing_weights, register_metric, register_pipeline  # noqa: E402
from loramix.mixing.local import mix_adapters  # noqa: E402
from loramix.mixing.output import GenerateResult  # noqa: E402
from loramix.pipeline import generate  # noqa: E402
from loramix.weights.neural import train_bank_combiner  # noqa: E402
from loramix.weights.cosine import cosine_distances  # noqa: E402


def divergence(P, R=None, metric: str = "js", eps: float = 1e-10, *, threads: int | None = None):
    """Distances (Q, N) float64 between histogram rows ``P`` (Q x V) and ``R`` (N x V) (``R=None``:
    all pairs within ``P``).

    ``js``, ``kl``, ``wd``: the compiled core (:func:`loramix.core.divergence.divergence`, which
    documents inputs, ``eps``, threads and errors). Any other histogram metric registered in
    :mod:`loramix.weights` (``mmd``: the paper's multiscale-kernel MMD, exact, see
    :func:`loramix.weights.mmd_distance`; or one added with :func:`register_metric`) is computed
    by that function (``eps``/``threads`` do not apply). Inputs: dense arrays, ``scipy.sparse``
    or :class:`CSR`. ``divergence.prepare`` / ``divergence.CSR``: the core's.
    """
    if metric in _core_divergence.METRICS:
        return _core_divergence.divergence(P, R, metric, eps, threads=threads)
    from loramix import weights as _w

    if metric not in _w.METRICS or _w.METRICS[metric][1] != "histogram":
        known = sorted(set(_core_divergence.METRICS) | {m for m, (_, k) in _w.METRICS.items() if k == "histogram"})
        raise ValueError(f"unknown metric {metric!r} (expected one of {', '.join(known)}; cosine works on "
                         "embeddings: loramix.cosine_distances)")

    def scipy_rows(x):
        if isinstance(x, CSR):
            import scipy.sparse as sp

            n = len(x.indptr) - 1
            return sp.csr_array((np.asarray(x.data, np.float64), np.asarray(x.indices), np.asarray(x.indptr)),
                                shape=(n, int(x.n_cols)))
        return x

    P = scipy_rows(P)
    return _w.distances(P, P if R is None else scipy_rows(R), metric)


divergence.prepare = _core_divergence.prepare
divergence.CSR = CSR

__all__ = [
    "info", "__version__",
    "divergence", "CSR", "prepare_histograms", "PreparedHistograms", "cosine_distances",
    "SafetensorsFile", "SafetensorsWriter", "weighted_sum", "gram", "mix_into",
    "f32_to_bf16", "bf16_to_f32", "f32_to_f16", "f16_to_f32",
    "Bank", "build_bank", "Profile", "build_profile",
    "mixing_weights", "register_pipeline", "register_metric",
    "generate", "mix_adapters", "GenerateResult", "train_bank_combiner",
]
