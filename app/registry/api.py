"""The admin's registry and training API: model versions with lineage, promotion, rollback, training runs.

This is the JSON face of `app.registry.versions` and `app.runs`:
list and inspect model versions (where each came from, what data it saw,
its metrics), promote one, roll a kind back to the version promoted before,
and start, watch and cancel training runs. The admin pages in
`app.registry.pages` call the helpers here (`start_manual_run`,
`cancel_run`, `schedule_preview`), so both faces refuse the same things with
the same messages. Callers use an admin session (X-CSRF-Token on writes) or
a token with the `admin` scope.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db import rowcount
from app.deps import AdminApi, SessionDep
from app.models import ModelVersion, PromptBatch, TrainingRun, utcnow
from app.collection import batches
from app.registry import versions as registry
from app.training import data as training
from app.training.configs import param_specs, validate_params
from app.quality.behaviour import model_behaviour
from app.errors import FieldError
from app.runs import active_run, start_run

router = APIRouter(prefix="/api/v1", tags=["models and runs"])

ModelKind = Literal["base", "sft", "rm", "policy"]
ModelStatus = Literal["training", "ready", "failed", "promoted", "retired"]
RunKind = Literal["pretrain", "sample", "sft", "rm", "ppo"]
RunStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ManualRunKind = Literal["sft", "rm", "ppo", "pretrain"]
ACTIVE = ("queued", "running")


# --- schemas -------------------------------------------------------------------------------------


class ModelRef(BaseModel):
    """Another version named in a lineage; `name` is null when the version no longer exists."""

    id: int
    name: str | None
    kind: str | None
    status: str | None


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    kind: str
    status: str
    parent_id: int | None
    lineage: dict[str, Any] = Field(description="Secondary parents by role, as ids, e.g. {\"sft\": 3, \"rm\": 4}")
    data_snapshot: dict[str, Any] = Field(description="Counts and id ranges of the data it was trained on")
    artifact_path: str
    training_run_id: int | None
    created_at: datetime
    promoted_at: datetime | None = Field(description="Its latest promotion; cleared when rolled back from")
    key_metrics: dict[str, Any] = Field(default_factory=dict, description="The metrics that compare this kind")


class ModelDetail(ModelOut):
    metrics: dict[str, Any]
    parents: list[ModelRef] = Field(description="Parent chain, nearest first")
    lineage_versions: dict[str, ModelRef] = Field(description="The lineage ids resolved to versions")
    children: list[ModelRef]


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
    """Starts a run by hand; 422 naming the first bad setting in params, 409 while one of that kind is active."""
    params = validate_params(kind, params)
    if active_run(db, kind) is not None:
        raise RunRequestError("kind", f"a {kind} run is already queued or running", 409)
    with db.begin_nested():  # a RunError (409, about `kind`) when another admin's run got in first
        return start_run(db, kind, params=params, triggered_by=f"admin:{username}"[:32])


def cancel_run(db: Session, run: TrainingRun, username: str) -> TrainingRun:
    """Cancels a queued or running run; its worker stops at its next heartbeat, its model is marked failed."""
    # Conditional, so a run that finishes at this moment is not overwritten.
    result = db.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run.id, TrainingRun.status.in_(ACTIVE))
        .values(status="cancelled", finished_at=utcnow(), message=f"cancelled by {username}")
    )
    db.refresh(run)
    if rowcount(result) != 1:
        raise RunRequestError("status", f"run {run.id} is {run.status}; only a queued or running run can be cancelled",
                              409)
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
    active = [kind for kind in ("sft", "rm", "ppo") if active_run(db, kind) is not None]
    return Schedule(due=due, active=active, next=None if active or not due else due[0],
                    min_new_demonstrations=get_settings().retrain_min_new_demonstrations,
                    min_new_rankings=get_settings().retrain_min_new_rankings)


def get_version_or_404(db: Session, version_id: int) -> ModelVersion:
    """Loads a model version or answers 404."""
    version = db.get(ModelVersion, version_id)
    if version is None:
        raise HTTPException(404, f"model version {version_id} not found")
    return version


def get_run_or_404(db: Session, run_id: int) -> TrainingRun:
    """Loads a training run or answers 404."""
    run = db.get(TrainingRun, run_id)
    if run is None:
        raise HTTPException(404, f"training run {run_id} not found")
    return run


def model_out(version: ModelVersion) -> ModelOut:
    """Serialises a version with its key metrics."""
    out = ModelOut.model_validate(version)
    out.key_metrics = registry.key_metrics(version)
    return out


def model_detail(db: Session, version: ModelVersion) -> ModelDetail:
    """Serialises a version with all its metrics and its lineage resolved to names."""
    found = registry.lineage(db, version)
    return ModelDetail(
        **model_out(version).model_dump(), metrics=version.metrics or {}, parents=found["parents"],
        lineage_versions=found["lineage"], children=found["children"],
    )


# --- model versions ------------------------------------------------------------------------------


@router.get("/models", response_model=list[ModelOut])
def list_models(db: SessionDep, principal: AdminApi, kind: ModelKind | None = Query(None),
                status: ModelStatus | None = Query(None)):
    """Lists model versions, newest first, with their key metrics."""
    query = select(ModelVersion).order_by(ModelVersion.id.desc())
    if kind is not None:
        query = query.where(ModelVersion.kind == kind)
    if status is not None:
        query = query.where(ModelVersion.status == status)
    return [model_out(v) for v in db.scalars(query)]


@router.get("/models/{version_id}", response_model=ModelDetail)
def get_model(version_id: int, db: SessionDep, principal: AdminApi):
    """Shows a version: parent chain, named parents, children, data snapshot and all metrics."""
    return model_detail(db, get_version_or_404(db, version_id))


@router.get("/models/{version_id}/behaviour")
def model_behaviour_api(version_id: int, db: SessionDep, principal: AdminApi) -> dict[str, Any]:
    """Rates of each metadata flag and the mean Likert score over this version's ranked outputs, with 95 % intervals."""
    return model_behaviour(db, get_version_or_404(db, version_id).id).as_dict()


