"""Training runs as durable state: create, claim, report progress, finish, fail, reap.

Every background job is a `training_runs` row. A worker *claims* a run with
a conditional UPDATE (queued → running), so a message delivered twice, or a
second worker, does nothing. The worker writes heartbeats while it works;
the reaper puts runs with a stale heartbeat back in the queue, where the
next claim resumes them from their checkpoint. A failed run records its
error and never leaves a usable model behind.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import events
from app.config import get_settings
from app.db import rowcount
from app.errors import AppError
from app.models import RUN_KINDS, TRAINING_KINDS, ModelVersion, TrainingRun, utcnow
from app.outbox import enqueue_run

MAX_ATTEMPTS = 3


class RunError(AppError):
    """A user-caused problem starting a run, 409 unless told otherwise (one of its kind is active)."""

    status = 409


def start_run(
    db: Session,
    kind: str,
    *,
    batch_id: int | None = None,
    params: dict[str, Any] | None = None,
    triggered_by: str = "admin",
) -> TrainingRun:
    """Queues a run of `kind`; refuses a second active SFT, RM or PPO run."""
    if kind not in RUN_KINDS:
        raise RunError("kind", f"must be one of {', '.join(RUN_KINDS)}", 422)
    if kind in TRAINING_KINDS and active_run(db, kind) is not None:
        raise RunError("kind", f"a {kind} run is already queued or running")
    run = TrainingRun(kind=kind, batch_id=batch_id, params=params or {}, triggered_by=triggered_by)
    try:
        with db.begin_nested():
            enqueue_run(db, run)
    except IntegrityError as exc:  # two admins at once: the partial unique index decides
        raise RunError("kind", f"a {kind} run is already queued or running") from exc
    return run


def active_run(db: Session, kind: str) -> TrainingRun | None:
    """Returns the queued or running run of a kind, if any."""
    return db.scalar(
        select(TrainingRun).where(TrainingRun.kind == kind, TrainingRun.status.in_(("queued", "running"))).limit(1)
    )


def worker_name() -> str:
    """Names this process for the run's `worker` column."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_run(db: Session, run_id: int) -> bool:
    """Marks a queued run as running by this worker; False when someone else has it or it is done."""
    now = utcnow()
    result = db.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == "queued")
        .values(
            status="running",
            worker=worker_name(),
            heartbeat_at=now,
            attempts=TrainingRun.attempts + 1,
            started_at=now,
            error=None,
            traceback=None,
        )
    )
    return rowcount(result) == 1


def heartbeat(
    db: Session,
    run_id: int,
    progress: float | None = None,
    message: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> bool:
    """Records progress; returns False when the run is no longer ours to work on (cancelled, reaped)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, float(progress)))
    if message is not None:
        values["message"] = message[:2000]
    if metrics is not None:
        values["metrics"] = metrics
    result = db.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == "running", TrainingRun.worker == worker_name())
        .values(**values)
    )
    return rowcount(result) == 1


def is_held(db: Session, run_id: int) -> bool:
    """Whether this worker still holds a running run (a read, for checks between heartbeats)."""
    return (
        db.scalar(
            select(TrainingRun.id).where(
                TrainingRun.id == run_id, TrainingRun.status == "running", TrainingRun.worker == worker_name()
            )
        )
        is not None
    )


def finish_run(
    db: Session,
    run_id: int,
    *,
    metrics: dict[str, Any] | None = None,
    output_version_id: int | None = None,
    message: str = "done",
) -> bool:
    """Marks a run succeeded if this worker still holds it; False when it was cancelled or reaped meanwhile."""
    run = db.scalar(
        select(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == "running", TrainingRun.worker == worker_name())
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if run is None:
        return False
    final = dict(metrics or {})
    # Keep the step-by-step curve the heartbeats recorded; the trainer's result replaces the rest.
    if "curve" not in final and (run.metrics or {}).get("curve"):
        final["curve"] = run.metrics["curve"]
    run.status, run.progress, run.finished_at, run.message = "succeeded", 1.0, utcnow(), message
    run.output_version_id = output_version_id
    run.metrics = final
    db.flush()
    return True


def fail_run(db: Session, run_id: int, error: str, tb: str | None = None) -> None:
    """Marks a run failed and any model version it was producing failed too."""
    failed = db.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status.in_(("queued", "running")))
        .values(status="failed", error=error[:4000], traceback=tb, finished_at=utcnow())
        .returning(TrainingRun.kind, TrainingRun.batch_id)
    ).first()
    if failed is not None:
        events.emit(
            db,
            "training_run.failed",
            {"run_id": run_id, "kind": failed.kind, "batch_id": failed.batch_id, "error": error[:500]},
        )
    db.execute(
        update(ModelVersion)
        .where(ModelVersion.training_run_id == run_id, ModelVersion.status.in_(("training", "validating")))
        .values(status="failed", error=error[:4000])
    )


def reap_stale_runs(db: Session) -> list[int]:
    """Re-queues running runs whose heartbeat stopped; fails those out of attempts. Returns their ids."""
    cutoff = utcnow() - timedelta(seconds=get_settings().run_stale_after_s)
    stale = db.scalars(
        select(TrainingRun)
        .where(TrainingRun.status == "running", TrainingRun.heartbeat_at < cutoff)
        .with_for_update(skip_locked=True)
    ).all()
    for run in stale:
        if run.attempts >= MAX_ATTEMPTS:
            fail_run(db, run.id, f"worker {run.worker} stopped answering {run.attempts} times; giving up")
        else:
            # enqueued_at NULL puts it back in the outbox; the next claim resumes from the checkpoint.
            run.status = "queued"
            run.enqueued_at = None
            run.message = f"re-queued: worker {run.worker} stopped answering"
    return [run.id for run in stale]
