"""Leases: handing labelers the next task that still needs labels, and what a leased task shows.

`lease_next_task` hands a labeler the next task that still needs labels and
that they have not done, highest batch priority first, then oldest. On
PostgreSQL the task row is taken with `FOR UPDATE SKIP LOCKED`, so labelers
leasing at the same moment never share a slot. A lease expires (the pool
gets the slot back) unless autosave renews it (`app.labeling.submissions`).

Gold tasks (known answers, `app.quality.gold`) are closed to the normal
queue; a ranking lease serves one of its batch's gold tasks instead, with
probability `batch.gold_share`, looking exactly like any other task. Eval
tasks (blind A/B comparisons, `app.quality.evaluations`) are leased like
rankings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any

from sqlalchemy import Select, and_, bindparam, exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db import rowcount
from app.errors import FieldError
from app.models import (
    Assignment,
    Completion,
    Prompt,
    PromptBatch,
    Task,
    TaskItem,
    User,
    utcnow,
)

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


def lease_expiry() -> Any:
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
        held.expires_at = lease_expiry()
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
    lease = {"state": "leased", "leased_at": now, "expires_at": lease_expiry()}
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
            select(Assignment)
            .where(Assignment.task_id == task.id, Assignment.labeler_id == labeler.id)
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
        .where(
            Task.is_open, Task.batch_id.in_(labeling_batches), ~finished_by_me, Task.done_count + active < Task.needed
        )
        .order_by(Task.priority.desc(), Task.id)
        .limit(1)
        .with_for_update(of=Task, skip_locked=True)
        .execution_options(populate_existing=True)
    )
    if kind is not None:
        query = query.where(Task.kind == kind)
    return query


_RECOUNT = select(func.count()).where(
    Assignment.task_id == bindparam("task_id"), Assignment.state == "leased", Assignment.expires_at > bindparam("now")
)


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
    held_before = exists().where(
        Assignment.task_id == Task.id, Assignment.labeler_id == labeler.id, Assignment.state != "expired"
    )
    candidates = db.scalars(
        select(Task.id).where(Task.batch_id == batch_id, Task.is_gold, Task.kind == "ranking", ~held_before)
    ).all()
    if not candidates:
        return None
    return db.get(Task, gold_draw.choice(candidates), populate_existing=True)


_OUTPUTS = (
    select(Completion)
    .join(TaskItem, TaskItem.completion_id == Completion.id)
    .where(TaskItem.task_id == bindparam("task_id"))
    .order_by(TaskItem.position)
)


@cache
def _held_query(kind: str | None) -> Select:
    query = (
        select(Assignment)
        .join(Task, Task.id == Assignment.task_id)
        .where(
            Assignment.labeler_id == bindparam("labeler_id"),
            Assignment.state == "leased",
            Assignment.expires_at > bindparam("now"),
        )
        .order_by(Assignment.id)
        .limit(1)
    )
    if kind is not None:
        query = query.where(Task.kind == kind)
    return query


def _held_lease(db: Session, labeler: User, kind: str | None) -> Assignment | None:
    return db.scalar(_held_query(kind), {"labeler_id": labeler.id, "now": utcnow()})


def _not_yours(assignment_id: int) -> str:
    return f"Task {assignment_id} is not one of your tasks (or it no longer exists). My tasks has your next one."


def get_assignment(db: Session, assignment_id: int, labeler: User, *, lock: bool = False) -> Assignment:
    """Returns one of the labeler's own assignments; 404 for anyone else's."""
    query = select(Assignment).where(Assignment.id == assignment_id, Assignment.labeler_id == labeler.id)
    if lock:
        # populate_existing: the row may already sit in the session from an unlocked read, and
        # the state that decides idempotency must be the one read under the lock.
        query = query.with_for_update().execution_options(populate_existing=True)
    assignment = db.scalar(query)
    if assignment is None:
        raise LabelingError("assignment_id", _not_yours(assignment_id), status=404)
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


def lock_with_task(db: Session, assignment_id: int, labeler: User) -> tuple[Assignment, Task]:
    """Locks one of the labeler's assignments and loads its task in the same round trip; 404 for anyone else's."""
    row = db.execute(_LOCK_WITH_TASK, {"assignment_id": assignment_id, "labeler_id": labeler.id}).first()
    if row is None:
        raise LabelingError("assignment_id", _not_yours(assignment_id), status=404)
    return row[0], row[1]


_VIEW = (
    select(Task, Prompt, PromptBatch)
    .join(Prompt, Prompt.id == Task.prompt_id)
    .join(PromptBatch, PromptBatch.id == Task.batch_id)
    .where(Task.id == bindparam("task_id"))
)


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


def expire_leases(db: Session) -> int:
    """Marks lapsed leases expired so dashboards show them free; returns how many."""
    result = db.execute(
        update(Assignment)
        .where(and_(Assignment.state == "leased", Assignment.expires_at <= utcnow()))
        .values(state="expired")
    )
    return rowcount(result)


def release_leases(db: Session, labeler: User) -> int:
    """Returns a labeler's open leases to the pool at once (deactivation); their submitted labels stay."""
    result = db.execute(
        update(Assignment)
        .where(Assignment.labeler_id == labeler.id, Assignment.state == "leased")
        .values(state="expired")
    )
    return rowcount(result)
