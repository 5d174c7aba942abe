"""Prompt hygiene from the InstructGPT paper, applied to parsed rows before a batch is stored.

After `prompt_import.parse_prompts` has validated a file, `apply_hygiene` walks the
rows once, in file order, and applies these rules in this order (each rule only
compares with prompts kept so far, so a prompt dropped by one rule never causes
another prompt to be dropped):

1. **pii**: emails, phone numbers, credit-card numbers (Luhn-checked), US SSNs and
   IP addresses are found; the batch policy drops the prompt (`drop`, default),
   replaces each match by a tag such as `[EMAIL]` (`redact`) or keeps it and records
   the kinds (`flag`). Running first means redacted texts are what later rules see,
   so two prompts that differ only in an email address are duplicates. Left alone on
   purpose, to spare arithmetic and code: numbers without separators or "+", phone
   numbers split only by spaces, loopback/unspecified IPs, IPv6 with under 3 groups.
2. **duplicate**: same text after NFKC, casefold and whitespace collapsing, within
   the import or against earlier batches (`normalized_key`).
3. **shared_prefix**: same first `prefix_chars` normalised characters as an earlier
   prompt (`prefix_key`); prompts shorter than that never match by prefix. One hash
   per prompt, so the rule is O(n), never pairwise.
4. **over_user_limit**: at most `max_per_user` prompts per source user id, the first
   ones kept, counting prompts already stored when the caller supplies the counts.
   Runs last so duplicates do not use up a user's quota.

A conversation (a row with `messages`) is checked whole: PII is looked for in every
message (user turns, and the system and assistant turns too, which an import may carry
with it) and redacted in each; its duplicate and prefix keys are over the whole
conversation with its roles, so two conversations ending with the same question are
not duplicates, while a one-message conversation keeps the key of its text alone
(it matches single-turn prompts of earlier batches); the per-user cap and the split
count it as one prompt of its source user.

Kept prompts get a train/valid/test split from a stable hash of their source user id
(of their text when there is none), so no user's prompts straddle splits, across
batches too. On its own the hash leaves a small import without held-out prompts (the
demo's six users all hash to train), so when the caller says which users are already
stored, and in which split, stored users keep theirs and the import's new groups (a new
user, or a prompt without one) are balanced: a held-out split whose share rounds to at
least one group (n × fraction ≥ ½) but got none takes the train group whose hash lies
nearest to it. The moved user is stored in that split, so later batches keep it there.
Everything is pure Python and in memory; the caller looks up the keys of earlier
batches in the database.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from app.collection.prompt_import import PromptRow
from app.conversations import Message, last_user_text, single_turn
from app.security import csv_row

PiiPolicy = Literal["drop", "redact", "flag"]
PII_POLICIES = ("drop", "redact", "flag")
PII_KINDS = ("email", "phone", "credit_card", "ssn", "ip_address")
RULES = ("pii", "duplicate", "shared_prefix", "over_user_limit")
SPLITS = ("train", "valid", "test")
REDACTION_TAGS = {kind: f"[{kind.upper()}]" for kind in PII_KINDS}


class PromptLike(Protocol):
    """Anything shaped like a parsed `PromptRow`."""

    line: int
    text: str
    source_user_id: str | None
    category: str
    metadata: dict[str, Any]


# -- keys -----------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Returns the form used to compare prompts: NFKC, casefolded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def _prefix_of(normalized: str, n: int) -> str | None:
    # The length is part of the hashed string so keys made with another prefix_chars never match.
    return _sha256(f"prefix:{n}:{normalized[:n]}") if len(normalized) >= n else None


def normalize_conversation(messages: Sequence[Message]) -> str:
    """Returns the form used to compare conversations; a lone user message is compared by its text alone."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return normalize_text(messages[0]["content"])
    return "\n".join(f"{m['role']}: {normalize_text(m['content'])}" for m in messages)


def normalized_key(text: str) -> str:
    """Returns the sha256 hex of the normalised text, stored in prompts.normalized_key."""
    return _sha256(normalize_text(text))


