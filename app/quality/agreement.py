"""Labeler agreement: how far labelers who rank the same outputs agree with each other.

The loop trusts rankings only as far as labelers agree (the InstructGPT paper reports
72.6 ± 1.5 % pairwise agreement between its training labelers), so after a prompt batch
has been ranked with overlap this module measures agreement per batch and per labeler,
builds a consensus ranking per task, and flags labelers who favour whatever is shown
first or who answer implausibly fast. Everything here is pure: a ranking is a list of
dense ranks, ``ranks[i]`` being the rank of output i (1 = best, tied outputs share a
rank), and callers load those lists from the database themselves.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from statistics import fmean, median
from typing import Any, Literal, TypeVar

Ranks = Sequence[float]
TaskRankings = Mapping[Any, Mapping[Any, Ranks]]
"""``{task_id: {labeler_id: ranks}}``: every labeler's ranking of one task's outputs."""

ReliabilityData = Sequence[Sequence[float | None]] | Mapping[Any, Sequence[float | None]]
"""Coders × units matrix (None or NaN = not coded), or ``{unit_id: [values...]}``."""

TieRule = Literal["exclude", "disagree", "half"]
Level = Literal["nominal", "ordinal", "interval", "ratio"]
LabelerKey = TypeVar("LabelerKey", str, int)  # a labeler's name or id; sortable

_TIE_RULES = ("exclude", "disagree", "half")


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _check_same_length(a: Ranks, b: Ranks) -> None:
    if len(a) != len(b):
        raise ValueError(f"rankings cover different numbers of outputs: {len(a)} and {len(b)}")


def _pair_counts(a: Ranks, b: Ranks, ties: TieRule) -> tuple[float, int]:
    """Returns (agreeing pairs, counted pairs) for two rankings of the same outputs."""
    if ties not in _TIE_RULES:
        raise ValueError(f"ties must be one of {_TIE_RULES}, not {ties!r}")
    _check_same_length(a, b)
    agree = 0.0
    counted = 0
    for i, j in combinations(range(len(a)), 2):
        sa, sb = _sign(a[i] - a[j]), _sign(b[i] - b[j])
        if sa and sb:
            counted += 1
            agree += sa == sb
        elif ties == "exclude":
            continue
        elif not sa and not sb:
            counted += 1
            agree += 1.0
        else:
            counted += 1
            agree += 0.5 if ties == "half" else 0.0
    return agree, counted


def pair_counts(a: Ranks, b: Ranks, ties: TieRule = "exclude") -> tuple[float, int]:
    """Returns (agreeing pairs, counted pairs) for two rankings of the same outputs; see `pairwise_agreement`."""
    return _pair_counts(a, b, ties)


def pairwise_agreement(a: Ranks, b: Ranks, ties: TieRule = "exclude") -> float | None:
    """Returns the share of output pairs that two rankings order the same way.

    Pairs that both labelers order count as agreement when the order is the same.
    ``ties`` says what happens to the other pairs:

    - ``"exclude"`` (default, the InstructGPT reading of "labelers agree 72.6 % of the
      time"): only pairs where both labelers express a preference are counted; a pair
      tied by either labeler is left out.
    - ``"disagree"``: every pair counts; both tied is agreement, a tie against an
      order is disagreement.
    - ``"half"``: every pair counts; both tied is agreement, a tie against an order
      is half an agreement.

    None when no pair is counted (fewer than two outputs, or all pairs excluded).
    """
    agree, counted = _pair_counts(a, b, ties)
    return agree / counted if counted else None


def kendall_tau_b(a: Ranks, b: Ranks) -> float | None:
    """Returns Kendall's tau-b between two rankings (tie-corrected), None where undefined."""
    _check_same_length(a, b)
    concordant = discordant = tied_a = tied_b = total = 0
    for i, j in combinations(range(len(a)), 2):
        sa, sb = _sign(a[i] - a[j]), _sign(b[i] - b[j])
        total += 1
        tied_a += not sa
        tied_b += not sb
        if sa and sb:
            if sa == sb:
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((total - tied_a) * (total - tied_b))
    if denominator == 0:
        return None  # one ranking ties everything (or fewer than two outputs)
    return (concordant - discordant) / denominator


# --- Krippendorff's alpha -------------------------------------------------------------


def _is_missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pairable_units(data: ReliabilityData) -> list[list[float]]:
    """Returns each unit's non-missing values, keeping only units with two or more."""
    if isinstance(data, Mapping):
        columns: list[Sequence[float | None]] = list(data.values())
    else:
        rows = list(data)
        widths = {len(row) for row in rows}
        if len(widths) > 1:
            raise ValueError("every coder's row must cover the same units")
        columns = [list(column) for column in zip(*rows, strict=True)]
    units = [[v for v in column if v is not None and not _is_missing(v)] for column in columns]
    return [values for values in units if len(values) >= 2]


def _metric(level: Level, marginals: Mapping[float, float]) -> Callable[[float, float], float]:
    """Returns the squared difference function delta²(c, k) for a level of measurement."""
    if level == "nominal":
        return lambda c, k: 0.0 if c == k else 1.0
    if level == "interval":
        return lambda c, k: (c - k) ** 2
    if level == "ratio":
        return lambda c, k: 0.0 if c == k else ((c - k) / (c + k)) ** 2
    if level == "ordinal":
        # Krippendorff (2011): (sum of n_g for g from c to k, minus (n_c + n_k) / 2) squared,
        # so the distance between two ranks grows with how many values lie between them.
        ordered = sorted(marginals)
        cumulative: dict[float, float] = {}
        running = 0.0
        for value in ordered:
            running += marginals[value]
            cumulative[value] = running

        def ordinal(c: float, k: float) -> float:
            low, high = (c, k) if c <= k else (k, c)
            between = cumulative[high] - cumulative[low] + marginals[low]
            return (between - (marginals[low] + marginals[high]) / 2) ** 2

        return ordinal
    raise ValueError(f"unknown level of measurement {level!r}")


def krippendorff_alpha(data: ReliabilityData, level: Level = "ordinal") -> float | None:
    """Returns Krippendorff's alpha for reliability data with missing values.

    ``data`` is either a coders × units matrix (one row per coder, None or NaN where a
    coder did not code a unit), as laid out in Krippendorff's papers, or a mapping
    ``{unit_id: [values...]}`` with any number of values per unit. Units with fewer
    than two values are not pairable and are ignored. None when alpha is undefined:
    no pairable unit, or no variation at all among the pairable values.
    """
    units = _pairable_units(data)
    coincidences: dict[tuple[float, float], float] = defaultdict(float)
    for values in units:
        m = len(values)
        counts = Counter(values)
        for c, n_c in counts.items():
            for k, n_k in counts.items():
                pairs = n_c * (n_k - 1) if c == k else n_c * n_k
                if pairs:
                    coincidences[(c, k)] += pairs / (m - 1)
    marginals: dict[float, float] = defaultdict(float)
    for (c, _k), o in coincidences.items():
        marginals[c] += o
    n = sum(marginals.values())
    if n < 2:
        return None
    delta = _metric(level, marginals)
    observed = sum(o * delta(c, k) for (c, k), o in coincidences.items())
    expected = sum(n_c * n_k * delta(c, k) for c, n_c in marginals.items() for k, n_k in marginals.items())
    if expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected


def ranking_reliability_data(task_rankings: TaskRankings) -> dict[tuple[Hashable, int], list[float]]:
    """Returns rankings as reliability data: unit (task_id, output index) → ranks given."""
    units: dict[tuple[Hashable, int], list[float]] = defaultdict(list)
    for task_id, by_labeler in task_rankings.items():
        for ranks in by_labeler.values():
            for output, rank in enumerate(ranks):
                units[(task_id, output)].append(rank)
    return dict(units)


def ranking_alpha(task_rankings: TaskRankings, level: Level = "ordinal") -> float | None:
    """Returns Krippendorff's alpha (ordinal by default) over a batch of overlapping rankings."""
    return krippendorff_alpha(ranking_reliability_data(task_rankings), level=level)


# --- Consensus ------------------------------------------------------------------------


def _common_length(rankings: Sequence[Ranks]) -> int:
    if not rankings:
        raise ValueError("a consensus needs at least one ranking")
    lengths = {len(ranks) for ranks in rankings}
    if len(lengths) > 1:
        raise ValueError(f"rankings cover different numbers of outputs: {sorted(lengths)}")
    return lengths.pop()


def _dense_ranks_by_score(scores: Sequence[float]) -> list[int]:
    """Returns dense ranks where the highest score is rank 1 and equal scores tie."""
    rank_of = {score: rank for rank, score in enumerate(sorted(set(scores), reverse=True), start=1)}
    return [rank_of[score] for score in scores]


def borda_consensus(rankings: Sequence[Ranks]) -> list[int]:
    """Returns the Borda consensus of several rankings of the same outputs, as dense ranks.

    Each ranking gives an output one point per output it ranks strictly worse and half
    a point per output tied with it; outputs with equal totals share a rank.
    """
    k = _common_length(rankings)
    doubled = [0] * k  # twice the Borda score, so half points stay exact integers
    for ranks in rankings:
        for i, j in combinations(range(k), 2):
            s = _sign(ranks[j] - ranks[i])
            doubled[i] += 1 + s
            doubled[j] += 1 - s
    return _dense_ranks_by_score(doubled)


def ranked_pairs_consensus(rankings: Sequence[Ranks]) -> list[int]:
    """Returns Tideman's ranked-pairs consensus of several rankings, as dense ranks.

    Pairwise majorities are locked in from the largest margin down, skipping any that
    would close a cycle; equal margins are taken in output-index order. Outputs are
    then ranked in layers of the locked graph, so an output with no locked majority
    against another at its level shares its rank.
    """
    k = _common_length(rankings)
    margin = [[0] * k for _ in range(k)]
    for ranks in rankings:
        for i, j in combinations(range(k), 2):
            s = _sign(ranks[j] - ranks[i])  # +1 when i is ranked better than j
            margin[i][j] += s
            margin[j][i] -= s
    majorities = sorted(
        ((margin[i][j], i, j) for i in range(k) for j in range(k) if margin[i][j] > 0),
        key=lambda edge: (-edge[0], edge[1], edge[2]),
    )
    beats: list[set[int]] = [set() for _ in range(k)]

    def reaches(start: int, goal: int) -> bool:
        stack, seen = [start], {start}
        while stack:
            node = stack.pop()
            if node == goal:
                return True
            for nxt in beats[node] - seen:
                seen.add(nxt)
                stack.append(nxt)
        return False

    for _m, winner, loser in majorities:
        if not reaches(loser, winner):
            beats[winner].add(loser)
    ranks_out = [0] * k
    remaining = set(range(k))
    layer = 0
    while remaining:
        layer += 1
        beaten = {loser for winner in remaining for loser in beats[winner]}
        top = remaining - beaten
        for output in top:
            ranks_out[output] = layer
        remaining -= top
    return ranks_out


# --- Per labeler and per batch --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelerAgreement:
    """One labeler's agreement with the other labelers who ranked the same tasks."""

    mean_agreement: float | None  # pooled over every pair compared with every other labeler
    consensus_agreement: float | None  # pooled agreement with the Borda consensus of the others
    n_pairs: int  # output pairs counted against other labelers
    n_tasks: int  # tasks this labeler shared with at least one other labeler
    n_consensus_pairs: int = 0  # output pairs counted against the consensus of the others


@dataclass(frozen=True, slots=True)
class BatchAgreement:
    """Agreement over a batch of tasks ranked by more than one labeler."""

    pairwise: float | None  # pooled pairwise agreement over all labeler pairs
    tau_b: float | None  # mean Kendall tau-b over all labeler pairs
    alpha: float | None  # ordinal Krippendorff alpha, unit = (task, output)
    n_tasks: int  # tasks with at least two labelers
    n_pairs: int = 0  # output pairs counted for ``pairwise``


def labeler_agreement(task_rankings: TaskRankings, ties: TieRule = "exclude") -> dict[Hashable, LabelerAgreement]:
    """Returns each labeler's agreement with the others and with the others' consensus.

    Both figures pool pairs over tasks (agreeing pairs / counted pairs), so a task with
    more outputs or more co-labelers weighs more. The consensus is the Borda consensus
    of the *other* labelers on each task, so a labeler is never compared with
    themselves. Labelers who shared no task get None and zero counts.
    """
    agree: dict[Hashable, float] = defaultdict(float)
    counted: dict[Hashable, int] = defaultdict(int)
    consensus_agree: dict[Hashable, float] = defaultdict(float)
    consensus_counted: dict[Hashable, int] = defaultdict(int)
    tasks: dict[Hashable, int] = defaultdict(int)
    labelers: set[Hashable] = set()
    for by_labeler in task_rankings.values():
        labelers.update(by_labeler)
        if len(by_labeler) < 2:
            continue
        for labeler, ranks in by_labeler.items():
            tasks[labeler] += 1
            others = [other for other_id, other in by_labeler.items() if other_id != labeler]
            for other in others:
                a, c = _pair_counts(ranks, other, ties)
                agree[labeler] += a
                counted[labeler] += c
            a, c = _pair_counts(ranks, borda_consensus(others), ties)
            consensus_agree[labeler] += a
            consensus_counted[labeler] += c
    return {
        labeler: LabelerAgreement(
            mean_agreement=agree[labeler] / counted[labeler] if counted[labeler] else None,
            consensus_agreement=(
                consensus_agree[labeler] / consensus_counted[labeler] if consensus_counted[labeler] else None
            ),
            n_pairs=counted[labeler],
            n_tasks=tasks[labeler],
            n_consensus_pairs=consensus_counted[labeler],
        )
        for labeler in labelers
    }


def batch_agreement(task_rankings: TaskRankings, ties: TieRule = "exclude") -> BatchAgreement:
    """Returns pooled pairwise agreement, mean tau-b and ordinal alpha for a batch."""
    agree = 0.0
    counted = 0
    taus: list[float] = []
    n_tasks = 0
    for by_labeler in task_rankings.values():
        if len(by_labeler) < 2:
            continue
        n_tasks += 1
        for a, b in combinations(list(by_labeler.values()), 2):
            pair_agree, pair_counted = _pair_counts(a, b, ties)
            agree += pair_agree
            counted += pair_counted
            tau = kendall_tau_b(a, b)
            if tau is not None:
                taus.append(tau)
    return BatchAgreement(
        pairwise=agree / counted if counted else None,
        tau_b=fmean(taus) if taus else None,
        alpha=ranking_alpha(task_rankings),
        n_tasks=n_tasks,
        n_pairs=counted,
    )


# --- Labeler behaviour checks ---------------------------------------------------------


def _positions(display_order: Sequence[int]) -> list[int]:
    """Returns the 0-based position at which each output was shown."""
    positions = [-1] * len(display_order)
    for position, output in enumerate(display_order):
        if not 0 <= output < len(display_order) or positions[output] != -1:
            raise ValueError(f"display order {list(display_order)} is not a permutation of the outputs")
        positions[output] = position
    return positions


def _position_taus(display_orders: Sequence[Sequence[int]], ranks: Sequence[Ranks]) -> list[tuple[float, int]]:
    """Returns (tau-b between shown position and rank, K) for each ranking where defined."""
    if len(display_orders) != len(ranks):
        raise ValueError("need one display order per ranking")
    taus = []
    for order, given in zip(display_orders, ranks, strict=True):
        tau = kendall_tau_b(_positions(order), given)
        if tau is not None:
            taus.append((tau, len(given)))
    return taus


def position_bias(display_orders: Sequence[Sequence[int]], ranks: Sequence[Ranks]) -> float | None:
    """Returns one labeler's mean Kendall tau-b between the position shown and the rank given.

    ``display_orders[r]`` lists the output indices of ranking r in the order they were
    shown (first shown first); ``ranks[r][i]`` is the rank given to output i. Positive
    values mean outputs shown earlier get better ranks (primacy), negative the reverse;
    with shuffled display the expectation is 0. None when no ranking has a defined tau.
    """
    taus = _position_taus(display_orders, ranks)
    return fmean(tau for tau, _k in taus) if taus else None


def is_position_biased(
    display_orders: Sequence[Sequence[int]],
    ranks: Sequence[Ranks],
    *,
    min_effect: float = 0.1,
    z: float = 3.0,
) -> bool:
    """Says whether a labeler's ranks follow the display order more than chance allows.

    Flags when the mean tau-b of :func:`position_bias` is at least ``min_effect`` in
    size *and* ``z`` standard errors from 0, the standard error being that of tau under
    independence, Var = 2(2K + 5) / (9K(K - 1)) per ranking of K outputs (ties ignored,
    which makes the test slightly conservative). Requiring both keeps a handful of
    rankings from flagging anyone and keeps a tiny but consistent lean from flagging a
    prolific labeler.
    """
    taus = _position_taus(display_orders, ranks)
    if not taus:
        return False
    mean_tau = fmean(tau for tau, _k in taus)
    null_variance = sum(2 * (2 * k + 5) / (9 * k * (k - 1)) for _tau, k in taus) / len(taus) ** 2
    return abs(mean_tau) >= min_effect and abs(mean_tau) >= z * math.sqrt(null_variance)


def speed_outliers(
    durations_by_labeler: Mapping[LabelerKey, Sequence[float]],
    factor: float = 3.0,
    min_count: int = 3,
) -> list[LabelerKey]:
    """Returns labelers whose median time per task is under 1/factor of the median of medians.

    Only labelers with at least ``min_count`` timed tasks are judged, and only they
    enter the median of medians, so one lucky quick task does not flag anyone. The
    result is sorted.
    """
    if factor <= 1:
        raise ValueError("factor must be above 1")
    medians = {
        labeler: median(durations) for labeler, durations in durations_by_labeler.items() if len(durations) >= min_count
    }
    if len(medians) < 2:
        return []
    typical = median(medians.values())
    return sorted(labeler for labeler, m in medians.items() if m < typical / factor)
