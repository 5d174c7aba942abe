"""Labeling: leasing tasks to labelers and taking their demonstrations, rankings and skips.

`lease_next_task` hands a labeler the next task that still needs labels and
that they have not done, highest batch priority first, then oldest. On
PostgreSQL the task row is taken with `FOR UPDATE SKIP LOCKED`, so labelers
leasing at the same moment never share a slot. A lease expires (the pool
gets the slot back) unless autosave renews it. Submissions are idempotent
per assignment: a repeat returns the stored result, never a second label.

Gold tasks (known answers, `app.quality.gold`) are closed to the normal
queue; a ranking lease serves one of its batch's gold tasks instead, with
probability `batch.gold_share`, looking exactly like any other task. A gold
check is stored as a ranking marked `is_gold` and does not count towards the
task's overlap. Eval tasks (blind A/B comparisons, `app.quality.evaluations`)
are leased like rankings and submitted as a choice; the one `submit` takes every kind.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta, timezone
from functools import cache
from typing import Any

from sqlalchemy import Select, and_, bindparam, exists, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from app.config import get_settings
from app.db import get_existing, rowcount
from app.models import (
    RANKING_FLAGS,
    Assignment,
    Completion,
    Demonstration,
    EvalJudgment,
    Evaluation,
    Prompt,
    PromptBatch,
    Ranking,
    RankingItem,
    Task,
    TaskItem,
    User,
    utcnow,
)
from app.collection.batches import complete_if_done
from app.collection.prompt_import import why_unstorable
from app.errors import FieldError

SKIP_REASONS = {
    "unclear": "The prompt is unclear or incomplete",
    "unsafe": "The prompt asks for something harmful",
    "expertise": "It needs expertise I do not have",
    "broken_outputs": "The outputs are broken or unreadable",
    "language": "It is in a language I do not read",
    "other": "Another reason (please say which)",
}
MAX_DEMONSTRATION_CHARS = 20000
# Draws whether a lease serves a gold check; a module attribute so tests can seed it.
gold_draw = random.Random()
MAX_DRAFT_CHARS = 100_000


class LabelingError(FieldError):
    """A problem with a labeler's request; `field` names what is wrong, `status` the HTTP code."""


@dataclass
class TaskView:
    """Everything a labeling page or API client needs to show one assignment."""

    assignment: Assignment
    task: Task
    prompt: Prompt
    batch: PromptBatch
    completions: list[Completion]  # in this labeler's display order


def _lease_expiry() -> Any:
    return utcnow() + timedelta(minutes=get_settings().lease_minutes)


def lease_next_task(db: Session, labeler: User, kind: str | None = None) -> Assignment | None:
    """Leases the next task this labeler can do, or returns the lease they already hold; None when none is left."""
    leased = _lease(db, labeler, kind)
    return leased[0] if leased else None


def lease_next_view(db: Session, labeler: User, kind: str | None = None) -> TaskView | None:
    """Leases like `lease_next_task` and returns what is needed to show the task; None when none is left."""
    leased = _lease(db, labeler, kind)
    return task_view(db, *leased) if leased else None


def _lease(db: Session, labeler: User, kind: str | None) -> tuple[Assignment, list[Completion]] | None:
    """Leases (or finds the held lease); returns it with the task's outputs when they were loaded on the way."""
    if kind is not None and kind not in ("demonstration", "ranking", "eval"):
        raise LabelingError("kind", "must be demonstration, ranking or eval")
    held = _held_lease(db, labeler, kind)
    if held is not None:
        held.expires_at = _lease_expiry()
        return held, []
    found = _lock_free_slot(db, _lease_query(kind), {"labeler_id": labeler.id, "now": utcnow()})
    if found is None:
        return None
    task, gold_share = found
    if task.kind == "ranking" and gold_share and gold_draw.random() < gold_share:
        # A quality check instead: one of the same batch's gold tasks this labeler has not seen, shown the
        # same way (same batch, same guidelines), so it cannot be told apart.
        task = _gold_task_for(db, labeler, task.batch_id) or task
    order: list[int] = []
    outputs: list[Completion] = []
    if task.kind in ("ranking", "eval"):
        # The outputs themselves, not only their ids, so showing the task needs no second query.
        outputs = list(db.scalars(_OUTPUTS, {"task_id": task.id}).all())
        order = [output.id for output in outputs]
        # A fresh random order per labeler; stored so position bias can be measured later.
        random.SystemRandom().shuffle(order)
    now = utcnow()
    lease = {"state": "leased", "leased_at": now, "expires_at": _lease_expiry()}
    # One statement in the usual case (a task this labeler never held); ON CONFLICT keeps it correct when
    # they held it before and the lease lapsed, in which case the old row is renewed below.
    insert = postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert
    assignment = db.scalars(
        insert(Assignment)
        .values(task_id=task.id, labeler_id=labeler.id, draft={}, display_order=order, active_seconds=0.0, **lease)
        .on_conflict_do_nothing(index_elements=["task_id", "labeler_id"])
        .returning(Assignment)
    ).first()
    if assignment is None:
        assignment = db.scalar(
            select(Assignment).where(Assignment.task_id == task.id, Assignment.labeler_id == labeler.id)
            .execution_options(populate_existing=True)
        )
        if assignment is None:  # the insert did nothing only because this row exists
            raise LookupError(f"assignment of task {task.id} to labeler {labeler.id} vanished")
        for name, value in lease.items():
            setattr(assignment, name, value)
        if not assignment.display_order:
            # The order shown before is kept: a draft in progress was made against it.
            assignment.display_order = order
        db.flush()
    return assignment, outputs


