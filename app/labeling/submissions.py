"""Submissions: one path that takes every task kind's label, plus skips and autosaved drafts.

`submit` stores a demonstration, a ranking (ranks with ties, a Likert score
and flags per output) or a blind evaluation verdict, whichever the leased
task is. Submissions are idempotent per assignment: a repeat returns the
stored result, never a second label. A gold check is stored as a ranking
marked `is_gold` and does not count towards the task's overlap. A label that
closes its task may complete its batch (`app.collection.batches`).
"""

from __future__ import annotations

from datetime import UTC
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from app.collection.batches import complete_if_done
from app.collection.prompt_import import why_unstorable
from app.db import get_existing
from app.labeling import blind, leases
from app.labeling.leases import MAX_DEMONSTRATION_CHARS, MAX_DRAFT_CHARS, SKIP_REASONS, LabelingError, get_assignment
from app.models import (
    Assignment,
    Completion,
    Demonstration,
    EvalJudgment,
    Evaluation,
    Ranking,
    RankingItem,
    Task,
    TaskItem,
    User,
    utcnow,
)
from app.vocabulary import RANKING_FLAGS

_COUNT_LABEL = (
    update(Task)
    .where(Task.id == bindparam("task_id"), Task.done_count < Task.needed)
    .values(done_count=Task.done_count + 1, is_open=Task.done_count + 1 < Task.needed)
    .returning(Task.done_count, Task.is_open)
    .execution_options(synchronize_session=False)
)


def _lapsed(assignment: Assignment) -> bool:
    # SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones in the session's
    # time zone, which need not be UTC, so convert rather than drop the zone.
    expires = assignment.expires_at
    expires = expires.replace(tzinfo=UTC) if expires.tzinfo is None else expires.astimezone(UTC)
    return assignment.state == "expired" or expires <= utcnow()


def _ensure_submittable(db: Session, assignment: Assignment, task: Task) -> None:
    """Refuses a submit on a lease that lapsed and whose slot someone else now fills."""
    if assignment.state == "skipped":
        raise LabelingError("assignment", "this task was skipped; it cannot be submitted", status=409)
    if not _lapsed(assignment) or task.is_gold:
        return  # a gold check has no slots to run out of
    others = db.scalar(
        select(func.count()).where(
            Assignment.task_id == task.id,
            Assignment.id != assignment.id,
            Assignment.state == "leased",
            Assignment.expires_at > utcnow(),
        )
    )
    if task.done_count + (others or 0) >= task.needed:  # count() always yields a row; `or 0` is for the type
        raise LabelingError(
            "assignment",
            "your lease expired and another labeler has taken this task; please take the next one",
            status=409,
        )


def _count_label(db: Session, task: Task, *, complete_batch: bool = True) -> bool:
    """Counts one more label on the task; returns whether that closed it.

    A label that closes its task may complete the whole batch. `complete_batch=False` leaves that check to
    the caller, who makes it the last statement before the commit (`_complete_batch`).
    """
    counted = db.execute(_COUNT_LABEL, {"task_id": task.id}).first()
    if counted is None:
        raise LabelingError("assignment", "this task already has all the labels it needs", status=409)
    # The loaded task learns the new values without being marked changed (no second UPDATE at the flush).
    set_committed_value(task, "done_count", counted.done_count)
    set_committed_value(task, "is_open", counted.is_open)
    closed = not counted.is_open
    if closed and complete_batch:
        _complete_batch(db, task)
    return closed


def _complete_batch(db: Session, task: Task) -> None:
    """Completes the batch of a task that just closed if no task of it is open any more.

    This locks the batch row until the commit, so every submit that closes a task of the batch queues
    for it: callers make it their last statement, so that the lock is held as briefly as possible.
    """
    complete_if_done(db, task.batch_id)


def _finish(assignment: Assignment, active_seconds: float) -> None:
    assignment.state = "submitted"
    assignment.finished_at = utcnow()
    assignment.active_seconds = max(0.0, float(active_seconds or 0.0))
    assignment.draft = {}


def submit_demonstration(
    db: Session, labeler: User, assignment_id: int, text: str, active_seconds: float = 0.0
) -> Demonstration:
    """Stores a demonstration once; a repeated submit returns the stored one."""
    assignment, task = leases.lock_with_task(db, assignment_id, labeler)
    return _submit_demonstration(db, labeler, assignment, task, text, active_seconds)


