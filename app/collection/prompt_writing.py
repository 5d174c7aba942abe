"""Prompt writing: labelers add prompts of their own to batches that allow it, as InstructGPT's labelers did.

The paper's labelers wrote three kinds of prompt to fill thin categories, and
so can ours when an admin sets `allow_prompt_writing` on a batch:

- **plain**: any task, written as the model should see it.
- **few-shot**: an instruction and several query/response examples, entered as
  separate fields and assembled into one prompt text by `assemble_few_shot`
  (format below), ending with an optional last query for the model to answer.
- **user-based**: a stated use case (as an API waitlist applicant would
  describe it) and a prompt for it; the prompt text is what the model sees, the
  use case is kept in the prompt's metadata.

A written prompt goes through the batch's own hygiene rules
(`app.collection.hygiene`: PII policy, duplicates of any stored prompt, the
shared-prefix rule and the per-user cap, with the labeler as source user
`labeler:<id>`), using the prefix length and cap its last import used.
A kept prompt is stored with `author_id` and `category` and joins the batch:

- a batch in **draft** simply holds it; starting the batch samples it with the rest;
- a batch in **sampling** or **labeling** that wants rankings gets a follow-up
  `sample` run (`app.runs.start_run`) unless one is already queued for
  it (a queued run reads the prompts needing samples when it starts, so it
  covers this one); that run samples only prompts lacking K outputs and then
  creates their tasks (`open_for_labeling` is idempotent);
- a batch in **labeling** that wants demonstrations gets the prompt's
  demonstration task at once.

Paused, completed and archived batches take no written prompts (409).

Few-shot format (blank line between blocks; fields are stripped of surrounding
blank lines, their inner whitespace kept)::

    <instruction>

    Query: <query 1>
    Response: <response 1>

    Query: <query 2>
    Response: <response 2>

    Query: <final query>
    Response:

The last block appears only when a final query is given; the model's
completion is then the response to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import func, or_, select, text
from sqlalchemy.orm import Session

from app.collection.batches import existing_user_splits, labels_needed
from app.collection.hygiene import HygieneConfig, PiiPolicy, apply_hygiene
from app.collection.prompt_import import PromptRow
from app.config import get_settings
from app.errors import FieldError
from app.models import PROMPT_CATEGORIES, Prompt, PromptBatch, Task, TrainingRun, User, utcnow
from app.runs import start_run

WRITABLE_STATUSES = ("draft", "sampling", "labeling")
MIN_EXAMPLES = 2
MAX_EXAMPLES = 10
MAX_USE_CASE_CHARS = 2000
FEW_SHOT_QUERY = "Query: "
FEW_SHOT_RESPONSE = "Response:"

_DROP_MESSAGES = {
    "duplicate": "dropped: duplicate of an existing prompt",
    "shared_prefix": "dropped: it starts with the same {n} characters as an existing prompt",
    "over_user_limit": "dropped: you have reached this batch's limit of {cap} prompts per person",
    "pii": "dropped: it contains personal data ({detail}), which this batch does not accept",
}


class PromptWritingError(FieldError):
    """A problem with a written prompt; `field` names the form field, `status` the HTTP code."""


@dataclass
class FewShotExample:
    """One query/response pair of a few-shot prompt."""

    query: str
    response: str


@dataclass
class PromptDraft:
    """What a labeler wrote; which fields count depends on `category`."""

    category: str = "plain"
    text: str = ""
    instruction: str = ""
    examples: list[FewShotExample] = field(default_factory=list)
    final_query: str = ""
    use_case: str = ""


@dataclass
class WritingOutcome:
    """What happened to a written prompt: kept (and stored) or dropped by a hygiene rule, and why."""

    kept: bool
    message: str
    batch: PromptBatch
    text: str
    category: str
    prompt: Prompt | None = None
    rule: str | None = None
    pii_flags: list[str] = field(default_factory=list)
    next_step: str = ""
    sample_run_id: int | None = None


def writable_batches(db: Session) -> list[PromptBatch]:
    """Returns the batches labelers may write prompts for, highest priority first."""
    return list(
        db.scalars(
            select(PromptBatch)
            .where(PromptBatch.allow_prompt_writing.is_(True), PromptBatch.status.in_(WRITABLE_STATUSES))
            .order_by(PromptBatch.priority.desc(), PromptBatch.id)
        )
    )


def any_writable_batch(db: Session) -> bool:
    """Tells whether any batch currently takes written prompts (for the labeler home's link)."""
    return (
        db.scalar(
            select(PromptBatch.id)
            .where(PromptBatch.allow_prompt_writing.is_(True), PromptBatch.status.in_(WRITABLE_STATUSES))
            .limit(1)
        )
        is not None
    )


def _clean(value: str | None) -> str:
    # Surrounding blank lines go, inner whitespace stays (indentation can matter in a prompt).
    return (value or "").strip("\r\n").rstrip()


def _require(field_name: str, value: str, message: str) -> str:
    if not value.strip():
        raise PromptWritingError(field_name, message)
    if "\x00" in value:
        raise PromptWritingError(field_name, "contains a NUL character, which cannot be stored")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptWritingError(field_name, "contains an invalid character (a lone surrogate)") from exc
    return value


def assemble_few_shot(instruction: str, examples: list[FewShotExample], final_query: str = "") -> str:
    """Builds a few-shot prompt text from its parts, in the format in this module's docstring."""
    blocks = [_clean(instruction)]
    blocks += [f"{FEW_SHOT_QUERY}{_clean(e.query)}\n{FEW_SHOT_RESPONSE} {_clean(e.response)}" for e in examples]
    if _clean(final_query):
        blocks.append(f"{FEW_SHOT_QUERY}{_clean(final_query)}\n{FEW_SHOT_RESPONSE}")
    return "\n\n".join(blocks)


def compose(draft: PromptDraft) -> tuple[str, dict[str, Any]]:
    """Validates a draft and returns the prompt text and the metadata to store; errors name the field."""
    if draft.category not in PROMPT_CATEGORIES:
        raise PromptWritingError("category", "choose plain, few-shot or user-based")
    metadata: dict[str, Any] = {"written": True}
    if draft.category == "plain":
        prompt = _require("text", _clean(draft.text), "write the prompt")
    elif draft.category == "user-based":
        use_case = _require("use_case", _clean(draft.use_case), "say which use case this prompt is for")
        if len(use_case) > MAX_USE_CASE_CHARS:
            raise PromptWritingError("use_case", f"is longer than {MAX_USE_CASE_CHARS} characters")
        prompt = _require("text", _clean(draft.text), "write the prompt for this use case")
        metadata["use_case"] = use_case
    else:
        instruction = _require("instruction", _clean(draft.instruction), "write the instruction")
        # Rows left entirely empty in the form are not examples; half-filled ones are mistakes, named by
        # their row as the labeler sees it.
        examples = []
        for i, example in enumerate(draft.examples):
            if not (_clean(example.query).strip() or _clean(example.response).strip()):
                continue
            _require(f"examples[{i}].query", _clean(example.query), "write the query of this example")
            _require(f"examples[{i}].response", _clean(example.response), "write the response to this query")
            examples.append(example)
        if len(examples) < MIN_EXAMPLES:
            raise PromptWritingError("examples", f"give at least {MIN_EXAMPLES} query/response examples")
        if len(examples) > MAX_EXAMPLES:
            raise PromptWritingError("examples", f"give at most {MAX_EXAMPLES} examples")
        final_query = _clean(draft.final_query)
        if final_query:
            _require("final_query", final_query, "write the last query or leave it empty")
        prompt = assemble_few_shot(instruction, examples, final_query)
        metadata["few_shot"] = {
            "instruction": instruction,
            "examples": [{"query": _clean(e.query), "response": _clean(e.response)} for e in examples],
            "final_query": final_query,
        }
    limit = get_settings().max_prompt_chars
    if len(prompt) > limit:
        where = "text" if draft.category != "few-shot" else "examples"
        raise PromptWritingError(where, f"the prompt has {len(prompt)} characters; the maximum is {limit}")
    return prompt, metadata


def _batch_for_writing(db: Session, batch_id: int) -> PromptBatch:
    # Shared lock: the batch cannot change status (e.g. start sampling) while this prompt joins it.
    batch = db.scalar(select(PromptBatch).where(PromptBatch.id == batch_id).with_for_update(read=True))
    if batch is None or not batch.allow_prompt_writing:
        raise PromptWritingError("batch_id", "choose a batch that accepts written prompts", status=422)
    if batch.status not in WRITABLE_STATUSES:
        raise PromptWritingError(
            "batch_id", f"batch '{batch.name}' is {batch.status} and takes no new prompts", status=409
        )
    return batch


def _hygiene_config(batch: PromptBatch) -> HygieneConfig:
    # The rules of the batch's last import (its report records them); the defaults when it had none.
    used = (batch.hygiene_report or {}).get("config") or {}
    default = HygieneConfig()
    return HygieneConfig(
        prefix_chars=used.get("prefix_chars", default.prefix_chars),
        max_per_user=used.get("max_per_user", default.max_per_user),
        pii_policy=cast(PiiPolicy, batch.pii_policy),  # the column's CHECK constraint holds it to PII_POLICIES
        split_fractions=tuple(used.get("split_fractions", default.split_fractions)),
    )


def _serialise_writers(db: Session, keys: list[str]) -> None:
    # Two labelers writing the same text (or one double-submitting past the cap) must not both pass the
    # check-then-insert; PostgreSQL transaction-scoped advisory locks on the keys order them. Sorted, so
    # two writers never wait on each other in a cycle. SQLite runs one writer at a time already.
    if db.get_bind().dialect.name != "postgresql":
        return
    for key in sorted(set(keys)):
        db.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 7))"), {"key": key})


