"""Tests for the bundled world: prompts, true scorer, corpus, simulated labelers and demonstrators."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from app.world import (
    DEFAULT_NOISE,
    FAMILIES,
    SimulatedDemonstrator,
    SimulatedLabeler,
    corpus,
    demonstrate,
    generate_prompts,
    noise_for_agreement,
    pairwise_agreement,
    parse_prompt,
    score,
)
from app.world.labelers import TARGET_AGREEMENT, dense_ranks, measure_agreement, reference_rankings
from app.world.tasks import TOWNS


def test_generation_is_deterministic_per_seed():
    assert generate_prompts(60, seed=3) == generate_prompts(60, seed=3)
    assert [p.text for p in generate_prompts(60, seed=3)] != [p.text for p in generate_prompts(60, seed=4)]
    assert list(corpus(30, seed=1)) == list(corpus(30, seed=1))
    assert list(corpus(30, seed=1)) != list(corpus(30, seed=2))


def test_generation_balances_families_and_filters():
    counts = Counter(p.family for p in generate_prompts(100, seed=0))
    assert counts == dict.fromkeys(FAMILIES, 20)
    only = generate_prompts(10, seed=0, families=["reversal", "facts"])
    assert Counter(p.family for p in only) == {"reversal": 5, "facts": 5}
    with pytest.raises(ValueError, match="unknown families"):
        generate_prompts(3, seed=0, families=["poetry"])


def test_generated_prompts_are_unique_while_the_space_allows():
    texts = [p.text for p in generate_prompts(200, seed=5)]
    assert len(set(texts)) == 200


def test_every_family_parses_back_from_text_alone():
    for prompt in generate_prompts(1000, seed=7):
        parsed = parse_prompt(prompt.text)
        assert parsed is not None, prompt.text
        assert (parsed.family, parsed.kind, parsed.answer) == (prompt.family, prompt.kind, prompt.answer)
    # Whitespace the web form may add does not matter.
    assert parse_prompt("  What is 17 +   25? \n").answer == "42"
    assert parse_prompt("Write a poem about the sea.") is None


def test_scorer_gives_full_credit_to_true_answers():
    for prompt in generate_prompts(500, seed=11):
        assert score(prompt.text, prompt.answer) == 1.0, prompt
        assert score(prompt.text, f"  {prompt.answer.upper()}.\n") == 1.0


def test_scorer_returns_none_for_unknown_prompts():
    assert score("Write a poem about the sea.", "waves") is None


def test_scorer_partial_credit_for_arithmetic():
    q = "What is 17 + 25?"
    exact, wordy = score(q, "42"), score(q, "The answer is 42.")
    rambling = score(q, "The answer is 42 because when you add seventeen and twenty five you get it")
    near, far, hedge = score(q, "41"), score(q, "39"), score(q, "41 or 42")
    assert exact == 1.0
    assert 0.5 < wordy < exact
    assert 0 < rambling < wordy
    assert 0 < far < near < 0.5
    assert 0 < hedge < 0.6
    # Restating the sum does not count the operands as guesses.
    assert score(q, "17 + 25 = 42") > 0.8
    assert score(q, "1000") == 0.0
    assert score(q, "banana") == 0.0
    assert score(q, "") == 0.0


def test_scorer_partial_credit_for_sorting_reversal_counting_and_facts():
    sort_q = "Sort these words alphabetically: pepper, apple, meadow."
    assert score(sort_q, "apple, meadow, pepper") == 1.0
    swapped = score(sort_q, "apple, pepper, meadow")
    assert 0 < swapped < 0.7
    assert score(sort_q, "apple meadow pepper") < 1.0  # right order, wrong format
    assert score(sort_q, "pepper, meadow, apple") == 0.0  # fully reversed: no pair in order

    rev_q = "Reverse the word 'lantern'."
    assert score(rev_q, "nretnal") == 1.0
    assert 0 < score(rev_q, "nrteanl") < 0.6
    assert score(rev_q, "cobalt") == 0.0

    count_q = "How many times does the letter 'a' appear in 'banana'?"
    assert score(count_q, "3") == 1.0
    assert 0 < score(count_q, "2") < 0.5

    fact_q = "What colour is the river in Brindle?"
    assert TOWNS["Brindle"]["river"] == "silver"
    assert score(fact_q, "silver") == 1.0
    assert score(fact_q, "The river in Brindle is silver.") < 1.0
    assert score(fact_q, "green") == pytest.approx(0.15)  # a colour, but the wrong one
    assert score(fact_q, "silver or green") == pytest.approx(0.5 * 0.88)
    assert score(fact_q, "Odo") == 0.0


def test_scores_stay_in_unit_interval():
    rng = random.Random(0)
    junk = ["", "42", "a b c d e f g h i j k l m n o p q r s t u v", "-5", "silver silver"]
    for prompt in generate_prompts(300, seed=2):
        for response in junk + [demonstrate(prompt, rng, 0.5) for _ in range(3)]:
            assert 0.0 <= score(prompt.text, response) <= 1.0


def test_corpus_is_plain_text_not_instructions():
    docs = list(corpus(3000, seed=0))
    instruction = re.compile(r"^(What|Who|Where|Which|How|Sort|Put|Reverse|Spell)\b")
    for doc in docs:
        assert "?" not in doc and "Answer:" not in doc, doc
        assert not instruction.match(doc), doc
    text = "\n".join(docs)
    # It still carries the knowledge the instructions ask for.
    assert "The river in Brindle runs silver" in text
    assert re.search(r"\d+ \+ \d+ = \d+", text)
    assert "Written backwards, lantern becomes nretnal" in text
    # Also in the wording instructions use: words in quotes, questions reported in prose.
    assert "Written backwards, 'lantern' becomes nretnal" in text
    assert re.search(r"asked who the mayor of Brindle is and [a-z ]+: Odo\.", text)


def test_dense_ranks_and_pairwise_agreement():
    assert dense_ranks([0.2, 0.9, 0.2, 0.5]) == [3, 1, 3, 2]
    assert pairwise_agreement([1, 2, 3], [1, 3, 2]) == (2, 3)
    assert pairwise_agreement([1, 1, 2], [1, 2, 2]) == (1, 1)


def test_labeler_ranks_are_dense_and_tie_equal_completions():
    labeler = SimulatedLabeler(noise=DEFAULT_NOISE, seed=1)
    prompt = "What is 17 + 25?"
    completions = ["42", "42", "The answer is 42.", "41", "banana"]
    for _ in range(50):
        ranks = labeler.rank(prompt, completions)
        assert ranks[0] == ranks[1]
        assert sorted(set(ranks)) == list(range(1, max(ranks) + 1))
        assert set(labeler.likert(prompt, completions)) <= set(range(1, 8))
    exact = SimulatedLabeler(noise=0.0, seed=0)
    assert exact.rank(prompt, completions) == [1, 1, 2, 3, 4]
    assert exact.likert(prompt, completions) == [7, 7, 6, 4, 1]


def test_labeler_agreement_matches_instructgpt():
    # Fresh rankings (seed 1), not the ones DEFAULT_NOISE was tuned on (seed 0).
    items = reference_rankings(2000, seed=1)
    agreement = measure_agreement(DEFAULT_NOISE, items, seed=10)
    assert abs(agreement - TARGET_AGREEMENT) <= 0.03
    # More noise, less agreement: the knob does what it says.
    assert measure_agreement(DEFAULT_NOISE * 3, items, seed=10) < agreement - 0.05


def test_noise_for_agreement_recovers_default_noise():
    assert noise_for_agreement(0.73, n_rankings=2000, seed=0) == pytest.approx(DEFAULT_NOISE, abs=0.03)


def test_demonstrations_are_imperfect_and_uneven_across_families():
    prompts = generate_prompts(1000, seed=4)
    demonstrator = SimulatedDemonstrator(error_rate=0.2, seed=0)
    by_family: dict[str, list[float]] = {f: [] for f in FAMILIES}
    for prompt in prompts:
        by_family[prompt.family].append(score(prompt.text, demonstrator.demonstrate(prompt.text)))
    mean = {f: sum(v) / len(v) for f, v in by_family.items()}
    overall = sum(sum(v) for v in by_family.values()) / len(prompts)
    # Headroom: even the demonstrations fall well short of the true optimum...
    assert 0.5 < overall < 0.85
    # ...and some families are covered worse than others.
    assert mean["reversal"] < mean["arithmetic"] - 0.05
    # An error-free demonstrator is still wordy half the time.
    rng = random.Random(0)
    perfect = [score(p.text, demonstrate(p, rng, error_rate=0.0)) for p in prompts]
    assert 0.8 < sum(perfect) / len(perfect) < 0.95
    assert demonstrate("Write a poem about the sea.", rng) == "I am not sure."
