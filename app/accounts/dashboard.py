"""At-a-glance figures for the two home pages: what a labeler can do, what an admin should watch."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime, time

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.collection.prompt_writing import any_writable_batch
from app.models import (
    Assignment,
    ModelVersion,
    Prompt,
    PromptBatch,
    Task,
    TrainingRun,
    User,
)


def _available_tasks_by_kind(db: Session, user: User) -> dict[str, int]:
    mine = select(Assignment.task_id).where(Assignment.labeler_id == user.id)
    rows = db.execute(
        select(Task.kind, func.count())
        .join(PromptBatch, PromptBatch.id == Task.batch_id)
        .where(Task.is_open, PromptBatch.status == "labeling", Task.id.not_in(mine))
        .group_by(Task.kind)
    ).all()
    counts = {"demonstration": 0, "ranking": 0, "eval": 0}
    counts.update(dict(rows))
    return counts


def labeler_summary(db: Session, user: User) -> dict:
    """Returns a labeler's available tasks by kind, today's output and median time per task."""
    start_of_day = datetime.combine(datetime.now(UTC).date(), time.min, tzinfo=UTC)
    finished = db.execute(
        select(Assignment.state, Assignment.leased_at, Assignment.finished_at, Assignment.active_seconds).where(
            Assignment.labeler_id == user.id,
            Assignment.state.in_(("submitted", "skipped")),
            Assignment.finished_at >= start_of_day,
        )
    ).all()
    durations = [row.active_seconds for row in finished if row.state == "submitted" and row.active_seconds > 0]
    return {
        "available": _available_tasks_by_kind(db, user),
        "submitted_today": sum(1 for row in finished if row.state == "submitted"),
        "skipped_today": sum(1 for row in finished if row.state == "skipped"),
        "median_seconds": round(statistics.median(durations), 1) if durations else None,
        "can_write_prompts": any_writable_batch(db),
    }


def admin_summary(db: Session) -> dict:
    """Returns batch counts by status, labeling progress, recent runs and current models."""
    batches = dict(
        db.execute(
            select(PromptBatch.status, func.count())
            .where(PromptBatch.purpose == "collection")
            .group_by(PromptBatch.status)
        ).all()
    )
    progress = db.execute(
        select(func.coalesce(func.sum(Task.done_count), 0), func.coalesce(func.sum(Task.needed), 0))
    ).one()
    runs = db.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(10)).all()
    models = db.scalars(
        select(ModelVersion)
        .where(ModelVersion.status.in_(("promoted", "ready", "training")))
        .order_by(ModelVersion.id.desc())
        .limit(10)
    ).all()
    return {
        "batches_by_status": batches,
        "prompts": db.scalar(select(func.count()).select_from(Prompt)),
        "labels_done": int(progress[0]),
        "labels_needed": int(progress[1]),
        "labelers": db.scalar(select(func.count()).where(User.role == "labeler", User.is_active)),
        "recent_runs": runs,
        "models": models,
    }