@router.post("/models/rollback", response_model=ModelDetail)
def rollback_model(db: SessionDep, principal: AdminApi, kind: ModelKind = Query(...)):
    """Promotes the version of `kind` promoted before the current one; 409 when there is none."""
    return model_detail(db, registry.rollback(db, kind))


@router.post("/models/{version_id}/promote", response_model=ModelDetail)
def promote_model(version_id: int, db: SessionDep, principal: AdminApi):
    """Makes a ready version the promoted one of its kind (the previous one becomes ready); 409 otherwise."""
    version = get_version_or_404(db, version_id)
    if version.status != "promoted":  # promoting the promoted one changes nothing, not even its history
        registry.promote(db, version)
    return model_detail(db, version)


@router.post("/models/{version_id}/retire", response_model=ModelDetail)
def retire_model(version_id: int, db: SessionDep, principal: AdminApi):
    """Retires a ready version; 409 for the promoted one or one that is not ready."""
    version = get_version_or_404(db, version_id)
    registry.retire(db, version)
    return model_detail(db, version)


# --- training runs -------------------------------------------------------------------------------


@router.get("/runs", response_model=list[RunSummary])
def list_runs(db: SessionDep, principal: AdminApi, kind: RunKind | None = Query(None),
              status: RunStatus | None = Query(None), limit: int = Query(50, ge=1, le=500)):
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
    return {kind: param_specs(kind) for kind in ("sft", "rm", "ppo", "pretrain")}


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
    """Cancels a queued or running run (the worker stops at its next heartbeat); 409 when it has finished."""
    run = get_run_or_404(db, run_id)
    cancel_run(db, run, principal.user.username)
    return run
