"""The admin's training API: start, watch and cancel training runs, and what the retrain schedule would start.

This is the JSON face of `app.runs` and `app.training`: runs started by hand
(their params validated against the trainer configs in
`app.training.configs`, 422 naming the field), the run list with progress,
one run with its curve, cancelling (the worker stops at its next step), and
the schedule. The admin pages in `app.training.pages` share its helpers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.collection import batches
from app.config import get_settings
from app.db import rowcount
from app.deps import AdminApi, SessionDep
from app.errors import FieldError
from app.models import TRAINING_KINDS, ModelVersion, PromptBatch, TrainingRun, utcnow
from app.runs import active_run, start_run
from app.training import data as training
from app.training.configs import param_specs, validate_params

router = APIRouter(prefix="/api/v1", tags=["runs"])

RunKind = Literal["pretrain", "sample", "sft", "rm", "ppo", "dpo", "validate"]
RunStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ManualRunKind = Literal["sft", "rm", "ppo", "dpo", "pretrain"]
ACTIVE = ("queued", "running")


# --- schemas -------------------------------------------------------------------------------------


class RunSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    status: str
    progress: float
    message: str
    batch_id: int | None
    triggered_by: str
    attempts: int
    worker: str | None
    error: str | None
    output_version_id: int | None
    created_at: datetime
    enqueued_at: datetime | None
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None


class RunOut(RunSummary):
    params: dict[str, Any]
    metrics: dict[str, Any] = Field(description="Live: `curve`, a list of {step, loss, ...}; at the end: final metrics")
    traceback: str | None
    checkpoint_dir: str | None


class RunIn(BaseModel):
    """A run started by hand; `params` are the trainer's config fields (see GET /api/v1/runs/params)."""

    model_config = ConfigDict(extra="forbid")

    kind: ManualRunKind
    params: dict[str, Any] = Field(default_factory=dict)


class Schedule(BaseModel):
    due: list[str] = Field(description="Stages with enough new data or a newer upstream model, in chain order")
    active: list[str] = Field(description="Stages with a queued or running run")
    next: str | None = Field(description="What beat's retrain check would start now")
    min_new_demonstrations: int
    min_new_rankings: int


# --- shared with the pages -----------------------------------------------------------------------


class RunRequestError(FieldError):
    """A user-caused problem with a run request; names the field and the HTTP status."""


def start_manual_run(db: Session, kind: str, params: dict[str, Any], username: str) -> TrainingRun:
    """Starts a run by hand; 422 naming the first bad setting in params, 409 while one of that kind is active
    or while it lacks what it starts from (a model, train data), saying what to do first."""
    params = validate_params(kind, params)
    if active_run(db, kind) is not None:
        raise RunRequestError("kind", f"a {kind} run is already queued or running", 409)
    missing = training.missing_for(db, kind)
    if missing is not None:  # the worker's own checks stay as a backstop for data deleted in between
        raise RunRequestError("kind", missing, 409)
    with db.begin_nested():  # a RunError (409, about `kind`) when another admin's run got in first
        return start_run(db, kind, params=params, triggered_by=f"admin:{username}"[:32])


def cancel_run(db: Session, run: TrainingRun, username: str) -> TrainingRun:
    """Cancels a queued or running run; its worker stops at its next step, its model is marked failed."""
    # Conditional, so a run that finishes at this moment is not overwritten.
    result = db.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run.id, TrainingRun.status.in_(ACTIVE))
        .values(status="cancelled", finished_at=utcnow(), message=f"cancelled by {username}")
    )
    db.refresh(run)
    if rowcount(result) != 1:
        raise RunRequestError(
            "status", f"run {run.id} is {run.status}; only a queued or running run can be cancelled", 409
        )
    db.execute(
        update(ModelVersion)
        .where(ModelVersion.training_run_id == run.id, ModelVersion.status == "training")
        .values(status="failed")
    )
    if run.kind == "sample" and run.batch_id is not None:
        # Without its sampling run the batch would wait forever; paused, an admin can resume it.
        batch = db.get(PromptBatch, run.batch_id)
        if batch is not None and batch.status == "sampling":
            batches.transition(db, batch, "paused")
    return run


def schedule_preview(db: Session) -> Schedule:
    """Says what the retrain schedule would start now, and why not when it would wait."""
    due = training.due_kinds(db)
    active = [kind for kind in TRAINING_KINDS if active_run(db, kind) is not None]
    return Schedule(
        due=due,
        active=active,
        next=None if active or not due else due[0],
        min_new_demonstrations=get_settings().retrain_min_new_demonstrations,
        min_new_rankings=get_settings().retrain_min_new_rankings,
    )


def get_run_or_404(db: Session, run_id: int) -> TrainingRun:
    """Loads a training run or answers 404."""
    run = db.get(TrainingRun, run_id)
    if run is None:
        raise HTTPException(404, f"training run {run_id} not found")
    return run


# --- training runs -------------------------------------------------------------------------------


@router.get("/runs", response_model=list[RunSummary])
def list_runs(
    db: SessionDep,
    principal: AdminApi,
    kind: Annotated[RunKind | None, Query()] = None,
    status: Annotated[RunStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
):
    """Lists training runs, most recent first, with status, progress and message."""
    query = select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)
    if kind is not None:
        query = query.where(TrainingRun.kind == kind)
    if status is not None:
        query = query.where(TrainingRun.status == status)
    return list(db.scalars(query))


@router.get("/runs/schedule", response_model=Schedule)
def run_schedule(db: SessionDep, principal: AdminApi):
    """Says which stages are due for retraining and what beat would start next."""
    return schedule_preview(db)


@router.get("/runs/params")
def run_params(principal: AdminApi) -> dict[str, dict[str, dict[str, Any]]]:
    """Lists the settings each kind of run accepts in `params`: type, default, help and allowed range."""
    return {kind: param_specs(kind) for kind in ("sft", "rm", "ppo", "dpo", "pretrain")}


@router.get("/runs/{run_id}", response_model=RunOut)
def get_run(run_id: int, db: SessionDep, principal: AdminApi):
    """Shows a run: status, progress, message, metrics with the loss curve, error and traceback."""
    return get_run_or_404(db, run_id)


@router.post("/runs", status_code=201, response_model=RunOut)
def create_run(body: RunIn, db: SessionDep, principal: AdminApi):
    """Starts an SFT, RM, PPO or pretraining run by hand; 409 while one of that kind is active."""
    return start_manual_run(db, body.kind, body.params, principal.user.username)


@router.post("/runs/{run_id}/cancel", response_model=RunOut)
def cancel(run_id: int, db: SessionDep, principal: AdminApi):
    """Cancels a queued or running run (the worker stops at its next step); 409 when it has finished."""
    run = get_run_or_404(db, run_id)
    cancel_run(db, run, principal.user.username)
    return run