@cache
def _lease_query(kind: str | None) -> Select:
    """The lease query for one task kind, built once: building it costs more Python CPU than running it.

    The labeler and the time are bound parameters (`labeler_id`, `now`). Written so the plan walks
    ix_tasks_lease_queue in order and stops at the first free slot: the batch filter is a subquery (a join
    could reorder the walk and force a sort of every open task). The batch's gold share comes with the task
    (a subquery on the one row returned), not in a second round trip.
    """
    finished_by_me = exists().where(
        Assignment.task_id == Task.id,
        Assignment.labeler_id == bindparam("labeler_id"),
        Assignment.state.in_(("submitted", "skipped")),
    )
    active = (
        select(func.count())
        .where(Assignment.task_id == Task.id, Assignment.state == "leased", Assignment.expires_at > bindparam("now"))
        .scalar_subquery()
    )
    labeling_batches = select(PromptBatch.id).where(PromptBatch.status == "labeling")
    gold_share = select(PromptBatch.gold_share).where(PromptBatch.id == Task.batch_id).scalar_subquery()
    query = (
        select(Task, gold_share)
        .where(Task.is_open, Task.batch_id.in_(labeling_batches), ~finished_by_me,
               Task.done_count + active < Task.needed)
        .order_by(Task.priority.desc(), Task.id)
        .limit(1)
        .with_for_update(of=Task, skip_locked=True)
        .execution_options(populate_existing=True)
    )
    if kind is not None:
        query = query.where(Task.kind == kind)
    return query


_RECOUNT = select(func.count()).where(
    Assignment.task_id == bindparam("task_id"), Assignment.state == "leased", Assignment.expires_at > bindparam("now"))


def _lock_free_slot(db: Session, query: Select, params: dict[str, Any]) -> tuple[Task, float] | None:
    """Locks the first task the query finds with a free slot once locked; returns it and its batch's gold share."""
    passed_over: list[int] = []
    while True:
        found = query.where(Task.id.not_in(passed_over)) if passed_over else query
        row = db.execute(found, params).first()
        if row is None:
            return None
        task, share = row
        # A lease committed after this statement's snapshot but before we got the row lock is
        # invisible to the query above; recount in a fresh statement now that no one else can
        # lease this task, so a slot is never handed out twice.
        leased = db.scalar(_RECOUNT, {"task_id": task.id, "now": utcnow()})
        if task.done_count + leased < task.needed:
            return task, float(share or 0.0)
        passed_over.append(task.id)


def _gold_task_for(db: Session, labeler: User, batch_id: int) -> Task | None:
    """Picks at random one of a batch's gold tasks this labeler has never held; None when none is left."""
    held_before = exists().where(Assignment.task_id == Task.id, Assignment.labeler_id == labeler.id,
                                 Assignment.state != "expired")
    candidates = db.scalars(
        select(Task.id).where(Task.batch_id == batch_id, Task.is_gold, Task.kind == "ranking", ~held_before)
    ).all()
    if not candidates:
        return None
    return db.get(Task, gold_draw.choice(candidates), populate_existing=True)


_OUTPUTS = (select(Completion).join(TaskItem, TaskItem.completion_id == Completion.id)
            .where(TaskItem.task_id == bindparam("task_id")).order_by(TaskItem.position))


@cache
def _held_query(kind: str | None) -> Select:
    query = (
        select(Assignment)
        .join(Task, Task.id == Assignment.task_id)
        .where(Assignment.labeler_id == bindparam("labeler_id"), Assignment.state == "leased",
               Assignment.expires_at > bindparam("now"))
        .order_by(Assignment.id)
        .limit(1)
    )
    if kind is not None:
        query = query.where(Task.kind == kind)
    return query


