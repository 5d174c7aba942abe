"""Instruction prompts of the bundled world, with their checkable answers.

The bundled world is the embedded default and the benchmark bed of the loop:
no weights can be downloaded, so the project trains a tiny model from scratch
on text about a small invented world and then teaches it to follow
instructions. This module holds the world's fixed facts (towns, people,
animals) and five prompt families (arithmetic, sorting, reversal, counting,
facts). Every prompt is generated from a seeded template and can be parsed
back from its text alone, because the database stores only the text; the
scorer and the simulated labelers rely on that.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

FAMILIES: tuple[str, ...] = ("arithmetic", "sorting", "reversal", "counting", "facts")

# --- the world's fixed facts -------------------------------------------------
# Fixed rather than seeded: the scorer must know every fact from the prompt
# text alone, and the base model learns these facts from the corpus.

TOWNS: dict[str, dict[str, str]] = {
    "Brindle": {"river": "silver", "mayor": "Odo", "animal": "glimmerfox"},
    "Harrowgate": {"river": "green", "mayor": "Mira", "animal": "mudhare"},
    "Mossbury": {"river": "amber", "mayor": "Tobin", "animal": "pipwing"},
    "Quillon": {"river": "grey", "mayor": "Wren", "animal": "bramblecat"},
    "Tamsworth": {"river": "blue", "mayor": "Ansel", "animal": "stonetoad"},
    "Ellery": {"river": "red", "mayor": "Petra", "animal": "reedowl"},
    "Dunmere": {"river": "violet", "mayor": "Fenn", "animal": "dapplegoat"},
    "Pellwick": {"river": "gold", "mayor": "Isla", "animal": "emberfinch"},
}

PEOPLE: dict[str, dict[str, str]] = {
    "Odo": {"town": "Brindle", "food": "plums", "pet": "pipwing"},
    "Mira": {"town": "Harrowgate", "food": "cheese", "pet": "bramblecat"},
    "Tobin": {"town": "Mossbury", "food": "turnips", "pet": "glimmerfox"},
    "Wren": {"town": "Quillon", "food": "honey bread", "pet": "reedowl"},
    "Ansel": {"town": "Tamsworth", "food": "onion soup", "pet": "mudhare"},
    "Petra": {"town": "Ellery", "food": "apples", "pet": "emberfinch"},
    "Fenn": {"town": "Dunmere", "food": "barley cake", "pet": "stonetoad"},
    "Isla": {"town": "Pellwick", "food": "pickled eggs", "pet": "dapplegoat"},
    "Corin": {"town": "Brindle", "food": "cheese", "pet": "dapplegoat"},
    "Della": {"town": "Mossbury", "food": "plums", "pet": "reedowl"},
    "Jory": {"town": "Ellery", "food": "barley cake", "pet": "mudhare"},
    "Lark": {"town": "Quillon", "food": "turnips", "pet": "pipwing"},
}

ANIMALS: dict[str, dict[str, str]] = {
    "glimmerfox": {"colour": "orange", "sound": "chirr"},
    "mudhare": {"colour": "brown", "sound": "thump"},
    "pipwing": {"colour": "yellow", "sound": "trill"},
    "bramblecat": {"colour": "black", "sound": "purr"},
    "stonetoad": {"colour": "grey", "sound": "croak"},
    "reedowl": {"colour": "white", "sound": "hoot"},
    "dapplegoat": {"colour": "spotted", "sound": "bleat"},
    "emberfinch": {"colour": "red", "sound": "whistle"},
}

# Plain English words for sorting, reversing and counting prompts.
WORDS: tuple[str, ...] = (
    "apple",
    "basket",
    "candle",
    "dragon",
    "ember",
    "forest",
    "garden",
    "harbor",
    "island",
    "jacket",
    "kettle",
    "lantern",
    "meadow",
    "needle",
    "orchard",
    "pepper",
    "quiver",
    "ribbon",
    "saddle",
    "timber",
    "umbrella",
    "velvet",
    "wagon",
    "yarrow",
    "anchor",
    "banana",
    "cobalt",
    "desert",
    "feather",
    "ginger",
    "hammer",
    "iris",
    "juniper",
    "kitten",
    "ladder",
    "marble",
    "nutmeg",
    "otter",
    "pebble",
    "rabbit",
    "silver",
    "tunnel",
    "violin",
    "willow",
    "bottle",
    "cactus",
    "dolphin",
    "falcon",
    "goblet",
    "hollow",
    "mitten",
    "pillow",
    "rocket",
    "sparrow",
    "tomato",
    "walnut",
)


@dataclass(frozen=True)
class WorldPrompt:
    """One instruction with its correct answer; `kind` names the template's question."""

    text: str
    family: str
    answer: str
    kind: str
    fields: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