def source_user_id(author: User) -> str:
    """Returns the source user id a labeler's written prompts carry (for the per-user cap and the split)."""
    return f"labeler:{author.id}"


def write_prompt(db: Session, author: User, batch_id: int, draft: PromptDraft) -> WritingOutcome:
    """Checks a written prompt against the batch's hygiene rules and stores it in the batch if it passes."""
    prompt_text, metadata = compose(draft)
    batch = _batch_for_writing(db, batch_id)
    config = _hygiene_config(batch)
    user = source_user_id(author)
    row = PromptRow(line=1, text=prompt_text, source_user_id=user, category=draft.category, metadata=metadata)

    def existing_keys(keys: list[str]) -> set[str]:
        _serialise_writers(db, [*keys, user])
        found = db.execute(
            select(Prompt.normalized_key, Prompt.prefix_key).where(
                or_(Prompt.normalized_key.in_(keys), Prompt.prefix_key.in_(keys))
            )
        ).all()
        return {key for pair in found for key in pair if key in keys}

    def user_counts(users: list[str]) -> dict[str, int]:
        # count() always yields one row; `or 0` only tells the type checker so
        return {u: db.scalar(select(func.count()).where(Prompt.source_user_id == u)) or 0 for u in users}

    result = apply_hygiene(
        [row],
        existing_keys=existing_keys,
        existing_user_counts=user_counts,
        existing_user_splits=lambda users: existing_user_splits(db, users),
        config=config,
    )
    if not result.kept:
        dropped = result.dropped[0]
        message = _DROP_MESSAGES[dropped.rule].format(
            n=config.prefix_chars, cap=config.max_per_user, detail=dropped.detail.removeprefix("contains ")
        )
        return WritingOutcome(
            kept=False, message=message, batch=batch, text=prompt_text, category=draft.category, rule=dropped.rule
        )
    kept = result.kept[0]
    prompt = Prompt(
        batch_id=batch.id,
        text=kept.text,
        source_user_id=user,
        category=draft.category,
        split=kept.split,
        normalized_key=kept.normalized_key,
        prefix_key=kept.prefix_key,
        extra=kept.metadata,
        pii_flags=kept.pii_flags,
        author_id=author.id,
        created_at=utcnow(),
    )
    db.add(prompt)
    db.flush()
    outcome = WritingOutcome(
        kept=True,
        message="kept",
        batch=batch,
        text=kept.text,
        category=draft.category,
        prompt=prompt,
        pii_flags=list(kept.pii_flags),
    )
    if kept.pii_redacted:
        outcome.message = "kept, with personal data replaced by tags such as [EMAIL]"
    elif kept.pii_flags:
        outcome.message = "kept, flagged for personal data (" + ", ".join(kept.pii_flags) + ")"
    _join_batch(db, batch, prompt, outcome)
    return outcome


def _join_batch(db: Session, batch: PromptBatch, prompt: Prompt, outcome: WritingOutcome) -> None:
    """Puts a stored prompt on the batch's way to labeling, as the module docstring describes."""
    if batch.status == "draft":
        outcome.next_step = "It joins the batch's labeling tasks when the batch starts, like its other prompts."
        return
    steps = []
    if batch.wants_demonstrations and batch.status == "labeling":
        db.add(
            Task(
                batch_id=batch.id,
                prompt_id=prompt.id,
                kind="demonstration",
                needed=labels_needed(batch, prompt.id),
                priority=batch.priority,
            )
        )
        db.flush()
        steps.append("It is open for demonstrations now.")
    if batch.wants_rankings:
        queued = db.scalar(
            select(TrainingRun.id)
            .where(TrainingRun.kind == "sample", TrainingRun.batch_id == batch.id, TrainingRun.status == "queued")
            .limit(1)
        )
        if queued is None:
            queued = start_run(db, "sample", batch_id=batch.id, triggered_by="prompt-writing").id
        outcome.sample_run_id = queued
        steps.append(f"Its {batch.k} outputs will be sampled by run {queued}; then it is open for ranking.")
    outcome.next_step = " ".join(steps)