def prefix_key(text: str, n: int) -> str | None:
    """Returns the key of the first n normalised characters, or None when the text is shorter."""
    return _prefix_of(normalize_text(text), n)


# -- PII ------------------------------------------------------------------------------------

# Each pattern starts with a literal or a digit and checks the character before it with a
# look-behind: the regex engine then skips ahead to candidate characters instead of trying
# every position, and a match never starts inside a longer number or word.
_EMAIL = re.compile(r"(?<![\w.+%-])[\w.+%-]+@(?:[\w-]+\.)+[A-Za-z]{2,}(?![\w-])")
# US numbers need separators ("555-123-4567", "(555) 123-4567", "555.123.4567") so that
# plain numbers and arithmetic never match; international ones need a leading "+".
_PHONE_US = re.compile(r"(?<![\w+.-])(?:\+?1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[.-])\d{3}[.-]\d{4}(?![\w-]|[.,]\d)")
_PHONE_US_HINT = re.compile(r"\d{3}[.-]\d{4}")  # how every US number ends; cheap to scan for
_PHONE_INTL = re.compile(r"\+(?<![\w+)]\+)\d(?:[ .()-]{0,2}\d){7,14}(?![\w-]|[.,]\d)")
# Cards: 13-19 digits written solid or in groups (4-4-4-4, 4-6-5, 4-4-4-4-3).
_CARD = re.compile(r"\d(?<![\w.,-]\d)(?:\d{12,18}|\d{3}([ -])\d{3,6}(?:\1\d{3,6}){1,3})(?![\w-]|[.,]\d)")
_SSN = re.compile(r"\d(?<![\w-]\d)\d\d-\d\d-\d{4}(?![\w-])")
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:]|\.\d)")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
_DIGIT = re.compile(r"\d")
_DIGIT_RUN = re.compile(r"\d{3}")


@dataclass(slots=True, frozen=True)
class PiiMatch:
    """One piece of personal data found in a text, as a [start, end) span."""

    kind: str
    start: int
    end: int


def luhn_valid(number: str) -> bool:
    """Tells whether a digit string (spaces and dashes allowed) passes the Luhn checksum."""
    digits = [int(c) for c in number if c.isdigit()]
    if not digits or len(digits) != sum(1 for c in number if c not in " -"):
        return False
    total = 0
    for index, digit in enumerate(reversed(digits)):
        if index % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def _ssn_valid(ssn: str) -> bool:
    # Numbers the SSA never issues: area 000, 666 or 9xx, group 00, serial 0000.
    area, group, serial = ssn.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _ip_is_personal(candidate: str) -> bool:
    # Loopback and 0.0.0.0 are in every programming question and identify nobody.
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:  # 300.1.1.1, 12:30:45
        return False
    return not (address.is_loopback or address.is_unspecified)


def _ipv6_candidate(candidate: str) -> bool:
    # At least three non-empty groups and a digit: keeps "x[1::2]" slices, "A::B" and times out.
    if sum(1 for group in candidate.split(":") if group) < 3 or not _DIGIT.search(candidate):
        return False
    return _ip_is_personal(candidate)


def _spans(
    kind: str, pattern: re.Pattern[str], text: str, valid: Callable[[str], bool] | None = None
) -> list[PiiMatch]:
    return [PiiMatch(kind, m.start(), m.end()) for m in pattern.finditer(text) if valid is None or valid(m.group())]


