"""Mixing a bank's tensors with given weights: the modes factors/concat/svd
(:mod:`~loramix.mixing.modes`), output folders with provenance and card
(:mod:`~loramix.mixing.output`), on this machine (:mod:`~loramix.mixing.local`) or on a Dask
cluster (:mod:`~loramix.mixing.distributed`)."""