# --- families: a question kind is a (regex, answer function, generator) --------


@dataclass(frozen=True)
class _Kind:
    family: str
    name: str
    pattern: re.Pattern[str]
    answer: Callable[[dict[str, str]], str]
    make: Callable[[random.Random], dict[str, str]]
    template: str


def _arith_fields(op: str) -> Callable[[random.Random], dict[str, str]]:
    def make(rng: random.Random) -> dict[str, str]:
        if op == "times":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        else:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            if op == "-" and b > a:
                a, b = b, a
        return {"a": str(a), "b": str(b)}

    return make


def _arith_answer(op: str) -> Callable[[dict[str, str]], str]:
    def answer(f: dict[str, str]) -> str:
        a, b = int(f["a"]), int(f["b"])
        return str({"+": a + b, "-": a - b, "times": a * b}[op])

    return answer


def _sort_fields(rng: random.Random) -> dict[str, str]:
    return {"words": ", ".join(rng.sample(WORDS, rng.randint(3, 5)))}


def _sort_answer(f: dict[str, str]) -> str:
    return ", ".join(sorted(w.strip() for w in f["words"].split(",")))


def _count_fields(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    # Mostly letters that occur, sometimes one that does not (answer 0).
    if rng.random() < 0.85:
        letter = rng.choice(sorted(set(word)))
    else:
        letter = rng.choice([c for c in "abcdefghijklmnoprstuvwy" if c not in word])
    return {"letter": letter, "word": word}


def _pick(table: dict[str, dict[str, str]], key: str) -> Callable[[random.Random], dict[str, str]]:
    return lambda rng: {key: rng.choice(sorted(table))}


_NUM = r"(?P<a>\d+)"
_NUM_B = r"(?P<b>\d+)"
_WORDLIST = r"(?P<words>[a-z]+(?:, [a-z]+)+)"
_TOWN = "(?P<town>" + "|".join(TOWNS) + ")"
_PERSON = "(?P<person>" + "|".join(PEOPLE) + ")"
_ANIMAL = "(?P<animal>" + "|".join(ANIMALS) + ")"


def _kind(
    family: str,
    name: str,
    template: str,
    regex: str,
    answer: Callable[[dict[str, str]], str],
    make: Callable[[random.Random], dict[str, str]],
) -> _Kind:
    return _Kind(family, name, re.compile("^" + regex + "$"), answer, make, template)


KINDS: tuple[_Kind, ...] = (
    _kind(
        "arithmetic",
        "add",
        "What is {a} + {b}?",
        rf"What is {_NUM} \+ {_NUM_B}\?",
        _arith_answer("+"),
        _arith_fields("+"),
    ),
    _kind(
        "arithmetic",
        "subtract",
        "What is {a} - {b}?",
        rf"What is {_NUM} - {_NUM_B}\?",
        _arith_answer("-"),
        _arith_fields("-"),
    ),
    _kind(
        "arithmetic",
        "multiply",
        "What is {a} times {b}?",
        rf"What is {_NUM} times {_NUM_B}\?",
        _arith_answer("times"),
        _arith_fields("times"),
    ),
    _kind(
        "sorting",
        "sort",
        "Sort these words alphabetically: {words}.",
        rf"Sort these words alphabetically: {_WORDLIST}\.",
        _sort_answer,
        _sort_fields,
    ),
    _kind(
        "sorting",
        "order",
        "Put these words in alphabetical order: {words}.",
        rf"Put these words in alphabetical order: {_WORDLIST}\.",
        _sort_answer,
        _sort_fields,
    ),
    _kind(
        "reversal",
        "reverse",
        "Reverse the word '{word}'.",
        r"Reverse the word '(?P<word>[a-z]+)'\.",
        lambda f: f["word"][::-1],
        lambda rng: {"word": rng.choice(WORDS)},
    ),
    _kind(
        "reversal",
        "backwards",
        "Spell '{word}' backwards.",
        r"Spell '(?P<word>[a-z]+)' backwards\.",
        lambda f: f["word"][::-1],
        lambda rng: {"word": rng.choice(WORDS)},
    ),
    _kind(
        "counting",
        "count",
        "How many times does the letter '{letter}' appear in '{word}'?",
        r"How many times does the letter '(?P<letter>[a-z])' appear in '(?P<word>[a-z]+)'\?",
        lambda f: str(f["word"].count(f["letter"])),
        _count_fields,
    ),
    _kind(
        "facts",
        "river",
        "What colour is the river in {town}?",
        rf"What colour is the river in {_TOWN}\?",
        lambda f: TOWNS[f["town"]]["river"],
        _pick(TOWNS, "town"),
    ),
    _kind(
        "facts",
        "mayor",
        "Who is the mayor of {town}?",
        rf"Who is the mayor of {_TOWN}\?",
        lambda f: TOWNS[f["town"]]["mayor"],
        _pick(TOWNS, "town"),
    ),
    _kind(
        "facts",
        "town_animal",
        "Which animal is common in {town}?",
        rf"Which animal is common in {_TOWN}\?",
        lambda f: TOWNS[f["town"]]["animal"],
        _pick(TOWNS, "town"),
    ),
    _kind(
        "facts",
        "home",
        "Where does {person} live?",
        rf"Where does {_PERSON} live\?",
        lambda f: PEOPLE[f["person"]]["town"],
        _pick(PEOPLE, "person"),
    ),
    _kind(
        "facts",
        "food",
        "What is {person}'s favourite food?",
        rf"What is {_PERSON}'s favourite food\?",
        lambda f: PEOPLE[f["person"]]["food"],
        _pick(PEOPLE, "person"),
    ),
    _kind(
        "facts",
        "pet",
        "What pet does {person} keep?",
        rf"What pet does {_PERSON} keep\?",
        lambda f: PEOPLE[f["person"]]["pet"],
        _pick(PEOPLE, "person"),
    ),
    _kind(
        "facts",
        "animal_colour",
        "What colour is a {animal}?",
        rf"What colour is a {_ANIMAL}\?",
        lambda f: ANIMALS[f["animal"]]["colour"],
        _pick(ANIMALS, "animal"),
    ),
    _kind(
        "facts",
        "sound",
        "What sound does a {animal} make?",
        rf"What sound does a {_ANIMAL} make\?",
        lambda f: ANIMALS[f["animal"]]["sound"],
        _pick(ANIMALS, "animal"),
    ),
)

# Which facts a wrong answer of the right type is drawn from, per fact kind.
ANSWER_POOLS: dict[str, tuple[str, ...]] = {
    "river": tuple(sorted({t["river"] for t in TOWNS.values()} | {a["colour"] for a in ANIMALS.values()})),
    "animal_colour": tuple(sorted({t["river"] for t in TOWNS.values()} | {a["colour"] for a in ANIMALS.values()})),
    "mayor": tuple(PEOPLE),
    "town_animal": tuple(ANIMALS),
    "pet": tuple(ANIMALS),
    "home": tuple(TOWNS),
    "food": tuple(sorted({p["food"] for p in PEOPLE.values()})),
    "sound": tuple(a["sound"] for a in ANIMALS.values()),
}


def _build(kind: _Kind, fields: dict[str, str]) -> WorldPrompt:
    text = kind.template.format(**fields)
    return WorldPrompt(text, kind.family, kind.answer(fields), kind.name, dict(fields))


def parse_prompt(text: str) -> WorldPrompt | None:
    """Recovers a world prompt (family, answer) from its text; None if it is not one."""
    text = " ".join(text.split())
    for kind in KINDS:
        match = kind.pattern.match(text)
        if match:
            return _build(kind, match.groupdict())
    return None


def generate_prompts(n: int, seed: int, families: list[str] | None = None, unique: bool = True) -> list[WorldPrompt]:
    """Generates n prompts, balanced over the families, reproducibly from seed."""
    chosen = list(families) if families else list(FAMILIES)
    unknown = set(chosen) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; known: {list(FAMILIES)}")
    rng = random.Random(seed)
    by_family = {f: [k for k in KINDS if k.family == f] for f in chosen}
    seen: set[str] = set()
    prompts: list[WorldPrompt] = []
    for i in range(n):
        family = chosen[i % len(chosen)]
        # Facts are a small finite set, so uniqueness is best-effort: after a
        # few tries a repeat is allowed rather than looping forever.
        for _ in range(50):
            kind = rng.choice(by_family[family])
            prompt = _build(kind, kind.make(rng))
            if not unique or prompt.text not in seen:
                break
        seen.add(prompt.text)
        prompts.append(prompt)
    rng.shuffle(prompts)
    return prompts