def _card_valid(candidate: str) -> bool:
    digits = candidate.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def find_pii(text: str) -> list[PiiMatch]:
    """Finds emails, phone numbers, credit cards, SSNs and IP addresses; spans never overlap."""
    found: list[PiiMatch] = []
    if "@" in text:
        found += _spans("email", _EMAIL, text)
    if _DIGIT.search(text) is not None:
        if _DIGIT_RUN.search(text) is not None:  # cards, SSNs and US numbers all hold 3 digits in a row
            found += _spans("credit_card", _CARD, text, _card_valid)
            if "-" in text:
                found += _spans("ssn", _SSN, text, _ssn_valid)
            if _PHONE_US_HINT.search(text) is not None:
                found += _spans("phone", _PHONE_US, text)
        if "+" in text:
            found += _spans("phone", _PHONE_INTL, text)
        if "." in text:
            found += _spans("ip_address", _IPV4, text, _ip_is_personal)
        if _IPV6_HINT.search(text) is not None:
            found += _spans("ip_address", _IPV6, text, _ipv6_candidate)
    if len(found) < 2:
        return found
    # Leftmost, then longest, wins: "+1 (555) 123-4567" is one phone, not two.
    found.sort(key=lambda m: (m.start, -m.end))
    kept = [found[0]]
    for match in found[1:]:
        if match.start >= kept[-1].end:
            kept.append(match)
    return kept


def redact_pii(text: str, matches: Sequence[PiiMatch] | None = None) -> str:
    """Replaces each match with its tag, e.g. "[EMAIL]"."""
    if matches is None:
        matches = find_pii(text)
    pieces, position = [], 0
    for match in matches:
        pieces += [text[position : match.start], REDACTION_TAGS[match.kind]]
        position = match.end
    pieces.append(text[position:])
    return "".join(pieces)


# -- split ----------------------------------------------------------------------------------


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")


def _split_point(key: str) -> float:
    """A stable number in [0, 1) for a source user id (or a text)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2**64


def assign_split(key: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """Maps a source user id (or a text) to "train", "valid" or "test" by a stable sha256 hash."""
    _check_fractions(fractions)
    point = _split_point(key)
    train, valid, _ = fractions
    if point < train:
        return "train"
    return "valid" if point < train + valid else "test"


# -- the rules ------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class HygieneConfig:
    """Per-batch hygiene settings; None disables the prefix rule or the per-user cap."""

    prefix_chars: int | None = 100
    max_per_user: int | None = 200
    pii_policy: PiiPolicy = "drop"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def __post_init__(self) -> None:
        if self.prefix_chars is not None and self.prefix_chars < 1:
            raise ValueError("prefix_chars must be at least 1 (or None to disable the rule)")
        if self.max_per_user is not None and self.max_per_user < 1:
            raise ValueError("max_per_user must be at least 1 (or None for no limit)")
        if self.pii_policy not in PII_POLICIES:
            raise ValueError(f"pii_policy must be one of {', '.join(PII_POLICIES)}")
        _check_fractions(self.split_fractions)


@dataclass(slots=True)
class KeptPrompt:
    """A prompt that passed hygiene, ready to insert; `text` is redacted under the redact policy."""

    line: int
    text: str
    source_user_id: str | None
    category: str
    metadata: dict[str, Any]
    split: str
    normalized_key: str
    prefix_key: str | None
    pii_flags: list[str] = field(default_factory=list)
    pii_redacted: bool = False
    # The conversation (redacted like `text`); `text` is its last user message.
    messages: list[Message] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class DroppedPrompt:
    """A prompt left out of the batch, with the rule that dropped it and why."""

    line: int
    rule: str
    detail: str


@dataclass(slots=True)
class HygieneReport:
    """Counts per rule and the dropped lines; received = kept + every drop count."""

    received: int = 0
    kept: int = 0
    pii_dropped: int = 0
    pii_redacted: int = 0
    pii_flagged: int = 0
    duplicates: int = 0
    duplicates_of_earlier_batches: int = 0
    shared_prefix: int = 0
    shared_prefix_with_earlier_batches: int = 0
    over_user_limit: int = 0
    splits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    pii_kinds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PII_KINDS, 0))
    config: dict[str, Any] = field(default_factory=dict)
    dropped: list[DroppedPrompt] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as a JSON-serialisable dict."""
        # Built by hand: dataclasses.asdict deep-copies, which is slow on 100,000 dropped lines.
        counts = {name: getattr(self, name) for name in _REPORT_COUNTS}
        return counts | {
            "splits": dict(self.splits),
            "pii_kinds": dict(self.pii_kinds),
            "config": dict(self.config),
            "dropped": [{"line": d.line, "rule": d.rule, "detail": d.detail} for d in self.dropped],
        }


