"""Thin Python faces of the compiled core (``loramix._core``): divergences between token
histograms (:mod:`~loramix.core.divergence`) and safetensors files and streamed weighted sums
(:mod:`~loramix.core.tensors`)."""


def default_threads() -> int:
    """Threads used when ``threads=None``: ``LORAMIX_NUM_THREADS`` if set (> 0), else the core
    count — the compiled core's own rule, for the Python thread pools beside it."""
    from loramix import _core

    return int(_core.default_threads())
