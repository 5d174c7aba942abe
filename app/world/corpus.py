"""Plain text about the bundled world, for pretraining the tiny base model.

This is the world's "web text": town chronicles, ledgers with sums, lists of
words in order, notes on words written backwards and letter tallies. It
carries the knowledge the instruction families ask for, but always as prose to
be continued, never as a question followed by its answer. So a model
pretrained on it knows the world yet does not follow instructions, as GPT-3
did not; supervised fine-tuning is what teaches it to answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from app.world.tasks import ANIMALS, PEOPLE, TOWNS, WORDS


def _town(rng: random.Random) -> str:
    town = rng.choice(sorted(TOWNS))
    facts = TOWNS[town]
    sentences = [
        f"{town} is a quiet town by a {facts['river']} river.",
        f"The river in {town} runs {facts['river']} in every season.",
        f"The mayor of {town} is {facts['mayor']}.",
        f"{facts['mayor']} has been mayor of {town} for many years.",
        f"Many a {facts['animal']} lives in the hills around {town}.",
        f"In {town} the most common animal is the {facts['animal']}.",
    ]
    residents = [p for p, f in PEOPLE.items() if f["town"] == town]
    if residents:
        sentences.append(f"Among the people of {town} are {' and '.join(residents)}.")
    return " ".join(rng.sample(sentences, rng.randint(3, len(sentences))))


def _person(rng: random.Random) -> str:
    person = rng.choice(sorted(PEOPLE))
    facts = PEOPLE[person]
    sentences = [
        f"{person} lives in {facts['town']}.",
        f"{person} keeps a {facts['pet']} as a pet.",
        f"The favourite food of {person} is {facts['food']}.",
        f"Every market day {person} buys {facts['food']}, the food {person} likes best.",
        f"{person}'s pet {facts['pet']} follows {person} around {facts['town']}.",
    ]
    return " ".join(rng.sample(sentences, rng.randint(2, len(sentences))))


def _animal(rng: random.Random) -> str:
    animal = rng.choice(sorted(ANIMALS))
    facts = ANIMALS[animal]
    sentences = [
        f"The {animal} is an animal coloured {facts['colour']}.",
        f"A {animal} is {facts['colour']} from nose to tail.",
        f"When a {animal} calls, it makes a {facts['sound']}.",
        f"The sound a {animal} makes is a soft {facts['sound']}.",
    ]
    homes = [t for t, f in TOWNS.items() if f["animal"] == animal]
    sentences.append(f"The {animal} is common in {homes[0]}.")
    return " ".join(rng.sample(sentences, rng.randint(2, len(sentences))))


def _ledger(rng: random.Random) -> str:
    town = rng.choice(sorted(TOWNS))
    lines = [f"The market ledger of {town} reads:"]
    for _ in range(rng.randint(3, 6)):
        op = rng.choice(["+", "-", "times", "plus", "minus"])
        if op == "times":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            lines.append(f"{a} times {b} is {a * b}.")
            continue
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if op in ("-", "minus"):
            a, b = max(a, b), min(a, b)
            lines.append(f"{a} {op} {b} = {a - b}." if op == "-" else f"{a} minus {b} is {a - b}.")
        else:
            lines.append(f"{a} {op} {b} = {a + b}." if op == "+" else f"{a} plus {b} makes {a + b}.")
    return " ".join(lines)


def _word_list(rng: random.Random) -> str:
    words = sorted(rng.sample(WORDS, rng.randint(3, 6)))
    opener = rng.choice([
        "The clerk filed the labels in alphabetical order:",
        "In the dictionary these words come in this order:",
        "Sorted from a to z, the words read:",
    ])
    return f"{opener} {', '.join(words)}."


def _backwards(rng: random.Random) -> str:
    lines = []
    for word in rng.sample(WORDS, rng.randint(2, 4)):
        lines.append(rng.choice([
            f"Written backwards, {word} becomes {word[::-1]}.",
            f"The word {word} reversed reads {word[::-1]}.",
        ]))
    return " ".join(lines)


def _tally(rng: random.Random) -> str:
    lines = []
    for word in rng.sample(WORDS, rng.randint(2, 4)):
        if rng.random() < 0.85:
            letter = rng.choice(sorted(set(word)))
        else:
            letter = rng.choice([c for c in "abcdefghijklmnoprstuvwy" if c not in word])
        count = word.count(letter)
        times = "time" if count == 1 else "times"
        lines.append(rng.choice([
            f"The letter {letter} appears {count} {times} in {word}.",
            f"In {word} the letter {letter} is found {count} {times}.",
        ]))
    return " ".join(lines)


_DOCUMENTS: tuple[Callable[[random.Random], str], ...] = (
    _town, _person, _animal, _ledger, _word_list, _backwards, _tally,
)


def corpus(n_docs: int, seed: int) -> Iterator[str]:
    """Yields n_docs short plain-text documents about the world, reproducibly from seed."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        yield rng.choice(_DOCUMENTS)(rng)
