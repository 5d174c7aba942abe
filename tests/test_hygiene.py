"""Tests for prompt hygiene: PII, duplicates, shared prefixes, per-user caps and splits, no database."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.collection.hygiene import (
    DroppedPrompt,
    HygieneConfig,
    apply_hygiene,
    assign_split,
    dropped_csv,
    find_pii,
    luhn_valid,
    normalize_text,
    normalized_key,
    prefix_key,
    redact_pii,
)
from app.collection.prompt_import import PromptRow, parse_prompts

NO_LIMITS = HygieneConfig(prefix_chars=None, max_per_user=None)


def rows(*texts: str, user: str | None = None) -> list[PromptRow]:
    return [PromptRow(i, text, user) for i, text in enumerate(texts, start=1)]


def run(items, config=NO_LIMITS, existing=frozenset(), **kwargs):
    return apply_hygiene(items, existing_keys=existing, config=config, **kwargs)


def drops(result) -> list[tuple[int, str]]:
    return [(d.line, d.rule) for d in result.dropped]


def check_totals(result) -> None:
    r = result.report
    assert r.received == r.kept + r.pii_dropped + r.duplicates + r.shared_prefix + r.over_user_limit
    assert r.kept == len(result.kept) == sum(r.splits.values())


# -- keys -------------------------------------------------------------------------------------


def test_normalisation_ignores_case_whitespace_and_compatibility_forms():
    assert normalize_text("  Hello\t\tWORLD\n") == "hello world"
    assert normalized_key("Straße  ﬁx") == normalized_key("STRASSE fix")
    assert normalized_key("hello world") != normalized_key("hello  world!")
    assert len(normalized_key("x")) == 64


def test_prefix_key_needs_enough_characters_and_differs_from_the_text_key():
    assert prefix_key("abcd", 5) is None
    assert prefix_key("ABCDE and more", 5) == prefix_key("abcde   other", 5)
    assert prefix_key("abcde", 5) != normalized_key("abcde")
    assert prefix_key("abcdef", 5) != prefix_key("abcdef", 6)


# -- exact duplicates -------------------------------------------------------------------------


def test_exact_duplicates_within_the_import():
    result = run(rows("Write a poem", "write  a POEM", "Write a story", "Write a poem\n"))
    assert drops(result) == [(2, "duplicate"), (4, "duplicate")]
    assert result.dropped[0].detail == "same text as line 1"
    assert result.report.duplicates == 2
    assert [k.line for k in result.kept] == [1, 3]
    check_totals(result)


def test_duplicates_of_earlier_batches_through_a_set_or_a_lookup():
    stored = {normalized_key("Old prompt")}
    result = run(rows("old   PROMPT", "new prompt"), existing=stored)
    assert drops(result) == [(1, "duplicate")]
    assert result.dropped[0].detail == "same text as a prompt in an earlier batch"
    assert result.report.duplicates_of_earlier_batches == 1

    calls = []

    def lookup(keys):
        calls.append(keys)
        return set(keys) & stored

    config = HygieneConfig(prefix_chars=5, max_per_user=None)
    again = run(rows("old   PROMPT", "new prompt", "tiny"), config=config, existing=lookup)
    assert drops(again) == [(1, "duplicate")]
    # One call with every text key and every prefix key (none for the 4-character prompt).
    assert len(calls) == 1
    expected = {normalized_key(t) for t in ("old prompt", "new prompt", "tiny")} | {
        prefix_key("old prompt", 5),
        prefix_key("new prompt", 5),
    }
    assert set(calls[0]) == expected


# -- shared prefixes --------------------------------------------------------------------------


def test_shared_prefix_keeps_only_the_first():
    config = HygieneConfig(prefix_chars=20, max_per_user=None)
    head = "Answer the question: "  # 21 characters
    texts = (
        head + "what is 2+2?",
        head.upper() + "why is the sky blue?",
        "short prompt",
        "short prompt too",
        head + "x",
    )
    result = run(rows(*texts), config=config)
    assert drops(result) == [(2, "shared_prefix"), (5, "shared_prefix")]
    assert result.dropped[0].detail == "same first 20 characters as line 1"
    assert result.report.shared_prefix == 2
    check_totals(result)


def test_prompts_shorter_than_the_prefix_never_match_by_prefix():
    config = HygieneConfig(prefix_chars=10, max_per_user=None)
    result = run(rows("abcdefghi", "abcdefghi!", "abcdefghij", "abcdefghijk"), config=config)
    # "abcdefghi" has 9 characters, so only the last two share a 10-character prefix.
    assert drops(result) == [(4, "shared_prefix")]


def test_shared_prefix_with_an_earlier_batch_and_disabled_rule():
    stored = {prefix_key("Translate to French: good morning", 15)}
    config = HygieneConfig(prefix_chars=15, max_per_user=None)
    result = run(rows("translate to french: hello", "Translate to German: hello"), config=config, existing=stored)
    assert drops(result) == [(1, "shared_prefix")]
    assert result.report.shared_prefix_with_earlier_batches == 1
    assert result.kept[0].prefix_key == prefix_key("Translate to German: hello", 15)

    disabled = run(rows("translate to french: hello", "translate to french: bye"), existing=stored)
    assert disabled.report.shared_prefix == 0
    assert [k.prefix_key for k in disabled.kept] == [None, None]


def test_prefix_rule_on_many_prompts_counts_exactly():
    config = HygieneConfig(prefix_chars=30, max_per_user=None)
    template = "Template prompt number one. "
    texts = [f"{template if i % 3 == 0 else ''}item {i:05d} with a unique tail" for i in range(3_000)]
    result = run(rows(*texts), config=config)
    # 1,000 prompts start with the same 28-character template + "it": all but the first are dropped.
    assert result.report.shared_prefix == 999
    assert result.report.kept == 2_001


# -- per-user cap -----------------------------------------------------------------------------


def test_per_user_cap_keeps_the_first_prompts():
    items = [PromptRow(i, f"prompt {i}", "alice" if i % 2 else "bob") for i in range(1, 11)]
    items += [PromptRow(11 + i, f"anonymous {i}", None) for i in range(5)]
    result = run(items, config=HygieneConfig(prefix_chars=None, max_per_user=3))
    assert [k.line for k in result.kept if k.source_user_id == "alice"] == [1, 3, 5]
    assert [k.line for k in result.kept if k.source_user_id == "bob"] == [2, 4, 6]
    assert result.report.over_user_limit == 4
    assert sum(1 for k in result.kept if k.source_user_id is None) == 5
    assert result.dropped[0] == DroppedPrompt(
        7, "over_user_limit", "user 'alice' has reached the limit of 3 prompts per user"
    )
    check_totals(result)


def test_per_user_cap_counts_prompts_already_stored():
    items = [PromptRow(i, f"prompt {i}", "alice") for i in range(1, 6)]
    config = HygieneConfig(prefix_chars=None, max_per_user=3)
    assert run(items, config=config, existing_user_counts={"alice": 2}).report.kept == 1
    seen = []

    def counts(users):
        seen.append(users)
        return {"alice": 3}

    assert run(items, config=config, existing_user_counts=counts).report.kept == 0
    assert seen == [["alice"]]


# -- PII --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "found"),
    [
        ("write to jane.doe+work@mail.example.co.uk today", "email", "jane.doe+work@mail.example.co.uk"),
        ("call 555-123-4567 tomorrow", "phone", "555-123-4567"),
        ("call (555) 123-4567.", "phone", "(555) 123-4567"),
        ("call 555.123.4567", "phone", "555.123.4567"),
        ("call +1 (555) 123-4567", "phone", "+1 (555) 123-4567"),
        ("ring +44 20 7946 0958 now", "phone", "+44 20 7946 0958"),
        ("ring +33612345678", "phone", "+33612345678"),
        ("pay with 4111 1111 1111 1111", "credit_card", "4111 1111 1111 1111"),
        ("pay with 5500-0000-0000-0004", "credit_card", "5500-0000-0000-0004"),
        ("amex 3782 822463 10005", "credit_card", "3782 822463 10005"),
        ("card 4012888888881881", "credit_card", "4012888888881881"),
        ("my ssn is 123-45-6789", "ssn", "123-45-6789"),
        ("server at 8.8.8.8, ok", "ip_address", "8.8.8.8"),
        ("home 192.168.1.20.", "ip_address", "192.168.1.20"),
        ("v6 2001:db8:85a3::8a2e:370:7334 here", "ip_address", "2001:db8:85a3::8a2e:370:7334"),
    ],
)
def test_find_pii_finds(text, kind, found):
    matches = find_pii(text)
    assert [(m.kind, text[m.start : m.end]) for m in matches] == [(kind, found)]


@pytest.mark.parametrize(
    "text",
    [
        "What is 17 + 25?",
        "Sort these numbers: 12 45 3 99 1000 2",
        "Compute 123456 * 789",
        "On 2021-03-15 at 12:30:45 the price was 1,234,567.89",
        "Pi is 3.14159265358979",
        "Use version 1.2.3.4.5 or 300.1.1.1",
        "Call localhost at 127.0.0.1 or ::1 or 0.0.0.0",
        "Python slice x[1::2] and C++ A::B",
        "card 4111 1111 1111 1112 fails the checksum",
        "not an ssn: 000-12-3456 or 666-12-3456",
        "an at sign @ alone, user@localhost",
        "the year 1999 and 5551234567890 are just numbers",
    ],
)
def test_find_pii_ignores_ordinary_text(text):
    assert find_pii(text) == []


@pytest.mark.parametrize(
    ("number", "valid"),
    [
        ("4111111111111111", True),
        ("4111 1111 1111 1111", True),
        ("4111-1111-1111-1111", True),
        ("79927398713", True),
        ("378282246310005", True),
        ("4111111111111112", False),
        ("79927398710", False),
        ("1234567812345678", False),
        ("", False),
        ("4111x1111", False),
    ],
)
def test_luhn(number, valid):
    assert luhn_valid(number) is valid


def test_redact_replaces_each_match_with_its_tag():
    text = "Mail a@b.io or call 555-123-4567; card 4111111111111111, ip 8.8.4.4, ssn 123-45-6789."
    assert redact_pii(text) == "Mail [EMAIL] or call [PHONE]; card [CREDIT_CARD], ip [IP_ADDRESS], ssn [SSN]."


PII_ROWS = [
    PromptRow(1, "Email me at bob@example.com please", "u1"),
    PromptRow(2, "No personal data here", "u1"),
    PromptRow(3, "Call 555-123-4567 or mail bob@example.com", "u2"),
    PromptRow(4, "Email me at alice@example.org please", "u3"),
]


def test_pii_drop_policy():
    result = run(PII_ROWS, config=HygieneConfig(prefix_chars=None, max_per_user=None, pii_policy="drop"))
    assert drops(result) == [(1, "pii"), (3, "pii"), (4, "pii")]
    assert result.dropped[1].detail == "contains email, phone"
    report = result.report
    assert (report.pii_dropped, report.pii_redacted, report.pii_flagged, report.kept) == (3, 0, 0, 1)
    assert report.pii_kinds == {"email": 3, "phone": 1, "credit_card": 0, "ssn": 0, "ip_address": 0}
    check_totals(result)


def test_pii_redact_policy_makes_prompts_differing_only_in_pii_duplicates():
    result = run(PII_ROWS, config=HygieneConfig(prefix_chars=None, max_per_user=None, pii_policy="redact"))
    assert drops(result) == [(4, "duplicate")]
    assert result.dropped[0].detail == "same text as line 1"
    assert [k.text for k in result.kept] == [
        "Email me at [EMAIL] please",
        "No personal data here",
        "Call [PHONE] or mail [EMAIL]",
    ]
    assert [k.pii_flags for k in result.kept] == [["email"], [], ["email", "phone"]]
    assert [k.pii_redacted for k in result.kept] == [True, False, True]
    assert result.kept[0].normalized_key == normalized_key("Email me at [EMAIL] please")
    assert (result.report.pii_redacted, result.report.pii_flagged, result.report.duplicates) == (2, 0, 1)
    check_totals(result)


def test_pii_flag_policy_keeps_text_verbatim():
    result = run(PII_ROWS, config=HygieneConfig(prefix_chars=None, max_per_user=None, pii_policy="flag"))
    assert result.dropped == []
    assert [k.text for k in result.kept] == [r.text for r in PII_ROWS]
    assert [k.pii_flags for k in result.kept] == [["email"], [], ["email", "phone"], ["email"]]
    assert [k.pii_redacted for k in result.kept] == [False] * 4
    assert (result.report.pii_flagged, result.report.pii_redacted) == (3, 0)


# -- order of the rules -----------------------------------------------------------------------


def test_pii_dropped_prompts_do_not_count_as_duplicates_or_against_the_cap():
    items = [
        PromptRow(1, "Reach me at x@y.com", "u"),
        PromptRow(2, "Reach me at x@y.com", "u"),
        PromptRow(3, "first clean", "u"),
        PromptRow(4, "second clean", "u"),
    ]
    result = run(items, config=HygieneConfig(prefix_chars=None, max_per_user=2))
    assert drops(result) == [(1, "pii"), (2, "pii")]
    assert result.report.duplicates == 0


def test_duplicates_and_prefix_drops_do_not_use_up_a_users_quota():
    items = [
        PromptRow(1, "Tell me a joke about cats", "u"),
        PromptRow(2, "tell me a joke about cats", "u"),
        PromptRow(3, "Tell me a joke about dogs", "u"),
        PromptRow(4, "Something else entirely", "u"),
        PromptRow(5, "A third different prompt", "u"),
    ]
    result = run(items, config=HygieneConfig(prefix_chars=20, max_per_user=2))
    assert drops(result) == [(2, "duplicate"), (3, "shared_prefix"), (5, "over_user_limit")]
    assert [k.line for k in result.kept] == [1, 4]


def test_a_prompt_dropped_for_the_cap_does_not_block_the_same_text_from_another_user():
    items = [PromptRow(1, "one", "u"), PromptRow(2, "two", "u"), PromptRow(3, "two", "v")]
    result = run(items, config=HygieneConfig(prefix_chars=None, max_per_user=1))
    assert drops(result) == [(2, "over_user_limit")]
    assert [(k.line, k.source_user_id) for k in result.kept] == [(1, "u"), (3, "v")]


def test_an_exact_duplicate_is_reported_as_duplicate_not_shared_prefix():
    text = "x" * 150
    result = run(rows(text, text), config=HygieneConfig())
    assert drops(result) == [(2, "duplicate")]


# -- splits -----------------------------------------------------------------------------------


def test_assign_split_is_stable_and_pinned():
    # Pinned so a refactor cannot silently move stored users between splits.
    assert [assign_split(k) for k in ("alice", "bob", "u4", "u7")] == ["train", "train", "test", "test"]
    assert assign_split("bob", (0.5, 0.25, 0.25)) == "valid"
    assert assign_split("anyone", (1.0, 0.0, 0.0)) == "train"
    assert assign_split("anyone", (0.0, 0.0, 1.0)) == "test"


def test_assign_split_follows_the_fractions():
    counts = {"train": 0, "valid": 0, "test": 0}
    for i in range(10_000):
        counts[assign_split(f"user-{i}")] += 1
    assert 7_700 < counts["train"] < 8_300
    assert 800 < counts["valid"] < 1_200
    assert 800 < counts["test"] < 1_200


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.1, -0.1, 0.0)])
def test_bad_fractions_are_refused(fractions):
    with pytest.raises(ValueError, match="split fractions must be three non-negative numbers summing to 1"):
        assign_split("x", fractions)


def test_prompts_without_user_are_split_by_their_text():
    result = run(rows(*(f"prompt {i}" for i in range(200))))
    assert [k.split for k in result.kept] == [assign_split(f"prompt {i}") for i in range(200)]
    assert set(result.report.splits) == {"train", "valid", "test"}
    assert min(result.report.splits.values()) > 0


users = st.sampled_from([None, "ann", "ben", "cy", "dee", "eve", "fay", "gus", "hal"])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(users, st.text(min_size=1, max_size=30).filter(str.strip)), min_size=1, max_size=60))
def test_no_user_straddles_splits_across_batches(items):
    half = len(items) // 2
    config = HygieneConfig(max_per_user=5, prefix_chars=8)
    first = run([PromptRow(i, t, u) for i, (u, t) in enumerate(items[:half])], config=config)
    second = run([PromptRow(i, t, u) for i, (u, t) in enumerate(items[half:])], config=config)
    split_of: dict[str, str] = {}
    for kept in first.kept + second.kept:
        if kept.source_user_id is not None:
            assert split_of.setdefault(kept.source_user_id, kept.split) == kept.split
            assert kept.split == assign_split(kept.source_user_id)
    for result in (first, second):
        check_totals(result)
        assert len({k.normalized_key for k in result.kept}) == len(result.kept)
        keys = [k.prefix_key for k in result.kept if k.prefix_key is not None]
        assert len(set(keys)) == len(keys)
        per_user: dict[str, int] = {}
        for kept in result.kept:
            if kept.source_user_id is not None:
                per_user[kept.source_user_id] = per_user.get(kept.source_user_id, 0) + 1
        assert max(per_user.values(), default=0) <= 5


# -- report -----------------------------------------------------------------------------------


def test_report_is_json_serialisable_and_dropped_csv_lists_each_drop():
    data = b"\n".join(
        json.dumps(o).encode()
        for o in [
            {"text": "Hello there, how are you?", "source_user_id": "a"},
            {"text": "hello there, how are you?", "source_user_id": "b"},
            {"text": "My email is a@b.org, help", "source_user_id": "c"},
            {"text": "Another prompt, by a", "source_user_id": "a"},
        ]
    )
    parsed = parse_prompts(data, "jsonl")
    result = apply_hygiene(parsed.rows, existing_keys=set(), config=HygieneConfig(max_per_user=1))
    assert result.report.to_dict() == asdict(result.report)  # the hand-built dict misses no field
    report = json.loads(json.dumps(result.report.to_dict()))
    counted = ("received", "kept", "pii_dropped", "duplicates", "shared_prefix", "over_user_limit")
    assert {k: report[k] for k in counted} == {
        "received": 4,
        "kept": 1,
        "pii_dropped": 1,
        "duplicates": 1,
        "shared_prefix": 0,
        "over_user_limit": 1,
    }
    assert report["config"] == {
        "prefix_chars": 100,
        "max_per_user": 1,
        "pii_policy": "drop",
        "split_fractions": [0.8, 0.1, 0.1],
    }
    assert report["dropped"] == [
        {"line": 2, "rule": "duplicate", "detail": "same text as line 1"},
        {"line": 3, "rule": "pii", "detail": "contains email"},
        {"line": 4, "rule": "over_user_limit", "detail": "user 'a' has reached the limit of 1 prompts per user"},
    ]
    assert list(csv.reader(io.StringIO(dropped_csv(result)))) == [
        ["line", "rule", "detail"],
        ["2", "duplicate", "same text as line 1"],
        ["3", "pii", "contains email"],
        ["4", "over_user_limit", "user 'a' has reached the limit of 1 prompts per user"],
    ]


def test_kept_prompts_carry_their_fields():
    result = run([PromptRow(7, "Few-shot: Q: 1+1 A: 2", "u1", "few-shot", {"src": "api"})], config=HygieneConfig())
    (kept,) = result.kept
    assert (kept.line, kept.text, kept.source_user_id, kept.category, kept.metadata) == (
        7,
        "Few-shot: Q: 1+1 A: 2",
        "u1",
        "few-shot",
        {"src": "api"},
    )
    assert kept.split == assign_split("u1")
    assert kept.prefix_key is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prefix_chars": 0}, "prefix_chars must be at least 1"),
        ({"max_per_user": 0}, "max_per_user must be at least 1"),
        ({"pii_policy": "erase"}, "pii_policy must be one of drop, redact, flag"),
        ({"split_fractions": (0.5, 0.5, 0.5)}, "split fractions must be three non-negative numbers summing to 1"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HygieneConfig(**kwargs)


# -- held-out prompts in small imports (issue 20) -------------------------------------------------------------

DEMO_USERS = [f"demo-{i}" for i in range(6)]  # the demo's source users: the hash alone puts all six in train


def test_the_hash_alone_leaves_a_small_import_without_held_out_prompts():
    assert {assign_split(u) for u in DEMO_USERS} == {"train"}


def test_a_small_import_still_gets_valid_and_test_prompts_split_by_user():
    items = [PromptRow(i, f"question {i}", DEMO_USERS[i % 6]) for i in range(24)]
    result = run(items, existing_user_splits={})
    check_totals(result)
    by_user: dict[str, set[str]] = {}
    for kept in result.kept:
        by_user.setdefault(kept.source_user_id, set()).add(kept.split)
    assert all(len(splits) == 1 for splits in by_user.values())  # no user straddles splits
    users_in = {s: sorted(u for u, splits in by_user.items() if s in splits) for s in ("train", "valid", "test")}
    assert [len(users_in[s]) for s in ("train", "valid", "test")] == [4, 1, 1]
    assert result.report.splits == {"train": 16, "valid": 4, "test": 4}
    # Deterministic: the same file splits the same way, in any order.
    again = run(list(reversed(items)), existing_user_splits={})
    assert {k.source_user_id: k.split for k in again.kept} == {k.source_user_id: k.split for k in result.kept}


def test_stored_users_keep_their_split_and_tiny_imports_stay_on_the_hash():
    items = [PromptRow(i, f"question {i}", DEMO_USERS[i % 6]) for i in range(12)]
    stored = dict.fromkeys(DEMO_USERS, "train") | {"demo-2": "test"}
    asked: list[list[str]] = []
    result = run(items, existing_user_splits=lambda users: asked.append(users) or stored)
    assert asked == [sorted(DEMO_USERS)]
    assert {k.source_user_id: k.split for k in result.kept} == stored
    # Two new groups under an 80/10/10 split: too few to hold any out, so the hash decides.
    few = run(rows("alpha question", "beta question"), existing_user_splits={})
    assert [k.split for k in few.kept] == [assign_split("alpha question"), assign_split("beta question")]
    # A split whose fraction is 0 never receives a moved user.
    none_held = run(items, config=HygieneConfig(split_fractions=(1.0, 0.0, 0.0)), existing_user_splits={})
    assert {k.split for k in none_held.kept} == {"train"}
