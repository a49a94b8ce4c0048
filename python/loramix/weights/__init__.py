"""From distances to mixing weights.

- :mod:`~loramix.weights.pipelines`: the registry and the paper's pipelines (attentional,
  normalized), :func:`mixing_weights` (leave-one-out exclusion, top-k, checks).
- :mod:`~loramix.weights.metrics`: histogram metrics on token profiles (js, kl, wd, mmd).
- :mod:`~loramix.weights.cosine`: the ``cosine`` metric on dataset sentence embeddings.
- :mod:`~loramix.weights.hybrid`: the ``instruction`` metric and ``hybrid`` (js + instruction).
- :mod:`~loramix.weights.neural`: the ``neural`` pipeline (a trained combiner, ONNX Runtime);
  :mod:`~loramix.weights.combiner` trains it, on Gram matrices from :mod:`~loramix.weights.gram`.

Importing this package registers every built-in metric and pipeline.
"""
from loramix.weights.pipelines import (DEFAULT_METRIC, DEFAULT_PIPELINE, DEFAULT_TEMPERATURE, PAPER_DEFAULTS, METRICS, PIPELINE_INPUT, PIPELINE_PREPARE, PIPELINES, WeightsError,
                                       attentional, check_weights, mixing_weights, normalized, register_metric,
                                       register_pipeline, resolve_metric, softmin, standardize)
from loramix.weights.metrics import MMD_BANDWIDTHS, bank_distances, distances, mmd_distance
from loramix.weights import cosine as _cosine  # noqa: F401  registers "cosine"
from loramix.weights import hybrid as _hybrid  # noqa: F401  registers "instruction", "hybrid"
from loramix.weights import neural as _neural  # noqa: F401  registers "neural"

__all__ = ["DEFAULT_METRIC", "DEFAULT_PIPELINE", "DEFAULT_TEMPERATURE", "PAPER_DEFAULTS", "METRICS", "PIPELINES", "PIPELINE_INPUT", "PIPELINE_PREPARE", "WeightsError", "attentional",
           "check_weights", "mixing_weights", "normalized", "register_metric", "register_pipeline", "softmin",
           "standardize", "resolve_metric", "MMD_BANDWIDTHS", "distances", "bank_distances", "mmd_distance"]
