"""Simulated labelers and demonstrators for the bundled world.

They stand in for the people of the InstructGPT loop when the loop runs
unattended (benchmarks, demos, tests). A `SimulatedLabeler` ranks or rates
completions by the true score plus Gaussian noise, the noise tuned so that
two independent labelers agree on about 73 % of the pairs they rank
differently (InstructGPT reports 72.6 %). `demonstrate` writes demonstrations
the way a hurried person would: often wordy ("The answer is 42."), sometimes
wrong, and worse on some families (reversing and sorting) than on others.

That imperfection is the world's headroom for RLHF: SFT can only imitate the
demonstrations, wordiness and mistakes included, while a concise correct
answer is easy to recognise when ranking. So rankings -> reward model -> PPO
can push the policy past SFT on the true score.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from app.world.scorer import score_prompt
from app.world.tasks import ANSWER_POOLS, WorldPrompt, generate_prompts, parse_prompt

# Measured by noise_for_agreement() on the reference pool (seed 0, 2000
# rankings); tests/test_world.py checks that it still gives 73 % +- 3 points.
DEFAULT_NOISE = 0.244
TARGET_AGREEMENT = 0.73

# Per family: (how much more often than error_rate the demonstrator errs,
# probability of wrapping the answer in a sentence). Reversal and sorting are
# the families demonstrators "do not cover well".
DEMONSTRATOR_PROFILE: dict[str, tuple[float, float]] = {
    "arithmetic": (1.0, 0.5),
    "counting": (1.5, 0.5),
    "facts": (1.0, 0.6),
    "sorting": (2.0, 0.6),
    "reversal": (2.5, 0.6),
}

_WRAPPERS = (
    "The answer is {answer}.",
    "I think it is {answer}.",
    "{answer}, I believe.",
    "It is {answer}.",
    "Sure! The answer is {answer}.",
)


def _near_miss(prompt: WorldPrompt, rng: random.Random) -> str:
    # A mistake a person would make: off by a little, one pair swapped, two
    # letters transposed, or another fact of the same kind.
    if prompt.family in ("arithmetic", "counting"):
        wrong = int(prompt.answer) + rng.choice([-3, -2, -1, 1, 2, 3])
        return str(max(0, wrong) if prompt.family == "counting" else wrong)
    if prompt.family == "sorting":
        words = prompt.answer.split(", ")
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
        return ", ".join(words)
    if prompt.family == "reversal":
        letters = list(prompt.answer)
        if len(letters) < 3 or rng.random() < 0.3:
            return prompt.fields["word"]  # forgot to reverse it at all
        i = rng.randrange(len(letters) - 1)
        letters[i], letters[i + 1] = letters[i + 1], letters[i]
        return "".join(letters)
    others = [a for a in ANSWER_POOLS[prompt.kind] if a != prompt.answer]
    return rng.choice(others)


def demonstrate(prompt: WorldPrompt | str, rng: random.Random, error_rate: float = 0.2) -> str:
    """Writes one imperfect demonstration: sometimes wrong, often wordy."""
    parsed = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if parsed is None:
        return "I am not sure."
    error_scale, wordy = DEMONSTRATOR_PROFILE[parsed.family]
    answer = _near_miss(parsed, rng) if rng.random() < min(1.0, error_rate * error_scale) else parsed.answer
    if rng.random() < wordy:
        return rng.choice(_WRAPPERS).format(answer=answer)
    return answer


class SimulatedDemonstrator:
    """A seeded demonstrator with a fixed error rate, for scripted runs of the loop."""

    def __init__(self, error_rate: float = 0.2, seed: int = 0) -> None:
        self.error_rate = error_rate
        self.rng = random.Random(seed)

    def demonstrate(self, prompt: WorldPrompt | str) -> str:
        """Writes one demonstration for the prompt."""
        return demonstrate(prompt, self.rng, self.error_rate)


class SimulatedLabeler:
    """Ranks and rates completions by the true score plus Gaussian noise of std `noise`."""

    def __init__(self, noise: float = DEFAULT_NOISE, seed: int = 0) -> None:
        self.noise = noise
        self.rng = random.Random(seed)

    def _perceived(self, true_scores: Sequence[float]) -> list[float]:
        # One noise draw per distinct true score, so completions that are
        # equally good are perceived equally and end up tied.
        seen = {s: s + self.rng.gauss(0.0, self.noise) for s in sorted(set(true_scores))}
        return [seen[s] for s in true_scores]

    def true_scores(self, prompt_text: str, completions: Sequence[str]) -> list[float]:
        """The true scores the labeler perceives through its noise (0.0 for non-world prompts)."""
        parsed = parse_prompt(prompt_text)
        if parsed is None:
            return [0.0] * len(completions)
        return [score_prompt(parsed, c) for c in completions]

    def rank(self, prompt_text: str, completions: Sequence[str]) -> list[int]:
        """Dense ranks 1..m (1 best) per completion; equal true scores tie."""
        return dense_ranks(self._perceived(self.true_scores(prompt_text, completions)))

    def likert(self, prompt_text: str, completions: Sequence[str]) -> list[int]:
        """Overall quality on a 1..7 scale per completion."""
        perceived = self._perceived(self.true_scores(prompt_text, completions))
        return [min(7, max(1, round(1 + 6 * p))) for p in perceived]


def dense_ranks(values: Sequence[float]) -> list[int]:
    """Dense ranks, 1 for the highest value; equal values share a rank."""
    order = {v: i + 1 for i, v in enumerate(sorted(set(values), reverse=True))}
    return [order[v] for v in values]


def pairwise_agreement(ranks_a: Sequence[int], ranks_b: Sequence[int]) -> tuple[int, int]:
    """Counts (agreeing, compared) pairs that neither ranking ties."""
    agree = total = 0
    for i in range(len(ranks_a)):
        for j in range(i + 1, len(ranks_a)):
            da, db = ranks_a[i] - ranks_a[j], ranks_b[i] - ranks_b[j]
            if da and db:
                total += 1
                agree += (da > 0) == (db > 0)
    return agree, total


def reference_rankings(n_rankings: int = 2000, seed: int = 0) -> list[tuple[str, list[str]]]:
    """Prompts with 4..9 completions like those a policy fine-tuned on demonstrations writes."""
    rng = random.Random(seed)
    items = []
    for prompt in generate_prompts(n_rankings, seed, unique=False):
        k = rng.randint(4, 9)
        completions = [demonstrate(prompt, rng, error_rate=0.4) for _ in range(k)]
        if rng.random() < 0.2:  # the odd off-topic sample
            completions[rng.randrange(k)] = "the river runs silver and the hills are green"
        items.append((prompt.text, completions))
    return items


def measure_agreement(noise: float, items: Sequence[tuple[str, Sequence[str]]], seed: int = 0) -> float:
    """Fraction of non-tied pairs on which two independent labelers with this noise agree."""
    return _agreement(noise, _true_scores(items), seed)


def _true_scores(items: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
    scorer = SimulatedLabeler(0.0)
    return [scorer.true_scores(prompt_text, completions) for prompt_text, completions in items]


def _agreement(noise: float, scored: list[list[float]], seed: int) -> float:
    first, second = SimulatedLabeler(noise, seed), SimulatedLabeler(noise, seed + 1)
    agree = total = 0
    for scores in scored:
        ranks_a = dense_ranks(first._perceived(scores))
        ranks_b = dense_ranks(second._perceived(scores))
        a, t = pairwise_agreement(ranks_a, ranks_b)
        agree, total = agree + a, total + t
    return agree / total if total else 1.0


def noise_for_agreement(target: float = TARGET_AGREEMENT, n_rankings: int = 2000, seed: int = 0) -> float:
    """Finds by bisection the noise at which two labelers agree on `target` of pairs."""
    scored = _true_scores(reference_rankings(n_rankings, seed))
    low, high = 0.0, 2.0
    for _ in range(14):
        mid = (low + high) / 2
        # Agreement falls as noise rises; the same seeds at every step keep
        # the measured curve monotone.
        if _agreement(mid, scored, seed) > target:
            low = mid
        else:
            high = mid
    return round((low + high) / 2, 3)