_REPORT_COUNTS = (
    "received",
    "kept",
    "pii_dropped",
    "pii_redacted",
    "pii_flagged",
    "duplicates",
    "duplicates_of_earlier_batches",
    "shared_prefix",
    "shared_prefix_with_earlier_batches",
    "over_user_limit",
)


@dataclass(slots=True)
class HygieneResult:
    """The prompts to store and the report of what happened to the others."""

    kept: list[KeptPrompt]
    report: HygieneReport

    @property
    def dropped(self) -> list[DroppedPrompt]:
        """The dropped lines, in file order."""
        return self.report.dropped


KeyLookup = Callable[[list[str]], set[str]] | set[str] | frozenset[str]
UserCountLookup = Callable[[list[str]], Mapping[str, int]] | Mapping[str, int]
UserSplitLookup = Callable[[list[str]], Mapping[str, str]] | Mapping[str, str]


def _hold_out(groups: dict[tuple[bool, str], str], fractions: Sequence[float]) -> None:
    """Moves new train groups into held-out splits an import would otherwise leave empty (see the module doc)."""
    for held_out, fraction in (("valid", fractions[1]), ("test", fractions[2])):
        if fraction <= 0 or len(groups) * fraction < 0.5 or held_out in groups.values():
            continue
        train = [group for group, split in groups.items() if split == "train"]
        if len(train) < 2:  # train keeps at least one group
            return
        groups[max(train, key=lambda group: _split_point(group[1]))] = held_out


