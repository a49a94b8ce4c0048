"""Thin Python faces of the compiled core (``loramix._core``): divergences between token
histograms (:mod:`~loramix.core.divergence`) and safetensors files and streamed weighted sums
(:mod:`~loramix.core.tensors`)."""
