"""Evaluation statistics: the error bars on every figure the loop reports.

The last stage of the loop compares policy versions by blind side-by-side human
preference (the InstructGPT paper reports 85 ± 3 % for InstructGPT over GPT-3) and
tracks per-model rates such as how often labelers tick a metadata flag. These pure
functions turn raw counts into an estimate with a confidence interval, so a dashboard
never shows a bare percentage computed from five comparisons. Standard library only:
normal quantiles from :class:`statistics.NormalDist`, Student t quantiles computed here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist, fmean, stdev
from typing import Literal


@dataclass(frozen=True, slots=True)
class Estimate:
    """A point estimate with a confidence interval; value/low/high are None without data."""

    value: float | None
    low: float | None
    high: float | None
    n: int


@dataclass(frozen=True, slots=True)
class WinRate:
    """How often model A is preferred to model B, with a confidence interval."""

    rate: float | None  # None when no comparison counts
    low: float
    high: float
    tie_rate: float | None  # ties / all comparisons, None when there are none
    n: int  # comparisons counted in ``rate``


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, not {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Returns the Wilson score interval for a binomial proportion; (0, 1) when n is 0.

    ``successes`` may be fractional (ties counted as half a win).
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half_width = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    # At 0 or n successes the bound is exactly 0 or 1; rounding would leave ~1e-17.
    low = 0.0 if successes == 0 else max(0.0, centre - half_width)
    high = 1.0 if successes == n else min(1.0, centre + half_width)
    return low, high


def proportion_with_interval(k: int, n: int, confidence: float = 0.95) -> Estimate:
    """Returns k/n with its Wilson interval, e.g. how often a model's outputs get a flag."""
    low, high = wilson_interval(k, n, confidence)
    if n == 0:
        return Estimate(value=None, low=None, high=None, n=0)
    return Estimate(value=k / n, low=low, high=high, n=n)


def win_rate(
    wins: int, losses: int, ties: int = 0, confidence: float = 0.95, tie_rule: Literal["half", "exclude"] = "half"
) -> WinRate:
    """Returns the win rate of A over B with a Wilson interval.

    By default a tie counts as half a win and half a loss (``tie_rule="half"``), so
    ``rate = (wins + ties / 2) / (wins + losses + ties)`` and 0.5 means "no
    preference" however many ties there are. ``tie_rule="exclude"`` drops ties and
    reports ``wins / (wins + losses)``. ``tie_rate`` is always over all comparisons.
    The Wilson interval on half-counted ties is slightly wide, since a tie carries
    less variance than a coin flip; that errs on the side of caution.
    """
    if min(wins, losses, ties) < 0:
        raise ValueError("counts must not be negative")
    if tie_rule not in ("half", "exclude"):
        raise ValueError(f"tie_rule must be 'half' or 'exclude', not {tie_rule!r}")
    total = wins + losses + ties
    tie_rate = ties / total if total else None
    if tie_rule == "half":
        successes, n = wins + ties / 2, total
    else:
        successes, n = wins, wins + losses
    low, high = wilson_interval(successes, n, confidence)
    return WinRate(rate=successes / n if n else None, low=low, high=high, tie_rate=tie_rate, n=n)


def _t_two_sided_coverage(t: float, df: int) -> float:
    """Returns P(|T| < t) for Student's t with an integer df (Abramowitz & Stegun 26.7.3)."""
    theta = math.atan(t / math.sqrt(df))
    sin_theta, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        term, total = math.cos(theta), 0.0
        for j in range(1, (df - 1) // 2 + 1):  # cos + (2/3) cos³ + (2·4)/(3·5) cos⁵ ... up to cos^(df-2)
            total += term
            term *= cos2 * (2 * j) / (2 * j + 1)
        return 2 / math.pi * (theta + sin_theta * total)
    term, total = 1.0, 0.0
    for j in range(1, df // 2 + 1):  # 1 + (1/2) cos² + (1·3)/(2·4) cos⁴ ... up to cos^(df-2)
        total += term
        term *= cos2 * (2 * j - 1) / (2 * j)
    return sin_theta * total


def t_quantile(confidence: float, df: int) -> float:
    """Returns t such that P(|T| < t) = confidence for Student's t with df degrees of freedom."""
    if df < 1:
        raise ValueError("df must be at least 1")
    z = _z(confidence)
    if df > 200:
        # Cornish-Fisher expansion (A&S 26.7.5): error far below 1e-8 at this df.
        z2 = z * z
        g1 = z * (z2 + 1) / 4
        g2 = z * ((5 * z2 + 16) * z2 + 3) / 96
        g3 = z * (((3 * z2 + 19) * z2 + 17) * z2 - 15) / 384
        g4 = z * ((((79 * z2 + 776) * z2 + 1482) * z2 - 1920) * z2 - 945) / 92160
        return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4
    low, high = z, z
    while _t_two_sided_coverage(high, df) < confidence:
        high *= 2
    for _ in range(100):  # bisection: the coverage is monotone in t
        mid = (low + high) / 2
        if _t_two_sided_coverage(mid, df) < confidence:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def mean_with_interval(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Returns the mean with a Student t interval; no interval for fewer than two values."""
    n = len(values)
    if n == 0:
        return Estimate(value=None, low=None, high=None, n=0)
    mean = fmean(values)
    if n == 1:
        return Estimate(value=mean, low=None, high=None, n=1)
    half_width = t_quantile(confidence, n - 1) * stdev(values) / math.sqrt(n)
    return Estimate(value=mean, low=mean - half_width, high=mean + half_width, n=n)