def apply_hygiene(
    rows: Iterable[PromptRow | PromptLike],
    *,
    existing_keys: KeyLookup,
    config: HygieneConfig,
    existing_user_counts: UserCountLookup | None = None,
    existing_user_splits: UserSplitLookup | None = None,
) -> HygieneResult:
    """Applies pii, duplicate, shared-prefix and per-user rules in that order, then assigns splits.

    `existing_keys` is the set of keys already stored, or a function called once with
    every normalized_key and prefix_key of this import that returns those found in
    either column. `existing_user_counts` gives how many prompts each source user id
    already has (a mapping, or a function called once with this import's user ids).
    `existing_user_splits` gives the split of each source user id already stored (the
    same way); with it, stored users keep their split and a small import's new users are
    balanced so the held-out splits get prompts. Without it the hash alone decides.
    """
    rows = list(rows)
    report = HygieneReport(received=len(rows), config=asdict(config))
    policy, n, cap = config.pii_policy, config.prefix_chars, config.max_per_user

    # Pass 1: PII and keys, so earlier batches can be looked up in one round trip.
    candidates: list[tuple[PromptLike, str, str, str | None, list[str], list[Message]]] = []
    for row in rows:
        text = row.text
        messages: list[Message] = getattr(row, "messages", None) or single_turn(text)
        kinds: list[str] = []
        found = [find_pii(m["content"]) for m in messages]
        if any(found):
            kinds = sorted({m.kind for matches in found for m in matches})
            for kind in kinds:
                report.pii_kinds[kind] += 1
            if policy == "drop":
                report.pii_dropped += 1
                report.dropped.append(DroppedPrompt(row.line, "pii", "contains " + ", ".join(kinds)))
                continue
            if policy == "redact":
                messages = [
                    {"role": m["role"], "content": redact_pii(m["content"], matches) if matches else m["content"]}
                    for m, matches in zip(messages, found, strict=True)
                ]
                text = last_user_text(messages)
        normalized = normalize_conversation(messages)
        key = _sha256(normalized)
        pkey = _prefix_of(normalized, n) if n is not None else None
        candidates.append((row, text, key, pkey, kinds, messages))

    if isinstance(existing_keys, (set, frozenset)):
        earlier: set[str] | frozenset[str] = existing_keys
    else:
        wanted = {c[2] for c in candidates} | {c[3] for c in candidates if c[3] is not None}
        earlier = existing_keys(sorted(wanted)) if wanted else set()
    user_counts: dict[str, int] = {}
    if cap is not None and existing_user_counts is not None:
        if isinstance(existing_user_counts, Mapping):
            user_counts = {u: int(c) for u, c in existing_user_counts.items()}
        else:
            users = sorted({c[0].source_user_id for c in candidates if c[0].source_user_id is not None})
            user_counts = {u: int(c) for u, c in existing_user_counts(users).items()} if users else {}

    stored_splits: dict[str, str] = {}
    if existing_user_splits is not None:
        if isinstance(existing_user_splits, Mapping):
            stored_splits = dict(existing_user_splits)
        else:
            users = sorted({c[0].source_user_id for c in candidates if c[0].source_user_id is not None})
            stored_splits = dict(existing_user_splits(users)) if users else {}

    # Pass 2: the order-dependent rules; only kept prompts are remembered.
    first_line_of_key: dict[str, int] = {}
    first_line_of_prefix: dict[str, int] = {}
    kept: list[KeptPrompt] = []
    fractions = config.split_fractions
    # The import's new groups, (has a user, user id or text) -> split; stored users are not among them.
    new_groups: dict[tuple[bool, str], str] = {}
    for row, text, key, pkey, kinds, messages in candidates:
        line, user = row.line, row.source_user_id
        if key in first_line_of_key:
            report.duplicates += 1
            report.dropped.append(DroppedPrompt(line, "duplicate", f"same text as line {first_line_of_key[key]}"))
            continue
        if key in earlier:
            report.duplicates += 1
            report.duplicates_of_earlier_batches += 1
            report.dropped.append(DroppedPrompt(line, "duplicate", "same text as a prompt in an earlier batch"))
            continue
        if pkey is not None:
            if pkey in first_line_of_prefix:
                report.shared_prefix += 1
                detail = f"same first {n} characters as line {first_line_of_prefix[pkey]}"
                report.dropped.append(DroppedPrompt(line, "shared_prefix", detail))
                continue
            if pkey in earlier:
                report.shared_prefix += 1
                report.shared_prefix_with_earlier_batches += 1
                detail = f"same first {n} characters as a prompt in an earlier batch"
                report.dropped.append(DroppedPrompt(line, "shared_prefix", detail))
                continue
        if cap is not None and user is not None:
            count = user_counts.get(user, 0)
            if count >= cap:
                report.over_user_limit += 1
                detail = f"user {user!r} has reached the limit of {cap} prompts per user"
                report.dropped.append(DroppedPrompt(line, "over_user_limit", detail))
                continue
            user_counts[user] = count + 1

        first_line_of_key[key] = line
        if pkey is not None:
            first_line_of_prefix[pkey] = line
        if user is not None and user in stored_splits:
            split = stored_splits[user]
        else:
            group = (user is not None, user if user is not None else text)
            split = new_groups.setdefault(group, assign_split(group[1], fractions))
        redacted = bool(kinds) and policy == "redact"
        report.pii_redacted += redacted
        report.pii_flagged += bool(kinds) and policy == "flag"
        kept.append(
            KeptPrompt(line, text, user, row.category, row.metadata, split, key, pkey, kinds, redacted, messages)
        )

    if existing_user_splits is not None:
        _hold_out(new_groups, fractions)
        for prompt in kept:
            if prompt.source_user_id is None or prompt.source_user_id not in stored_splits:
                user = prompt.source_user_id
                prompt.split = new_groups[(user is not None, user if user is not None else prompt.text)]
    for prompt in kept:
        report.splits[prompt.split] += 1
    report.kept = len(kept)
    report.dropped.sort(key=lambda d: d.line)
    return HygieneResult(kept, report)


def dropped_csv(result: HygieneResult) -> str:
    """Returns the dropped lines as CSV (line, rule, detail) for the admin to download."""
    # The detail quotes the prompt, which whoever wrote the file chose: csv_row keeps any cell from starting a formula.
    return csv_row(["line", "rule", "detail"]) + "".join(
        csv_row((d.line, d.rule, d.detail)) for d in result.report.dropped
    )