def _held_lease(db: Session, labeler: User, kind: str | None) -> Assignment | None:
    return db.scalar(_held_query(kind), {"labeler_id": labeler.id, "now": utcnow()})


def get_assignment(db: Session, assignment_id: int, labeler: User, *, lock: bool = False) -> Assignment:
    """Returns one of the labeler's own assignments; 404 for anyone else's."""
    query = select(Assignment).where(Assignment.id == assignment_id, Assignment.labeler_id == labeler.id)
    if lock:
        # populate_existing: the row may already sit in the session from an unlocked read, and
        # the state that decides idempotency must be the one read under the lock.
        query = query.with_for_update().execution_options(populate_existing=True)
    assignment = db.scalar(query)
    if assignment is None:
        raise LabelingError("assignment_id", f"no assignment {assignment_id} of yours", status=404)
    return assignment


# The submit path's statements are built once, with bound parameters: they run on every submission, and
# constructing a statement and its cache key on each call is a large share of the Python CPU of running it.
_LOCK_WITH_TASK = (
    select(Assignment, Task)
    .join(Task, Task.id == Assignment.task_id)
    .where(Assignment.id == bindparam("assignment_id"), Assignment.labeler_id == bindparam("labeler_id"))
    .with_for_update(of=Assignment)
    # populate_existing: the state that decides idempotency must be the one read under the lock.
    .execution_options(populate_existing=True)
)
# Conditional so two racing submits can never push done_count past needed; RETURNING tells whether this label
# closed the task as the database counted it (the task row read before may be stale), in the same round trip.
_COUNT_LABEL = (
    update(Task)
    .where(Task.id == bindparam("task_id"), Task.done_count < Task.needed)
    .values(done_count=Task.done_count + 1, is_open=Task.done_count + 1 < Task.needed)
    .returning(Task.done_count, Task.is_open)
    .execution_options(synchronize_session=False)
)


def _lock_with_task(db: Session, assignment_id: int, labeler: User) -> tuple[Assignment, Task]:
    """Locks one of the labeler's assignments and loads its task in the same round trip; 404 for anyone else's."""
    row = db.execute(_LOCK_WITH_TASK, {"assignment_id": assignment_id, "labeler_id": labeler.id}).first()
    if row is None:
        raise LabelingError("assignment_id", f"no assignment {assignment_id} of yours", status=404)
    return row[0], row[1]


_VIEW = (select(Task, Prompt, PromptBatch)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .join(PromptBatch, PromptBatch.id == Task.batch_id)
        .where(Task.id == bindparam("task_id")))


def task_view(db: Session, assignment: Assignment, outputs: list[Completion] | None = None) -> TaskView:
    """Loads what is needed to show an assignment (`outputs`: its completions, when the caller has them)."""
    task, prompt, batch = db.execute(_VIEW, {"task_id": assignment.task_id}).one()
    completions: list[Completion] = []
    if assignment.display_order:
        by_id = {c.id: c for c in outputs or ()}
        if not set(assignment.display_order) <= by_id.keys():
            by_id = {c.id: c for c in db.scalars(select(Completion).where(Completion.id.in_(assignment.display_order)))}
        completions = [by_id[cid] for cid in assignment.display_order if cid in by_id]
    return TaskView(assignment=assignment, task=task, prompt=prompt, batch=batch, completions=completions)


def _lapsed(assignment: Assignment) -> bool:
    # SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones in the session's
    # time zone, which need not be UTC, so convert rather than drop the zone.
    expires = assignment.expires_at
    expires = expires.replace(tzinfo=timezone.utc) if expires.tzinfo is None else expires.astimezone(timezone.utc)
    return assignment.state == "expired" or expires <= utcnow()


def _ensure_submittable(db: Session, assignment: Assignment, task: Task) -> None:
    """Refuses a submit on a lease that lapsed and whose slot someone else now fills."""
    if assignment.state == "skipped":
        raise LabelingError("assignment", "this task was skipped; it cannot be submitted", status=409)
    if not _lapsed(assignment) or task.is_gold:
        return  # a gold check has no slots to run out of
    others = db.scalar(
        select(func.count()).where(
            Assignment.task_id == task.id, Assignment.id != assignment.id, Assignment.state == "leased",
            Assignment.expires_at > utcnow(),
        )
    )
    if task.done_count + (others or 0) >= task.needed:  # count() always yields a row; `or 0` is for the type
        raise LabelingError(
            "assignment", "your lease expired and another labeler has taken this task; please take the next one",
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


def submit_demonstration(db: Session, labeler: User, assignment_id: int, text: str,
                         active_seconds: float = 0.0) -> Demonstration:
    """Stores a demonstration once; a repeated submit returns the stored one."""
    assignment, task = _lock_with_task(db, assignment_id, labeler)
    return _submit_demonstration(db, labeler, assignment, task, text, active_seconds)


def _submit_demonstration(db: Session, labeler: User, assignment: Assignment, task: Task, text: str,
                          active_seconds: float) -> Demonstration:
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
    demo = Demonstration(assignment_id=assignment.id, task_id=task.id, prompt_id=task.prompt_id,
                         labeler_id=labeler.id, text=text, active_seconds=max(0.0, float(active_seconds or 0)))
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
        {"completion_id": item["completion_id"], "rank": dense[item["rank"]], "likert": item["likert"],
         "flags": sorted(set(item.get("flags") or []))}
        for item in items
    ]


