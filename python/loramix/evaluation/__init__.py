"""Evaluation (needs the ``eval`` extra: torch, transformers, peft): Rouge-L
(:mod:`~loramix.evaluation.rouge`), greedy generation and scoring
(:mod:`~loramix.evaluation.generation`) and the paper's leave-one-out table
(:mod:`~loramix.evaluation.loo`). The only package that imports torch."""
