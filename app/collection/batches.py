"""Prompt batches: create and edit them, import their prompts with hygiene, move them through their lifecycle.

A batch is `draft` while an admin edits it and replaces its prompts; `start`
sends it to `sampling` (the worker samples K outputs per prompt) and then to
`labeling`; it ends `completed` and finally `archived` (read-only, still
exported). Imports are all-or-nothing: a file with any bad line stores
nothing and reports every error by line and field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import bindparam, delete, func, insert, or_, select
from sqlalchemy.orm import Session

from app import events
from app.collection.hygiene import HygieneConfig, HygieneResult, PiiPolicy, apply_hygiene, dropped_csv
from app.collection.prompt_import import ImportFormat, ParseResult, parse_prompts
from app.config import get_settings
from app.db import get_existing, rowcount
from app.errors import FieldError
from app.models import Completion, ModelVersion, Prompt, PromptBatch, Task, TaskItem, utcnow
from app.runs import start_run
from app.vocabulary import USABLE_STATUSES

TRANSITIONS: dict[str, set[str]] = {
    "draft": {"sampling", "archived"},
    "sampling": {"labeling", "paused"},
    "labeling": {"completed", "paused"},
    "paused": {"sampling", "labeling"},
    "completed": {"archived", "labeling"},
    "archived": set(),
}
EDITABLE_FIELDS = {
    "name",
    "guidelines",
    "wants_demonstrations",
    "wants_rankings",
    "allow_prompt_writing",
    "k",
    "overlap",
    "extra_overlap_fraction",
    "extra_overlap",
    "temperature",
    "top_p",
    "max_new_tokens",
    "policy_version_id",
    "priority",
    "pii_policy",
    "gold_share",
}
# Fields that change what is sampled or labeled; only a draft may change them.
DRAFT_ONLY_FIELDS = EDITABLE_FIELDS - {"name", "guidelines", "priority", "gold_share"}


class BatchError(FieldError):
    """A user-caused batch problem; `field` names what is wrong."""


@dataclass
class ImportOutcome:
    """What an import did: the parse errors (then nothing was stored) or the hygiene report."""

    parse: ParseResult
    hygiene: HygieneResult | None = None
    stored: int = 0
    errors: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.parse.ok


def create_batch(db: Session, *, created_by_id: int | None = None, **fields: Any) -> PromptBatch:
    """Creates a draft batch."""
    if not fields.get("name"):
        raise BatchError("name", "is required")
    _check_unique_name(db, fields["name"])
    unknown = set(fields) - EDITABLE_FIELDS
    if unknown:
        raise BatchError(sorted(unknown)[0], "is not a batch field")
    batch = PromptBatch(created_by_id=created_by_id, **fields)
    _validate(db, batch)
    db.add(batch)
    db.flush()
    return batch


def update_batch(db: Session, batch: PromptBatch, **fields: Any) -> PromptBatch:
    """Edits a batch; settings that change sampling or labeling only while it is a draft."""
    if batch.status == "archived":
        raise BatchError("status", "an archived batch is read-only", status=409)
    for name, value in fields.items():
        if name not in EDITABLE_FIELDS:
            raise BatchError(name, "is not a batch field")
        if name in DRAFT_ONLY_FIELDS and batch.status != "draft" and getattr(batch, name) != value:
            raise BatchError(name, f"can only change while the batch is a draft (it is {batch.status})", status=409)
        if name == "name" and value != batch.name:
            _check_unique_name(db, value)
    # Validated before anything is flushed: a lookup in _validate would otherwise autoflush a bad
    # policy_version_id into a foreign-key error (a 500) instead of the BatchError naming it.
    with db.no_autoflush:
        for name, value in fields.items():
            setattr(batch, name, value)
        _validate(db, batch)
    return batch


def _check_unique_name(db: Session, name: str) -> None:
    if db.scalar(select(PromptBatch.id).where(PromptBatch.name == name)) is not None:
        raise BatchError("name", f"a batch called '{name}' already exists", status=409)


def _validate(db: Session, batch: PromptBatch) -> None:
    # Mirrors the table's CHECK constraints so users get a message naming the field, not a 500.
    if not (4 <= (batch.k or 4) <= 9):
        raise BatchError("k", "must be between 4 and 9")
    if (batch.overlap or 1) < 1:
        raise BatchError("overlap", "must be at least 1")
    if batch.gold_share is not None and not (0 <= batch.gold_share <= 1):
        raise BatchError("gold_share", "must be between 0 and 1 (the share of ranking leases that are gold checks)")
    if not (0 <= (batch.extra_overlap_fraction or 0) <= 1):
        raise BatchError("extra_overlap_fraction", "must be between 0 and 1")
    if batch.wants_demonstrations is False and batch.wants_rankings is False:
        raise BatchError("wants_rankings", "a batch needs demonstrations, rankings or both")
    if batch.temperature is not None and batch.temperature < 0:
        raise BatchError("temperature", "must be 0 or more")
    if batch.top_p is not None and not (0 < batch.top_p <= 1):
        raise BatchError("top_p", "must be in (0, 1]")
    if batch.max_new_tokens is not None and not (1 <= batch.max_new_tokens <= 4096):
        raise BatchError("max_new_tokens", "must be between 1 and 4096")
    if batch.pii_policy is not None and batch.pii_policy not in ("drop", "redact", "flag"):
        raise BatchError("pii_policy", "must be drop, redact or flag")
    if batch.policy_version_id is not None:
        sampling_policy(db, batch.policy_version_id)  # a BatchError naming policy_version_id, 422


def sampling_policy(db: Session, requested_id: int | None = None) -> ModelVersion | None:
    """Returns the model that should sample a batch: the requested one, else the best promoted one.

    The batch's own choice wins; else the promoted policy, else the newest usable SFT or base model, so a
    fresh install can sample from its base model.
    """
    if requested_id is not None:
        version = db.get(ModelVersion, requested_id)
        if version is None or version.status not in USABLE_STATUSES or version.kind == "rm":
            raise BatchError("policy_version_id", f"{requested_id} is not a usable policy, SFT or base model")
        return version
    for kind in ("policy", "sft", "base"):
        version = db.scalar(
            select(ModelVersion)
            .where(ModelVersion.kind == kind, ModelVersion.status.in_(USABLE_STATUSES))
            .order_by((ModelVersion.status == "promoted").desc(), ModelVersion.id.desc())
            .limit(1)
        )
        if version is not None:
            return version
    return None


def transition(db: Session, batch: PromptBatch, target: str) -> PromptBatch:
    """Moves a batch to another status, refusing moves the lifecycle does not allow."""
    if target not in TRANSITIONS.get(batch.status, set()):
        allowed = ", ".join(sorted(TRANSITIONS.get(batch.status, ()))) or "none"
        raise BatchError("status", f"cannot go from {batch.status} to {target} (allowed: {allowed})", status=409)
    resumes_sampling = batch.status == "paused" and target == "sampling"
    batch.status = target
    batch.updated_at = utcnow()
    if target == "completed":
        events.emit(db, "batch.completed", {"batch_id": batch.id, "name": batch.name})
    if resumes_sampling:
        # Sampling resumes where it stopped: the run only samples prompts still short of K outputs.
        start_run(db, "sample", batch_id=batch.id, triggered_by="batch-resume")
    return batch


# Built once (they run on the labeling hot path): see `complete_if_done`.
_LOCKED_STATUS = select(PromptBatch.status).where(PromptBatch.id == bindparam("batch_id")).with_for_update()
# In lease order, so that PostgreSQL walks the lease queue's partial index (open tasks only), whose first entries
# are normally the batch being labeled. Without the ORDER BY it picks a sequential scan that reads every closed
# task before the first open one: 13 ms with 100,000 closed tasks, on every submit that closes a task, while
# holding the batch's row lock (bench/labeling.py with its 100,000 existing rankings: ~40 submissions/s).
_OPEN_TASK = (
    select(Task.id)
    .where(Task.batch_id == bindparam("batch_id"), Task.is_open)
    .order_by(Task.priority.desc(), Task.id)
    .limit(1)
)


def complete_if_done(db: Session, batch_id: int) -> bool:
    """Completes a labeling batch once none of its tasks needs labels; returns whether it did.

    The batch row is locked first, so that of two submits closing the last two tasks at once the second
    sees the first's commit. It runs after every submit that closes a task, and its usual answer is "not
    yet": the lock reads only the status, and the whole row is loaded only when the batch completes.
    """
    status = db.scalar(_LOCKED_STATUS, {"batch_id": batch_id})
    if status != "labeling":
        return False
    if db.scalar(_OPEN_TASK, {"batch_id": batch_id}) is not None:
        return False
    batch = get_existing(db, PromptBatch, batch_id, populate_existing=True)  # its row was locked just above
    transition(db, batch, "completed")
    return True


def start_batch(db: Session, batch: PromptBatch) -> PromptBatch:
    """Starts a draft batch: sampling when it needs rankings, else straight to labeling."""
    n_prompts = db.scalar(select(func.count()).where(Prompt.batch_id == batch.id))
    if not n_prompts:
        raise BatchError("prompts", "import prompts before starting the batch", status=409)
    if batch.wants_rankings:
        policy = sampling_policy(db, batch.policy_version_id)
        if policy is None:
            raise BatchError("policy_version_id", "no model to sample from; register a base model first", status=409)
        # Pinned at start: prompts added later (written by labelers, or after a pause) are sampled from the
        # same model as the rest of the batch, even if another policy is promoted meanwhile.
        batch.policy_version_id = policy.id
        transition(db, batch, "sampling")
        start_run(db, "sample", batch_id=batch.id, triggered_by="batch-start")
    else:
        transition(db, batch, "sampling")
        create_tasks(db, batch)
        transition(db, batch, "labeling")
    return batch


def import_prompts(
    db: Session,
    batch: PromptBatch,
    data: bytes,
    fmt: ImportFormat,
    *,
    prefix_chars: int | None = 100,
    max_per_user: int | None = 200,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> ImportOutcome:
    """Validates a whole file, applies hygiene and stores the kept prompts; stores nothing on any error."""
    if batch.status != "draft":
        raise BatchError("status", f"prompts can only be imported into a draft batch (it is {batch.status})", 409)
    parsed = parse_prompts(data, fmt, max_text_chars=get_settings().max_prompt_chars)
    outcome = ImportOutcome(parse=parsed)
    if not parsed.ok:
        outcome.errors = parsed.error_summary(100)
        return outcome
    # The column's CHECK constraint holds pii_policy to PII_POLICIES (and HygieneConfig checks it again).
    config = HygieneConfig(
        prefix_chars=prefix_chars,
        max_per_user=max_per_user,
        pii_policy=cast(PiiPolicy, batch.pii_policy),
        split_fractions=split_fractions,
    )
    result = apply_hygiene(
        parsed.rows,
        existing_keys=lambda keys: _existing_keys(db, batch.id, keys),
        existing_user_counts=lambda users: _existing_user_counts(db, batch.id, users),
        existing_user_splits=lambda users: existing_user_splits(db, users),
        config=config,
    )
    _insert_prompts(db, batch.id, result.kept)
    report = result.report.to_dict()
    report["dropped"] = report["dropped"][:1000]  # a preview; the full list is in the downloadable CSV
    _write_dropped_csv(batch.id, dropped_csv(result))
    batch.hygiene_report = report
    outcome.hygiene = result
    outcome.stored = len(result.kept)
    return outcome


PROMPT_COLUMNS = (
    "batch_id",
    "text",
    "messages",
    "source_user_id",
    "category",
    "split",
    "normalized_key",
    "prefix_key",
    "metadata",
    "pii_flags",
    "source_line",
    "created_at",
)


def _insert_prompts(db: Session, batch_id: int, kept: list) -> None:
    """Stores the kept prompts: COPY on PostgreSQL (several times faster than INSERT), else executemany."""
    now = utcnow()
    if db.get_bind().dialect.name == "postgresql":
        dbapi_connection = db.connection().connection.dbapi_connection
        if dbapi_connection is None:  # only once the pooled connection was invalidated
            raise RuntimeError("the database connection was invalidated")
        cursor = dbapi_connection.cursor()
        with cursor.copy(f"COPY prompts ({', '.join(PROMPT_COLUMNS)}) FROM STDIN") as copy:
            for p in kept:
                copy.write_row(
                    (
                        batch_id,
                        p.text,
                        json.dumps(p.messages),
                        p.source_user_id,
                        p.category,
                        p.split,
                        p.normalized_key,
                        p.prefix_key,
                        json.dumps(p.metadata),
                        json.dumps(p.pii_flags),
                        p.line,
                        now,
                    )
                )
        return
    rows = [
        {
            "batch_id": batch_id,
            "text": p.text,
            "messages": p.messages,
            "source_user_id": p.source_user_id,
            "category": p.category,
            "split": p.split,
            "normalized_key": p.normalized_key,
            "prefix_key": p.prefix_key,
            "extra": p.metadata,
            "pii_flags": p.pii_flags,
            "source_line": p.line,
            "created_at": now,
        }
        for p in kept
    ]
    for start in range(0, len(rows), 5000):
        db.execute(insert(Prompt), rows[start : start + 5000])


def dropped_csv_path(batch_id: int) -> Path:
    """Where the full list of lines the last import dropped is kept (a preview lives in the report)."""
    return get_settings().data_dir.resolve() / "imports" / f"batch-{batch_id}-dropped.csv"


def _write_dropped_csv(batch_id: int, text: str) -> None:
    path = dropped_csv_path(batch_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _existing_keys(db: Session, batch_id: int, keys: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(keys), 5000):
        chunk = keys[start : start + 5000]
        # Text keys and prefix keys never collide (different hash inputs), so one query serves both.
        found.update(
            db.scalars(
                select(Prompt.normalized_key)
                .where(Prompt.normalized_key.in_(chunk))
                .union(select(Prompt.prefix_key).where(Prompt.prefix_key.in_(chunk)))
            )
        )
    return found


def _existing_user_counts(db: Session, batch_id: int, users: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for start in range(0, len(users), 5000):
        chunk = users[start : start + 5000]
        rows = db.execute(
            select(Prompt.source_user_id, func.count())
            .where(Prompt.source_user_id.in_(chunk))
            .group_by(Prompt.source_user_id)
        ).all()
        counts.update({user: n for user, n in rows if user is not None})  # IN never matches a NULL user
    return counts


def existing_user_splits(db: Session, users: list[str]) -> dict[str, str]:
    """Returns the split each source user's stored prompts are in (any batch), so later imports keep it."""
    splits: dict[str, str] = {}
    for start in range(0, len(users), 5000):
        chunk = users[start : start + 5000]
        rows = db.execute(
            select(Prompt.source_user_id, Prompt.split, func.count())
            .where(Prompt.source_user_id.in_(chunk))
            .group_by(Prompt.source_user_id, Prompt.split)
            .order_by(func.count())
        ).all()
        # One split per user; should rows from before this rule disagree, the user's most common split wins.
        splits.update({user: split for user, split, _ in rows if user is not None})
    return splits