def _submit_demonstration(
    db: Session, labeler: User, assignment: Assignment, task: Task, text: str, active_seconds: float
) -> Demonstration:
    if assignment.state == "submitted":
        existing = db.scalar(select(Demonstration).where(Demonstration.assignment_id == assignment.id))
        if existing is not None:
            return existing
    if task.kind != "demonstration":
        raise LabelingError("assignment", f"this is a {task.kind} task, not a demonstration")
    text = (text or "").replace("\x00", "").strip("\n")
    if (why := why_unstorable(text)) is not None:
        raise LabelingError("text", why)
    if not text.strip():
        raise LabelingError("text", "write a response before submitting")
    if len(text) > MAX_DEMONSTRATION_CHARS:
        raise LabelingError("text", f"is longer than {MAX_DEMONSTRATION_CHARS} characters")
    _ensure_submittable(db, assignment, task)
    _count_label(db, task)
    demo = Demonstration(
        assignment_id=assignment.id,
        task_id=task.id,
        prompt_id=task.prompt_id,
        labeler_id=labeler.id,
        text=text,
        active_seconds=max(0.0, float(active_seconds or 0)),
    )
    db.add(demo)
    _finish(assignment, active_seconds)
    db.flush()
    return demo


def validate_ranking_items(expected_ids: list[int], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checks a submitted ranking and returns its items with dense ranks; errors name the item and field."""
    if not isinstance(items, list) or not items:
        raise LabelingError("items", "give a rank and a Likert score for every output")
    seen: set[int] = set()
    for i, item in enumerate(items):
        where = f"items[{i}]"
        cid = item.get("completion_id")
        if cid not in expected_ids:
            raise LabelingError(f"{where}.completion_id", f"{cid!r} is not one of this task's outputs")
        if cid in seen:
            raise LabelingError(f"{where}.completion_id", f"output {cid} appears twice")
        seen.add(cid)
        rank = item.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= len(expected_ids):
            raise LabelingError(f"{where}.rank", f"put output {cid} in a slot from 1 to {len(expected_ids)}")
        likert = item.get("likert")
        if not isinstance(likert, int) or isinstance(likert, bool) or not 1 <= likert <= 7:
            raise LabelingError(f"{where}.likert", f"give output {cid} a score from 1 to 7")
        flags = item.get("flags") or []
        if not isinstance(flags, list) or any(f not in RANKING_FLAGS for f in flags):
            raise LabelingError(f"{where}.flags", "unknown flag; allowed: " + ", ".join(RANKING_FLAGS))
    missing = [cid for cid in expected_ids if cid not in seen]
    if missing:
        raise LabelingError("items", f"every output needs a slot and a score; missing output(s) {missing}")
    # Dense ranks: slots 1, 3, 3 become 1, 2, 2 (ties share a rank, no gaps).
    dense = {rank: i + 1 for i, rank in enumerate(sorted({item["rank"] for item in items}))}
    return [
        {
            "completion_id": item["completion_id"],
            "rank": dense[item["rank"]],
            "likert": item["likert"],
            "flags": sorted(set(item.get("flags") or [])),
        }
        for item in items
    ]


def submit_ranking(
    db: Session,
    labeler: User,
    assignment_id: int,
    items: list[dict[str, Any]],
    *,
    all_unacceptable: bool = False,
    active_seconds: float = 0.0,
) -> Ranking:
    """Stores a ranking once; a repeated submit returns the stored one. `ranking.items` is loaded either way."""
    assignment, task = leases.lock_with_task(db, assignment_id, labeler)
    return _submit_ranking(db, labeler, assignment, task, items, all_unacceptable, active_seconds)


def _submit_ranking(
    db: Session,
    labeler: User,
    assignment: Assignment,
    task: Task,
    items: list[dict[str, Any]],
    all_unacceptable: bool,
    active_seconds: float,
) -> Ranking:
    if assignment.state == "submitted":
        existing = db.scalar(
            select(Ranking).options(selectinload(Ranking.items)).where(Ranking.assignment_id == assignment.id)
        )
        if existing is not None:
            return existing
    if task.kind != "ranking":
        raise LabelingError("assignment", f"this is a {task.kind} task, not a ranking")
    order = assignment.display_order or list(
        db.scalars(select(TaskItem.completion_id).where(TaskItem.task_id == task.id).order_by(TaskItem.position))
    )
    clean = validate_ranking_items(order, items)
    _ensure_submittable(db, assignment, task)
    # A gold check measures the labeler; the task already has its answer and counts no label.
    closed = not task.is_gold and _count_label(db, task, complete_batch=False)
    ranking = Ranking(
        assignment_id=assignment.id,
        task_id=task.id,
        prompt_id=task.prompt_id,
        labeler_id=labeler.id,
        all_unacceptable=bool(all_unacceptable),
        is_gold=task.is_gold,
        active_seconds=max(0.0, float(active_seconds or 0)),
    )
    db.add(ranking)
    _finish(assignment, active_seconds)
    db.flush()  # the ranking (for its id) and the assignment
    # The K items in one bulk INSERT ... RETURNING rather than through the unit of work: its bookkeeping for K
    # new objects and their parent cost about 4 % of a whole lease + submit cycle's Python CPU.
    position = {cid: i for i, cid in enumerate(order)}
    rows = [{"ranking_id": ranking.id, "position": position[item["completion_id"]], **item} for item in clean]
    stored = db.scalars(insert(RankingItem).returning(RankingItem), rows).all()
    set_committed_value(ranking, "items", sorted(stored, key=lambda i: i.position))
    if closed:
        _complete_batch(db, task)  # last: it holds the batch row lock until the commit
    return ranking


def submit(
    db: Session,
    labeler: User,
    assignment_id: int,
    *,
    text: str | None = None,
    items: list[dict[str, Any]] | None = None,
    all_unacceptable: bool = False,
    choice: int | str | None = None,
    active_seconds: float = 0.0,
    shown: bool = False,
) -> Demonstration | Ranking | Any:
    """Submits a demonstration, a ranking or an eval verdict, whichever the task is; repeats return the stored one.

    With `shown`, the outputs in `items` and `choice` go by the ids this assignment shows its labeler
    (app.labeling.blind), as the pages and the API do; otherwise by completion id.
    """
    assignment, task = leases.lock_with_task(db, assignment_id, labeler)
    if shown and task.kind != "demonstration":
        items, choice = _from_shown(assignment, items, choice)
    if task.kind == "demonstration":
        return _submit_demonstration(db, labeler, assignment, task, text or "", active_seconds)
    if task.kind == "ranking":
        if items is None and assignment.state != "submitted":
            raise LabelingError("items", "give a rank and a Likert score for every output")
        return _submit_ranking(db, labeler, assignment, task, items or [], all_unacceptable, active_seconds)
    return _submit_judgment(db, labeler, assignment, task, choice, active_seconds)


def _from_shown(
    assignment: Assignment, items: list[dict[str, Any]] | None, choice: int | str | None
) -> tuple[list[dict[str, Any]] | None, int | str | None]:
    """Translates the shown ids of a submission into completion ids, within this assignment only."""
    order = assignment.display_order or []
    by_shown = dict(zip(blind.shown_ids(assignment.id, order), order, strict=True))
    if items is not None:
        # Checked against the shown ids first, so an error names the id the labeler sent.
        validate_ranking_items(list(by_shown), items)
        items = [{**item, "completion_id": by_shown[item["completion_id"]]} for item in items]
    if isinstance(choice, int) and not isinstance(choice, bool):
        choice = by_shown.get(choice, 0)  # 0 is no output's id: refused, naming `choice`
    return items, choice


def _submit_judgment(
    db: Session, labeler: User, assignment: Assignment, task: Task, choice: Any, active_seconds: float
) -> EvalJudgment:
    """Stores a labeler's verdict on an eval task once; `choice` is the better output's id or 'tie'."""
    if assignment.state == "submitted":
        existing = db.scalar(select(EvalJudgment).where(EvalJudgment.assignment_id == assignment.id))
        if existing is not None:
            return existing
    evaluation = db.scalar(select(Evaluation).where(Evaluation.batch_id == task.batch_id))
    if evaluation is None or evaluation.status == "cancelled":
        raise LabelingError("assignment", "this comparison was cancelled", status=409)
    items = dict(
        db.execute(
            select(TaskItem.completion_id, Completion.model_version_id)
            .join(Completion, Completion.id == TaskItem.completion_id)
            .where(TaskItem.task_id == task.id)
        ).all()
    )
    if choice == "tie":
        winner = "tie"
    elif isinstance(choice, int) and not isinstance(choice, bool) and choice in items:
        winner = "a" if items[choice] == evaluation.model_a_id else "b"
    else:
        raise LabelingError("choice", 'give the id of the better output, or "tie"')
    _ensure_submittable(db, assignment, task)
    _count_label(db, task)
    order = assignment.display_order or list(items)
    first = items.get(order[0]) if order else evaluation.model_a_id
    judgment = EvalJudgment(
        evaluation_id=evaluation.id,
        assignment_id=assignment.id,
        task_id=task.id,
        prompt_id=task.prompt_id,
        labeler_id=labeler.id,
        winner=winner,
        chosen_completion_id=None if winner == "tie" else choice,
        shown_first="a" if first == evaluation.model_a_id else "b",
        active_seconds=max(0.0, float(active_seconds or 0.0)),
    )
    db.add(judgment)
    _finish(assignment, active_seconds)
    db.flush()
    return judgment


def skip(db: Session, labeler: User, assignment_id: int, reason: str, note: str = "") -> Assignment:
    """Skips a task with a reason; it is never offered to this labeler again."""
    assignment = get_assignment(db, assignment_id, labeler, lock=True)
    if assignment.state == "skipped":
        return assignment
    if assignment.state == "submitted":
        raise LabelingError("assignment", "this task was already submitted", status=409)
    if reason not in SKIP_REASONS:
        raise LabelingError("reason", "choose one of " + ", ".join(SKIP_REASONS))
    if reason == "other" and not (note or "").strip():
        raise LabelingError("note", "say why you skip when the reason is 'other'")
    if (why := why_unstorable(note or "")) is not None:
        raise LabelingError("note", why)
    assignment.state = "skipped"
    assignment.skip_reason = reason
    assignment.skip_note = (note or "")[:2000]
    assignment.finished_at = utcnow()
    return assignment


def save_draft(
    db: Session, labeler: User, assignment_id: int, draft: dict[str, Any], active_seconds: float | None = None
) -> Assignment:
    """Autosaves a draft and renews the lease while it is still this labeler's."""
    import json

    assignment = get_assignment(db, assignment_id, labeler)
    if assignment.state in ("submitted", "skipped"):
        raise LabelingError("assignment", f"this task was already {assignment.state}", status=409)
    if not isinstance(draft, dict):
        raise LabelingError("draft", "must be a JSON object")
    encoded = json.dumps(draft)
    if len(encoded) > MAX_DRAFT_CHARS:
        raise LabelingError("draft", f"is larger than {MAX_DRAFT_CHARS} characters")
    if "\\u0000" in encoded:
        raise LabelingError("draft", "contains a NUL character, which cannot be stored")
    if (why := why_unstorable(json.dumps(draft, ensure_ascii=False))) is not None:
        raise LabelingError("draft", why)
    assignment.draft = draft
    if active_seconds is not None:
        assignment.active_seconds = max(assignment.active_seconds, float(active_seconds))
    if _lapsed(assignment):
        task = get_existing(db, Task, assignment.task_id)  # assignments.task_id is a foreign key to tasks
        _ensure_submittable(db, assignment, task)
        assignment.state = "leased"
    assignment.expires_at = leases.lease_expiry()
    return assignment


def submitted_work(db: Session, assignment: Assignment) -> dict[str, Any]:
    """Gets what a labeler sent for a finished assignment, to show it read-only (the Back button lands here).

    Keys: `text` (a demonstration), `ranked` (a ranking: position on the page -> rank, Likert, flags, in page
    order), `all_unacceptable`, `chosen_position` (an eval verdict: the chosen output's position, None for a
    tie). Empty for a skipped assignment.
    """
    if assignment.state != "submitted":
        return {}
    demonstration = db.scalar(select(Demonstration.text).where(Demonstration.assignment_id == assignment.id))
    if demonstration is not None:
        return {"text": demonstration}
    ranking = db.scalar(
        select(Ranking).options(selectinload(Ranking.items)).where(Ranking.assignment_id == assignment.id)
    )
    if ranking is not None:
        items = {item.position: item for item in ranking.items}
        return {"ranked": items, "all_unacceptable": ranking.all_unacceptable}
    chosen = db.scalar(select(EvalJudgment.chosen_completion_id).where(EvalJudgment.assignment_id == assignment.id))
    order = list(assignment.display_order or [])
    return {"chosen_position": order.index(chosen) if chosen in order else None, "judged": True}
