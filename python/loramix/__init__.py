"""loramix: LoRA adapters for a new dataset on a CPU, without gradient training.

Measures how close a dataset is to the datasets behind a bank of LoRA adapters and mixes
those adapters accordingly (arXiv 2507.01806), with exact delta mixing, bounded memory and
SIMD kernels.
"""
from __future__ import annotations

from loramix import _core
from loramix.version import __version__


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


from loramix.core.divergence import CSR, PreparedHistograms, divergence  # noqa: E402
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

__all__ = [
    "info", "__version__",
    "divergence", "CSR", "prepare_histograms", "PreparedHistograms",
    "SafetensorsFile", "SafetensorsWriter", "weighted_sum", "gram", "mix_into",
    "f32_to_bf16", "bf16_to_f32", "f32_to_f16", "f16_to_f32",
    "Bank", "build_bank", "Profile", "build_profile",
    "mixing_weights", "register_pipeline", "register_metric",
    "generate", "mix_adapters", "GenerateResult", "train_bank_combiner",
]
