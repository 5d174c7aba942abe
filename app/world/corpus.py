"""Plain text about the bundled world, for pretraining the tiny base model.

This is the world's "web text": town chronicles, ledgers with sums, lists of
words put in order, notes on words written backwards, letter tallies and
questions reported in prose ("Odo asked who the mayor of Brindle is and was
told: Odo."). It carries the knowledge the instruction families ask for, but
always as prose to be continued, never as a question followed by its answer.
So a model pretrained on it knows the world yet does not follow instructions,
as GPT-3 did not; supervised fine-tuning is what teaches it to answer.

Words appear both after a space and in quotes, as the instructions quote them:
the byte-level tokenizer splits 'lantern' and " lantern" into different
tokens, and a model that has only seen one form cannot use what it knows about
the word in the other (the first base model reversed 56 of 56 words in prose,
yet its SFT model reversed almost none of the quoted words in instructions).
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
    words = rng.sample(WORDS, rng.randint(3, 6))
    ordered = ", ".join(sorted(words))
    if rng.random() < 0.5:  # the list as it came, then in order: sorting seen as text
        return rng.choice(
            [
                f"The clerk got the labels {', '.join(words)} and filed them in alphabetical order: {ordered}.",
                f"In alphabetical order, the words {', '.join(words)} read: {ordered}.",
            ]
        )
    opener = rng.choice(
        [
            "The clerk filed the labels in alphabetical order:",
            "In the dictionary these words come in this order:",
            "Sorted from a to z, the words read:",
        ]
    )
    return f"{opener} {ordered}."


def _backwards(rng: random.Random) -> str:
    lines = []
    for word in rng.sample(WORDS, rng.randint(2, 4)):
        lines.append(
            rng.choice(
                [
                    f"Written backwards, {word} becomes {word[::-1]}.",
                    f"The word {word} reversed reads {word[::-1]}.",
                    # Quoted, a word is other tokens than after a space: both forms occur in text.
                    f"Written backwards, '{word}' becomes {word[::-1]}.",
                    f"The word '{word}' spelt backwards is {word[::-1]}.",
                ]
            )
        )
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
        lines.append(
            rng.choice(
                [
                    f"The letter {letter} appears {count} {times} in {word}.",
                    f"In {word} the letter {letter} is found {count} {times}.",
                    f"The letter '{letter}' appears in '{word}' {count} {times}.",
                    f"Counting the letter '{letter}' in '{word}' gives {count}.",
                ]
            )
        )
    return " ".join(lines)


def _asked(rng: random.Random) -> str:
    # Questions reported in prose, the answer a few words later: the world's
    # knowledge next to the wording people ask it in, yet never a question
    # followed by its answer, so the model still does not follow instructions.
    town, person, animal = rng.choice(sorted(TOWNS)), rng.choice(sorted(PEOPLE)), rng.choice(sorted(ANIMALS))
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    c, d = rng.randint(2, 12), rng.randint(2, 12)
    high, low = max(a, b), min(a, b)
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    listed = rng.sample(WORDS, rng.randint(3, 5))
    asker = rng.choice(sorted(PEOPLE))
    said = rng.choice(["was told", "heard", "learnt", "found out"])
    lines = [
        f"{asker} asked what {a} + {b} is and {said}: {a + b}.",
        f"{asker} asked what {high} - {low} is and {said}: {high - low}.",
        f"{asker} asked what {c} times {d} is and {said}: {c * d}.",
        f"{asker} asked who the mayor of {town} is and {said}: {TOWNS[town]['mayor']}.",
        f"{asker} asked what colour the river in {town} is and {said}: {TOWNS[town]['river']}.",
        f"{asker} asked which animal is common in {town} and {said}: {TOWNS[town]['animal']}.",
        f"{asker} asked where {person} lives and {said}: {PEOPLE[person]['town']}.",
        f"{asker} asked what {person}'s favourite food is and {said}: {PEOPLE[person]['food']}.",
        f"{asker} asked what pet {person} keeps and {said}: {PEOPLE[person]['pet']}.",
        f"{asker} asked what colour a {animal} is and {said}: {ANIMALS[animal]['colour']}.",
        f"{asker} asked what sound a {animal} makes and {said}: {ANIMALS[animal]['sound']}.",
        f"{asker} asked for the word '{word}' spelt backwards and {said}: {word[::-1]}.",
        f"{asker} asked how many times the letter '{letter}' appears in '{word}' and {said}: {word.count(letter)}.",
        f"{asker} asked for {', '.join(listed)} in alphabetical order and {said}: {', '.join(sorted(listed))}.",
    ]
    return " ".join(rng.sample(lines, rng.randint(2, 4)))


_DOCUMENTS: tuple[Callable[[random.Random], str], ...] = (
    _town,
    _person,
    _animal,
    _ledger,
    _word_list,
    _backwards,
    _tally,
    _asked,
)


def corpus(n_docs: int, seed: int) -> Iterator[str]:
    """Yields n_docs short plain-text documents about the world, reproducibly from seed."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        yield rng.choice(_DOCUMENTS)(rng)