def replace_prompts(db: Session, batch: PromptBatch) -> int:
    """Deletes a draft batch's prompts so a corrected file can be imported; returns how many."""
    if batch.status != "draft":
        raise BatchError("status", "prompts can only be replaced while the batch is a draft", status=409)
    return rowcount(db.execute(delete(Prompt).where(Prompt.batch_id == batch.id)))


def labels_needed(batch: PromptBatch, prompt_id: int) -> int:
    """Returns how many labelers a prompt's task needs: the overlap, plus extra for a stable share of tasks."""
    # A stable pseudo-random share of tasks gets extra labelers, so agreement can be measured.
    if batch.extra_overlap_fraction <= 0:
        return batch.overlap
    point = int(hashlib.sha256(f"{batch.id}:{prompt_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return batch.overlap + (batch.extra_overlap if point < batch.extra_overlap_fraction else 0)


def create_tasks(db: Session, batch: PromptBatch) -> int:
    """Creates the batch's ranking and demonstration tasks; idempotent. Returns how many were new."""
    existing = set(db.execute(select(Task.prompt_id, Task.kind).where(Task.batch_id == batch.id)).all())
    prompt_ids = db.scalars(select(Prompt.id).where(Prompt.batch_id == batch.id).order_by(Prompt.id)).all()
    completions: dict[int, list[int]] = {}
    if batch.wants_rankings:
        for prompt_id, completion_id in db.execute(
            select(Completion.prompt_id, Completion.id)
            .join(Prompt, Prompt.id == Completion.prompt_id)
            .where(Prompt.batch_id == batch.id, Completion.model_version_id.is_not(None))
            .order_by(Completion.id)
        ):
            completions.setdefault(prompt_id, []).append(completion_id)
    created = 0
    for prompt_id in prompt_ids:
        needed = labels_needed(batch, prompt_id)
        if batch.wants_demonstrations and (prompt_id, "demonstration") not in existing:
            db.add(
                Task(
                    batch_id=batch.id, prompt_id=prompt_id, kind="demonstration", needed=needed, priority=batch.priority
                )
            )
            created += 1
        outputs = completions.get(prompt_id, [])[: batch.k]
        if batch.wants_rankings and (prompt_id, "ranking") not in existing and len(outputs) >= 4:
            task = Task(
                batch_id=batch.id,
                prompt_id=prompt_id,
                kind="ranking",
                k=len(outputs),
                needed=needed,
                priority=batch.priority,
            )
            db.add(task)
            db.flush()
            db.execute(
                insert(TaskItem),
                [{"task_id": task.id, "completion_id": cid, "position": i} for i, cid in enumerate(outputs)],
            )
            created += 1
    db.flush()
    return created


def batch_progress(db: Session, batch_ids: list[int] | None = None) -> dict[int, dict[str, Any]]:
    """Returns prompts, samples and labels done/needed per kind for each batch."""
    query = select(PromptBatch.id)
    if batch_ids is not None:
        query = query.where(PromptBatch.id.in_(batch_ids))
    progress: dict[int, dict[str, Any]] = {bid: {"prompts": 0, "samples": 0, "tasks": {}} for bid in db.scalars(query)}
    ids = list(progress)
    if not ids:
        return progress
    for bid, n in db.execute(
        select(Prompt.batch_id, func.count()).where(Prompt.batch_id.in_(ids)).group_by(Prompt.batch_id)
    ):
        progress[bid]["prompts"] = n
    for bid, n in db.execute(
        select(Prompt.batch_id, func.count())
        .join(Completion, Completion.prompt_id == Prompt.id)
        .where(Prompt.batch_id.in_(ids))
        .group_by(Prompt.batch_id)
    ):
        progress[bid]["samples"] = n
    for bid, kind, done, needed, n in db.execute(
        select(Task.batch_id, Task.kind, func.sum(Task.done_count), func.sum(Task.needed), func.count())
        .where(Task.batch_id.in_(ids))
        .group_by(Task.batch_id, Task.kind)
    ):
        progress[bid]["tasks"][kind] = {"done": int(done or 0), "needed": int(needed or 0), "tasks": n}
    return progress


def prompts_with_any_text(db: Session, batch_id: int, texts: list[str]) -> bool:
    """Tells whether a batch already holds any of these texts (used by tests and the demo seed)."""
    found = db.scalar(select(func.count()).where(Prompt.batch_id == batch_id, or_(*(Prompt.text == t for t in texts))))
    return (found or 0) > 0  # count() always yields one row; `or 0` only tells the type checker so
