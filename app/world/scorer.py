"""The true scorer of the bundled world: how good a response to a prompt really is.

The loop never trains on this score directly; the simulated labelers rank by
it plus noise, and the benchmarks use it to check that SFT, the reward model
and PPO each really improve the policy rather than only their own metric. It
works from the prompt text alone (the database stores only text) and gives
partial credit: a correct, concise answer scores 1.0; the right answer inside
extra words scores less the more words there are; near-miss numbers, partly
sorted lists and almost-reversed words earn some credit; hedging between
several candidate answers divides the credit; garbage scores 0.

Prompts that are not world prompts score None (not 0.0), so callers can tell
"wrong answer" from "cannot judge" and leave such prompts out of averages.
"""

from __future__ import annotations

import difflib
import re

from app.world.tasks import ANSWER_POOLS, WorldPrompt, parse_prompt

_TOKEN = re.compile(r"[a-z]+|\d+")
_NUMBER = re.compile(r"-?\d+")
_LETTERS = re.compile(r"[a-z]+")

# Each word beyond the answer costs this much, down to MIN_FORMAT: "The answer
# is 42." keeps 0.82 of the credit, a rambling paragraph keeps 0.3.
WORD_PENALTY = 0.06
MIN_FORMAT = 0.3
# A sorted list written without the comma separators of the prompt.
SEPARATOR_PENALTY = 0.9
NEAR_MISS_MAX = 0.5  # best credit for a wrong number
PARTIAL_SORT_MAX = 0.7  # best credit for a partly sorted list
PARTIAL_REVERSE_MAX = 0.6  # best credit for a misspelt reversal
RIGHT_TYPE_CREDIT = 0.15  # a wrong fact of the right kind (a colour for a colour question)


def score(prompt_text: str, response: str) -> float | None:
    """Scores a response in [0, 1] against the prompt's true answer; None for non-world prompts."""
    prompt = parse_prompt(prompt_text)
    if prompt is None:
        return None
    return score_prompt(prompt, response)


def score_prompt(prompt: WorldPrompt, response: str) -> float:
    """Scores a response in [0, 1] against an already parsed world prompt."""
    text = response.strip().lower()
    if not _TOKEN.search(text):
        return 0.0
    correctness = _CORRECTNESS[prompt.family](prompt, text)
    return round(correctness * format_factor(prompt, text), 6)


def format_factor(prompt: WorldPrompt, text: str) -> float:
    """Credit kept after extra words: 1.0 for the bare answer, falling to MIN_FORMAT."""
    extra = max(0, len(_TOKEN.findall(text)) - len(_TOKEN.findall(prompt.answer.lower())))
    factor = max(MIN_FORMAT, 1.0 - WORD_PENALTY * extra)
    if prompt.family == "sorting" and "," not in text:
        factor *= SEPARATOR_PENALTY
    return factor


def _hedged(found: list[str], answer: str) -> float:
    # Naming several candidates is hedging; credit is shared among them so a
    # policy cannot win by listing every possible answer.
    return 1.0 / len(found) if answer in found else 0.0


def _numeric(prompt: WorldPrompt, text: str) -> float:
    answer = int(prompt.answer)
    operands = {int(v) for k, v in prompt.fields.items() if k in ("a", "b")} - {answer}
    found = list(dict.fromkeys(int(n) for n in _NUMBER.findall(text) if int(n) not in operands))
    if not found:
        return 0.0
    if answer in found:
        return 1.0 / len(found)
    tolerance = 2.0 + 0.1 * abs(answer)
    closeness = max(0.0, 1.0 - abs(found[0] - answer) / tolerance)
    return NEAR_MISS_MAX * closeness / len(found)


def _sorting(prompt: WorldPrompt, text: str) -> float:
    expected = prompt.answer.split(", ")
    listed = set(expected)
    found = list(dict.fromkeys(w for w in _LETTERS.findall(text) if w in listed))
    if found == expected:
        return 1.0
    if not found:
        return 0.0
    coverage = len(found) / len(expected)
    pairs = [(a, b) for i, a in enumerate(found) for b in found[i + 1 :]]
    in_order = sum(a < b for a, b in pairs) / len(pairs) if pairs else 0.5
    return PARTIAL_SORT_MAX * coverage * in_order


def _reversal(prompt: WorldPrompt, text: str) -> float:
    answer = prompt.answer
    words = list(dict.fromkeys(_LETTERS.findall(text)))
    similarity = {w: difflib.SequenceMatcher(None, w, answer).ratio() for w in words}
    candidates = [w for w in words if similarity[w] >= 0.5]
    if answer in candidates:
        return _hedged(candidates, answer)
    if not candidates:
        return 0.0
    best = max(similarity[w] for w in candidates)
    return PARTIAL_REVERSE_MAX * best**2 / len(candidates)


def _facts(prompt: WorldPrompt, text: str) -> float:
    pool = ANSWER_POOLS[prompt.kind]
    # Plurals ("glimmerfoxes") name the same answer.
    found = [c for c in pool if re.search(rf"\b{re.escape(c.lower())}(?:e?s)?\b", text)]
    if not found:
        return 0.0
    if prompt.answer in found:
        return _hedged(found, prompt.answer)
    return RIGHT_TYPE_CREDIT / len(found)


_CORRECTNESS = {
    "arithmetic": _numeric,
    "counting": _numeric,
    "sorting": _sorting,
    "reversal": _reversal,
    "facts": _facts,
}