def submit_ranking(db: Session, labeler: User, assignment_id: int, items: list[dict[str, Any]], *,
                   all_unacceptable: bool = False, active_seconds: float = 0.0) -> Ranking:
    """Stores a ranking once; a repeated submit returns the stored one. `ranking.items` is loaded either way."""
    assignment, task = _lock_with_task(db, assignment_id, labeler)
    return _submit_ranking(db, labeler, assignment, task, items, all_unacceptable, active_seconds)


def _submit_ranking(db: Session, labeler: User, assignment: Assignment, task: Task, items: list[dict[str, Any]],
                    all_unacceptable: bool, active_seconds: float) -> Ranking:
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
    ranking = Ranking(assignment_id=assignment.id, task_id=task.id, prompt_id=task.prompt_id, labeler_id=labeler.id,
                      all_unacceptable=bool(all_unacceptable), is_gold=task.is_gold,
                      active_seconds=max(0.0, float(active_seconds or 0)))
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


def submit(db: Session, labeler: User, assignment_id: int, *, text: str | None = None,
           items: list[dict[str, Any]] | None = None, all_unacceptable: bool = False,
           choice: int | str | None = None, active_seconds: float = 0.0) -> Demonstration | Ranking | Any:
    """Submits a demonstration, a ranking or an eval verdict, whichever the task is; repeats return the stored one."""
    assignment, task = _lock_with_task(db, assignment_id, labeler)
    if task.kind == "demonstration":
        return _submit_demonstration(db, labeler, assignment, task, text or "", active_seconds)
    if task.kind == "ranking":
        if items is None and assignment.state != "submitted":
            raise LabelingError("items", "give a rank and a Likert score for every output")
        return _submit_ranking(db, labeler, assignment, task, items or [], all_unacceptable, active_seconds)
    return _submit_judgment(db, labeler, assignment, task, choice, active_seconds)


def _submit_judgment(db: Session, labeler: User, assignment: Assignment, task: Task, choice: Any,
                     active_seconds: float) -> EvalJudgment:
    """Stores a labeler's verdict on an eval task once; `choice` is the better output's id or 'tie'."""
    if assignment.state == "submitted":
        existing = db.scalar(select(EvalJudgment).where(EvalJudgment.assignment_id == assignment.id))
        if existing is not None:
            return existing
    evaluation = db.scalar(select(Evaluation).where(Evaluation.batch_id == task.batch_id))
    if evaluation is None or evaluation.status == "cancelled":
        raise LabelingError("assignment", "this comparison was cancelled", status=409)
    items = dict(db.execute(
        select(TaskItem.completion_id, Completion.model_version_id)
        .join(Completion, Completion.id == TaskItem.completion_id).where(TaskItem.task_id == task.id)
    ).all())
    if choice == "tie":
        winner = "tie"
    elif isinstance(choice, int) and not isinstance(choice, bool) and choice in items:
        winner = "a" if items[choice] == evaluation.model_a_id else "b"
    else:
        raise LabelingError("choice", "give the id of the better output, or \"tie\"")
    _ensure_submittable(db, assignment, task)
    _count_label(db, task)
    order = assignment.display_order or list(items)
    first = items.get(order[0]) if order else evaluation.model_a_id
    judgment = EvalJudgment(
        evaluation_id=evaluation.id, assignment_id=assignment.id, task_id=task.id, prompt_id=task.prompt_id,
        labeler_id=labeler.id, winner=winner, chosen_completion_id=None if winner == "tie" else choice,
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


def save_draft(db: Session, labeler: User, assignment_id: int, draft: dict[str, Any],
               active_seconds: float | None = None) -> Assignment:
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
    assignment.expires_at = _lease_expiry()
    return assignment


def expire_leases(db: Session) -> int:
    """Marks lapsed leases expired so dashboards show them free; returns how many."""
    result = db.execute(
        update(Assignment)
        .where(and_(Assignment.state == "leased", Assignment.expires_at <= utcnow()))
        .values(state="expired")
    )
    return rowcount(result)
