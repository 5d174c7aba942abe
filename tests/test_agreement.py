"""Known-answer and property tests for labeler agreement and evaluation statistics."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.quality.agreement import (
    BatchAgreement,
    LabelerAgreement,
    batch_agreement,
    borda_consensus,
    is_position_biased,
    kendall_tau_b,
    krippendorff_alpha,
    labeler_agreement,
    pairwise_agreement,
    position_bias,
    ranked_pairs_consensus,
    ranking_alpha,
    ranking_reliability_data,
    speed_outliers,
)
from app.quality.stats import (
    Estimate,
    _t_two_sided_coverage,
    mean_with_interval,
    proportion_with_interval,
    t_quantile,
    wilson_interval,
    win_rate,
)

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C:
# 4 observers x 12 units, nominal values 1..5, "." = missing. Unit 12 has a single value
# and so is not pairable.
N = None
KRIPPENDORFF_2011 = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
    [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N],
]

ranks_st = st.integers(min_value=2, max_value=9).flatmap(
    lambda k: st.tuples(
        st.lists(st.integers(1, k), min_size=k, max_size=k),
        st.lists(st.integers(1, k), min_size=k, max_size=k),
    )
)


def random_ranking(rng: random.Random, k: int) -> list[int]:
    ranks = list(range(1, k + 1))
    rng.shuffle(ranks)
    return ranks


# --- pairwise agreement and tau-b -----------------------------------------------------


def test_perfect_agreement() -> None:
    a = [2, 1, 4, 3, 5]
    assert pairwise_agreement(a, list(a)) == 1.0
    assert kendall_tau_b(a, list(a)) == 1.0


def test_fully_reversed() -> None:
    a = [1, 2, 3, 4]
    b = [4, 3, 2, 1]
    assert pairwise_agreement(a, b) == 0.0
    assert kendall_tau_b(a, b) == -1.0


def test_one_swap_hand_computed() -> None:
    # Pairs (0,1)..(2,3): only (1,2) is swapped -> 5 of 6 agree; tau = (5 - 1) / 6.
    a, b = [1, 2, 3, 4], [1, 3, 2, 4]
    assert pairwise_agreement(a, b) == pytest.approx(5 / 6)
    assert kendall_tau_b(a, b) == pytest.approx(4 / 6)


def test_ties_follow_the_documented_rules() -> None:
    # a ties outputs 0,1; b ties outputs 1,2. The other 4 pairs are ordered alike.
    a, b = [1, 1, 2, 3], [1, 2, 2, 3]
    assert pairwise_agreement(a, b, ties="exclude") == 1.0  # 4 / 4
    assert pairwise_agreement(a, b, ties="disagree") == pytest.approx(4 / 6)
    assert pairwise_agreement(a, b, ties="half") == pytest.approx(5 / 6)
    # tau-b by hand: n0 = 6, ties in a = 1, ties in b = 1, concordant 4, discordant 0.
    assert kendall_tau_b(a, b) == pytest.approx(4 / 5)


def test_both_tied_counts_as_agreement_unless_excluded() -> None:
    a, b = [1, 1, 2], [1, 1, 2]
    assert pairwise_agreement(a, b, ties="exclude") == 1.0  # the tied pair is excluded: 2 / 2
    assert pairwise_agreement(a, b, ties="disagree") == 1.0  # 3 / 3
    c = [1, 2, 2]  # ties (1,2) where a orders it and orders (0,1) where a ties it
    assert pairwise_agreement(a, c, ties="exclude") == 1.0  # only (0,2) counted
    assert pairwise_agreement(a, c, ties="disagree") == pytest.approx(1 / 3)
    assert pairwise_agreement(a, c, ties="half") == pytest.approx(2 / 3)


def test_undefined_cases_are_none() -> None:
    assert pairwise_agreement([1, 1, 1], [1, 2, 3]) is None  # no pair both order
    assert pairwise_agreement([1], [1]) is None
    assert kendall_tau_b([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError, match="rankings cover different numbers of outputs: 2 and 3"):
        pairwise_agreement([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"ties must be one of \(.*\), not 'sometimes'"):
        pairwise_agreement([1, 2], [1, 2], ties="sometimes")  # type: ignore[arg-type]


def test_random_rankings_agree_half_the_time() -> None:
    rng = random.Random(0)
    agree = counted = 0.0
    taus = []
    for _ in range(3000):
        k = rng.randint(4, 9)
        a, b = random_ranking(rng, k), random_ranking(rng, k)
        share = pairwise_agreement(a, b)
        agree += share * k * (k - 1) / 2
        counted += k * (k - 1) / 2
        taus.append(kendall_tau_b(a, b))
    assert agree / counted == pytest.approx(0.5, abs=0.01)
    assert sum(taus) / len(taus) == pytest.approx(0.0, abs=0.02)


def test_kendall_tau_b_matches_scipy() -> None:
    from scipy import stats  # a dev dependency: the reference implementation

    rng = random.Random(1)
    for _ in range(200):
        k = rng.randint(2, 9)
        a = [rng.randint(1, k) for _ in range(k)]
        b = [rng.randint(1, k) for _ in range(k)]
        ours = kendall_tau_b(a, b)
        theirs = stats.kendalltau(a, b).statistic
        if ours is None:
            assert theirs != theirs  # scipy gives NaN where tau-b is undefined
        else:
            assert ours == pytest.approx(theirs)


@given(ranks_st)
def test_tau_symmetric_and_bounded(pair: tuple[list[int], list[int]]) -> None:
    a, b = pair
    tau = kendall_tau_b(a, b)
    assert tau == kendall_tau_b(b, a)
    if tau is not None:
        assert -1.0 - 1e-12 <= tau <= 1.0 + 1e-12


@given(ranks_st, st.sampled_from(["exclude", "disagree", "half"]))
def test_agreement_bounded_and_symmetric(pair: tuple[list[int], list[int]], ties: str) -> None:
    a, b = pair
    share = pairwise_agreement(a, b, ties=ties)  # type: ignore[arg-type]
    assert share == pairwise_agreement(b, a, ties=ties)  # type: ignore[arg-type]
    if share is not None:
        assert 0.0 <= share <= 1.0


@given(ranks_st)
def test_reversing_one_ranking_flips_agreement(pair: tuple[list[int], list[int]]) -> None:
    a, b = pair
    share = pairwise_agreement(a, b)
    flipped = pairwise_agreement(a, [-r for r in b])
    if share is None:
        assert flipped is None
    else:
        assert flipped == pytest.approx(1.0 - share)


# --- Krippendorff's alpha -------------------------------------------------------------


def test_krippendorff_worked_example() -> None:
    # Published: nominal .743, ordinal .815, interval .849, ratio .797. Our exact values
    # (computed by hand from the coincidence matrix) round to those.
    expected = {
        "nominal": Fraction(113, 152),
        "ordinal": Fraction(108577, 133160),
        "interval": Fraction(951, 1120),
    }
    for level, value in expected.items():
        assert krippendorff_alpha(KRIPPENDORFF_2011, level) == pytest.approx(float(value), abs=1e-12)
    assert round(krippendorff_alpha(KRIPPENDORFF_2011, "nominal"), 3) == 0.743
    assert round(krippendorff_alpha(KRIPPENDORFF_2011, "ordinal"), 3) == 0.815
    assert round(krippendorff_alpha(KRIPPENDORFF_2011, "interval"), 3) == 0.849
    assert round(krippendorff_alpha(KRIPPENDORFF_2011, "ratio"), 3) == 0.797


def test_krippendorff_mapping_form_and_nan_equal_matrix_form() -> None:
    by_unit = {u: [row[u] for row in KRIPPENDORFF_2011] for u in range(12)}
    nan_rows = [[float("nan") if v is None else v for v in row] for row in KRIPPENDORFF_2011]
    for level in ("nominal", "ordinal", "interval"):
        expected = krippendorff_alpha(KRIPPENDORFF_2011, level)
        assert krippendorff_alpha(by_unit, level) == pytest.approx(expected)
        assert krippendorff_alpha(nan_rows, level) == pytest.approx(expected)


def test_krippendorff_edge_cases() -> None:
    assert krippendorff_alpha([[1, 2, 3], [1, 2, 3]], "nominal") == 1.0
    assert krippendorff_alpha([[2, 2, 2], [2, 2, 2]]) is None  # no variation: undefined
    assert krippendorff_alpha([[1, N], [N, 2]]) is None  # nothing pairable
    # Systematic disagreement is worse than chance.
    assert krippendorff_alpha([[1, 2], [2, 1]], "interval") < 0
    with pytest.raises(ValueError, match="every coder's row must cover the same units"):
        krippendorff_alpha([[1, 2], [1]])
    with pytest.raises(ValueError, match="unknown level of measurement 'cardinal'"):
        krippendorff_alpha([[1, 2], [1, 2]], "cardinal")  # type: ignore[arg-type]


@given(st.lists(st.lists(st.one_of(st.none(), st.integers(1, 5)), min_size=6, max_size=6), min_size=2, max_size=4))
def test_krippendorff_at_most_one_and_coder_order_free(rows: list[list[int | None]]) -> None:
    for level in ("nominal", "ordinal", "interval"):
        alpha = krippendorff_alpha(rows, level)
        if alpha is not None:
            assert alpha <= 1.0 + 1e-12
            assert krippendorff_alpha(rows[::-1], level) == pytest.approx(alpha)


def test_ranking_alpha_units_are_task_outputs() -> None:
    task_rankings = {"t1": {"ann": [1, 2, 3], "bob": [1, 3, 2]}, "t2": {"ann": [2, 1]}}
    data = ranking_reliability_data(task_rankings)
    assert data == {("t1", 0): [1, 1], ("t1", 1): [2, 3], ("t1", 2): [3, 2], ("t2", 0): [2], ("t2", 1): [1]}
    perfect = {"t1": {"ann": [1, 2, 3], "bob": [1, 2, 3]}, "t2": {"ann": [2, 1, 1], "bob": [2, 1, 1]}}
    assert ranking_alpha(perfect) == 1.0


# --- Consensus ------------------------------------------------------------------------


def test_borda_with_ties() -> None:
    # Scores (doubled): output 0: 6+2, output 1: 2+6, output 2: 4+4, output 3: 0+0.
    assert borda_consensus([[1, 3, 2, 4], [3, 1, 2, 4]]) == [1, 1, 1, 2]
    assert borda_consensus([[1, 2, 2, 3], [1, 2, 2, 3]]) == [1, 2, 2, 3]
    assert borda_consensus([[2, 1, 3], [1, 1, 2], [2, 1, 3]]) == [2, 1, 3]
    with pytest.raises(ValueError, match="a consensus needs at least one ranking"):
        borda_consensus([])
    with pytest.raises(ValueError, match=r"rankings cover different numbers of outputs: \[2, 3\]"):
        borda_consensus([[1, 2], [1, 2, 3]])


@given(st.integers(1, 9).flatmap(lambda k: st.lists(st.integers(1, k), min_size=k, max_size=k)))
def test_consensus_of_one_ranking_is_its_dense_ranks(ranks: list[int]) -> None:
    dense = {r: i for i, r in enumerate(sorted(set(ranks)), start=1)}
    expected = [dense[r] for r in ranks]
    assert borda_consensus([ranks]) == expected
    assert ranked_pairs_consensus([ranks]) == expected


def test_ranked_pairs_breaks_a_cycle_at_its_weakest_majority() -> None:
    # 3 voters a>b>c, 2 voters b>c>a, 2 voters c>a>b: a>b by 3, b>c by 3, c>a by 1.
    # Lock a>b and b>c (3 each), skip c>a (1), which would close the cycle: a > b > c.
    votes = [[1, 2, 3]] * 3 + [[3, 1, 2]] * 2 + [[2, 3, 1]] * 2
    assert ranked_pairs_consensus(votes) == [1, 2, 3]
    # A Condorcet winner wins even where Borda ties it with another output.
    condorcet = [[1, 2, 3], [1, 2, 3], [3, 1, 2]]
    assert ranked_pairs_consensus(condorcet)[0] == 1
    assert ranked_pairs_consensus([[1, 2], [2, 1]]) == [1, 1]


# --- Per labeler and per batch --------------------------------------------------------

TASKS = {
    "t1": {"ann": [1, 2, 3, 4], "bob": [1, 2, 3, 4], "cat": [4, 3, 2, 1]},
    "t2": {"ann": [1, 2, 3], "bob": [1, 2, 3]},
    "t3": {"dan": [1, 2]},
}


def test_labeler_agreement_exact_counts() -> None:
    stats = labeler_agreement(TASKS)
    assert set(stats) == {"ann", "bob", "cat", "dan"}
    # ann: t1 vs bob 6/6, vs cat 0/6; t2 vs bob 3/3 -> 9 / 15. On t1 ann's others (bob and
    # cat, exact opposites) have a Borda consensus that ties everything, so no pair counts
    # there; the consensus figure comes from t2 alone (3/3).
    assert stats["ann"] == LabelerAgreement(
        mean_agreement=9 / 15, consensus_agreement=1.0, n_pairs=15, n_tasks=2, n_consensus_pairs=3
    )
    assert stats["bob"] == stats["ann"]
    cat = stats["cat"]
    assert cat.mean_agreement == 0.0 and cat.n_pairs == 12 and cat.n_tasks == 1
    assert cat.consensus_agreement == 0.0 and cat.n_consensus_pairs == 6
    assert stats["dan"] == LabelerAgreement(None, None, 0, 0, 0)


def test_batch_agreement_exact_values() -> None:
    result = batch_agreement(TASKS)
    assert isinstance(result, BatchAgreement)
    # t1: ann-bob 6/6, ann-cat 0/6, bob-cat 0/6; t2: 3/3 -> 9/21.
    assert result.pairwise == pytest.approx(9 / 21)
    assert result.n_pairs == 21 and result.n_tasks == 2
    assert result.tau_b == pytest.approx((1 - 1 - 1 + 1) / 4)
    assert result.alpha == pytest.approx(ranking_alpha(TASKS))
    assert batch_agreement({"t": {"ann": [1, 2]}}) == BatchAgreement(None, None, None, 0, 0)


def test_simulated_noisy_labelers_land_near_their_noise_level() -> None:
    # Labelers rank by a hidden quality plus Gaussian noise; agreement falls with noise.
    rng = random.Random(7)

    def batch(noise: float) -> BatchAgreement:
        tasks = {}
        for t in range(300):
            quality = [rng.gauss(0, 1) for _ in range(4)]
            tasks[t] = {}
            for labeler in ("a", "b", "c"):
                scores = [q + rng.gauss(0, noise) for q in quality]
                order = sorted(range(4), key=lambda i: -scores[i])
                ranks = [0] * 4
                for rank, i in enumerate(order, start=1):
                    ranks[i] = rank
                tasks[t][labeler] = ranks
        return batch_agreement(tasks)

    clean, noisy = batch(0.1), batch(1.5)
    assert clean.pairwise > 0.9 and clean.alpha > 0.85
    assert 0.55 < noisy.pairwise < 0.75
    assert noisy.alpha < clean.alpha and noisy.tau_b < clean.tau_b


# --- Labeler behaviour checks ---------------------------------------------------------


def test_position_bias_of_a_labeler_who_ranks_by_position() -> None:
    rng = random.Random(3)
    orders = [random_ranking(rng, 5) for _ in range(200)]
    orders = [[r - 1 for r in order] for order in orders]  # permutations of output indices
    by_position = []
    for order in orders:
        ranks = [0] * 5
        for position, output in enumerate(order):
            ranks[output] = position + 1
        by_position.append(ranks)
    assert position_bias(orders, by_position) == 1.0
    assert is_position_biased(orders, by_position)
    quality_ranks = [[1, 2, 3, 4, 5]] * 200  # ranks by the outputs themselves, display shuffled
    assert abs(position_bias(orders, quality_ranks)) < 0.1  # null standard error is 0.029
    assert not is_position_biased(orders, quality_ranks)


def test_position_bias_needs_evidence() -> None:
    # Two rankings by position: the largest effect, but too few rankings to flag.
    orders = [[0, 1, 2, 3]] * 2
    assert position_bias(orders, [[1, 2, 3, 4]] * 2) == 1.0
    assert not is_position_biased(orders, [[1, 2, 3, 4]] * 2)
    assert position_bias([[0, 1]], [[1, 1]]) is None
    with pytest.raises(ValueError, match=r"display order \[0, 0, 1\] is not a permutation of the outputs"):
        position_bias([[0, 0, 1]], [[1, 2, 3]])


def test_speed_outliers() -> None:
    durations = {
        "ann": [30, 31, 29],
        "bob": [32, 33, 31],
        "cat": [28, 27, 29, 28],
        "dan": [5, 6, 4],
        "eve": [1],  # too few tasks to judge
    }
    assert speed_outliers(durations) == ["dan"]  # median of medians 29.5; 5 < 29.5 / 3
    assert speed_outliers(durations, factor=10) == []
    assert speed_outliers({"ann": [1, 1, 1]}) == []


# --- Evaluation statistics ------------------------------------------------------------


def test_wilson_textbook_value() -> None:
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    with pytest.raises(ValueError, match="need 0 <= successes <= n, got successes=5, n=4"):
        wilson_interval(5, 4)


@given(
    st.integers(0, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))), st.sampled_from([0.8, 0.95, 0.99])
)
def test_wilson_contains_the_estimate(kn: tuple[int, int], confidence: float) -> None:
    k, n = kn
    low, high = wilson_interval(k, n, confidence)
    assert 0.0 <= low <= high <= 1.0
    if n:
        assert low - 1e-12 <= k / n <= high + 1e-12


def test_win_rate_counts_ties_as_half() -> None:
    result = win_rate(80, 10, 10)
    assert result.rate == pytest.approx(0.85) and result.n == 100 and result.tie_rate == pytest.approx(0.1)
    assert (result.low, result.high) == wilson_interval(85, 100)
    excluded = win_rate(80, 10, 10, tie_rule="exclude")
    assert excluded.rate == pytest.approx(80 / 90) and excluded.n == 90
    assert win_rate(0, 0, 0).rate is None
    assert win_rate(0, 0, 4).rate == 0.5


def test_proportion_with_interval() -> None:
    assert proportion_with_interval(81, 263) == Estimate(81 / 263, *wilson_interval(81, 263), n=263)
    assert proportion_with_interval(0, 0) == Estimate(None, None, None, 0)


def test_t_quantiles_match_tables() -> None:
    table = {1: 12.706, 2: 4.303, 5: 2.571, 10: 2.228, 30: 2.042, 1000: 1.962}
    for df, value in table.items():
        assert t_quantile(0.95, df) == pytest.approx(value, abs=5e-4)
    assert t_quantile(0.99, 10) == pytest.approx(3.169, abs=5e-4)
    # The large-df expansion agrees with the exact series where they meet.
    assert _t_two_sided_coverage(t_quantile(0.95, 500), 500) == pytest.approx(0.95, abs=1e-9)


def test_mean_with_interval() -> None:
    result = mean_with_interval([1, 2, 3, 4, 5])
    # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.7764 -> half width 1.9632.
    assert result.value == 3.0 and result.n == 5
    assert result.low == pytest.approx(3 - 1.9632, abs=1e-4) and result.high == pytest.approx(3 + 1.9632, abs=1e-4)
    assert mean_with_interval([2.0]) == Estimate(2.0, None, None, 1)
    assert mean_with_interval([]) == Estimate(None, None, None, 0)
