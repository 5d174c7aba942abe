"""Quality, the third stage: how far the labels can be trusted, and how model versions compare.

Labeler agreement and consensus, gold tasks, per-version behaviour, and blind side-by-side evaluations of
model versions with their statistics.
"""
