"""loramix: LoRA adapters for a new dataset on a CPU, without gradient training.

Measures how close a dataset is to the datasets behind a bank of LoRA adapters and mixes
those adapters accordingly (arXiv 2507.01806), with exact delta mixing, bounded memory and
SIMD kernels.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _pkg_version

from . import _core

try:
    __version__ = _pkg_version("loramix")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"


def info() -> dict:
    """What this build can run and what it uses.

    Returns a dict with ``compiled`` (ISAs compiled in), ``available`` (ISAs this CPU and
    OS support), ``active`` (the ISA kernels dispatch to; ``LORAMIX_ISA`` overrides it),
    ``threads`` (default thread count; ``LORAMIX_NUM_THREADS`` overrides it), ``cpu``
    (detected features) and ``version``.
    """
    return {
        "version": __version__,
        "compiled": list(_core.compiled_isas()),
        "available": list(_core.available_isas()),
        "active": _core.active_isa(),
        "threads": int(_core.default_threads()),
        "cpu": dict(_core.cpu_features()),
    }


__all__ = ["info", "__version__"]
