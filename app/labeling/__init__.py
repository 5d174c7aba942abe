"""Labeling, the second stage: leases of tasks to labelers and one submit path for every task kind.

Demonstrations, rankings and blind evaluation verdicts, with their pages and JSON API.
"""
