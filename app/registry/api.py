"""The admin's registry API: model versions with lineage and metrics, promotion, rollback, behaviour.

This is the JSON face of `app.registry.versions`: list and inspect model
versions (where each came from, what data it saw, its metrics), promote one,
and roll a kind back to the version promoted before. The admin pages in
`app.registry.pages` share its helpers, so both faces refuse the same things
with the same messages. Callers use an admin session (X-CSRF-Token on writes)
or a token with the `admin` scope.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import audit
from app.deps import AdminApi, SessionDep
from app.models import ModelVersion
from app.quality.behaviour import model_behaviour
from app.registry import versions as registry

router = APIRouter(prefix="/api/v1", tags=["models"])

ModelKind = Literal["base", "sft", "rm", "policy"]
ModelStatus = Literal["training", "validating", "ready", "failed", "promoted", "retired"]


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
    lineage: dict[str, Any] = Field(description='Secondary parents by role, as ids, e.g. {"sft": 3, "rm": 4}')
    data_snapshot: dict[str, Any] = Field(description="Counts and id ranges of the data it was trained on")
    artifact_path: str
    training_run_id: int | None
    created_at: datetime
    promoted_at: datetime | None = Field(description="Its latest promotion; cleared when rolled back from")
    key_metrics: dict[str, Any] = Field(default_factory=dict, description="The metrics that compare this kind")
    source: str | None = Field(None, description="The folder or hub id a registered model came from")
    revision: str | None = None
    error: str | None = Field(None, description="Why validation failed (status failed)")
    facts: dict[str, Any] = Field(default_factory=dict, description="What validation found: architecture, size, ...")


class ModelRegistration(BaseModel):
    """A model to bring in: a local folder (as the worker sees it) or a Hugging Face hub id."""

    source: str = Field(description="A local model folder or a hub id such as 'Qwen/Qwen2-0.5B'")
    name: str = Field(description="A unique name for the new version")
    kind: str = Field("base", description="base, sft, rm or policy")
    revision: str | None = Field(None, description="A hub branch, tag or commit")
    promote: bool = Field(False, description="Promote it once validation succeeds")


class ModelDetail(ModelOut):
    metrics: dict[str, Any]
    parents: list[ModelRef] = Field(description="Parent chain, nearest first")
    lineage_versions: dict[str, ModelRef] = Field(description="The lineage ids resolved to versions")
    children: list[ModelRef]


# --- shared with the pages -----------------------------------------------------------------------


def get_version_or_404(db: Session, version_id: int) -> ModelVersion:
    """Loads a model version or answers 404."""
    version = db.get(ModelVersion, version_id)
    if version is None:
        raise HTTPException(404, f"model version {version_id} not found")
    return version


def model_out(version: ModelVersion) -> ModelOut:
    """Serialises a version with its key metrics."""
    out = ModelOut.model_validate(version)
    out.key_metrics = registry.key_metrics(version)
    return out


def model_detail(db: Session, version: ModelVersion) -> ModelDetail:
    """Serialises a version with all its metrics and its lineage resolved to names."""
    found = registry.lineage(db, version)
    return ModelDetail(
        **model_out(version).model_dump(),
        metrics=version.metrics or {},
        parents=found["parents"],
        lineage_versions=found["lineage"],
        children=found["children"],
    )


# --- model versions ------------------------------------------------------------------------------


@router.get("/models", response_model=list[ModelOut])
def list_models(
    db: SessionDep,
    principal: AdminApi,
    kind: Annotated[ModelKind | None, Query()] = None,
    status: Annotated[ModelStatus | None, Query()] = None,
):
    """Lists model versions, newest first, with their key metrics."""
    query = select(ModelVersion).order_by(ModelVersion.id.desc())
    if kind is not None:
        query = query.where(ModelVersion.kind == kind)
    if status is not None:
        query = query.where(ModelVersion.status == status)
    return [model_out(v) for v in db.scalars(query)]


@router.post("/models", response_model=ModelDetail, status_code=202)
def register_model(body: ModelRegistration, request: Request, db: SessionDep, principal: AdminApi):
    """Registers a model from a folder or hub id; 202 with the version `validating` while a worker checks it."""
    version = registry.register_model(
        db, body.source, body.name, kind=body.kind, revision=body.revision, promote=body.promote
    )
    audit.record(
        db, principal.user, "model.registered", f"model {version.id} {version.name}", request, source=body.source
    )
    return model_detail(db, version)


@router.get("/models/{version_id}", response_model=ModelDetail)
def get_model(version_id: int, db: SessionDep, principal: AdminApi):
    """Shows a version: parent chain, named parents, children, data snapshot and all metrics."""
    return model_detail(db, get_version_or_404(db, version_id))


@router.get("/models/{version_id}/behaviour")
def model_behaviour_api(version_id: int, db: SessionDep, principal: AdminApi) -> dict[str, Any]:
    """Rates of each metadata flag and the mean Likert score over this version's ranked outputs, with 95 % intervals."""
    return model_behaviour(db, get_version_or_404(db, version_id).id).as_dict()


@router.post("/models/rollback", response_model=ModelDetail)
def rollback_model(request: Request, db: SessionDep, principal: AdminApi, kind: Annotated[ModelKind, Query()]):
    """Promotes the version of `kind` promoted before the current one; 409 when there is none."""
    version = registry.rollback(db, kind)
    audit.record(db, principal.user, "model.rolled_back", f"model {version.id} {version.name}", request, kind=kind)
    return model_detail(db, version)


@router.post("/models/{version_id}/promote", response_model=ModelDetail)
def promote_model(version_id: int, request: Request, db: SessionDep, principal: AdminApi):
    """Makes a ready version the promoted one of its kind (the previous one becomes ready); 409 otherwise."""
    version = get_version_or_404(db, version_id)
    if version.status != "promoted":  # promoting the promoted one changes nothing, not even its history
        registry.promote(db, version)
        audit.record(db, principal.user, "model.promoted", f"model {version.id} {version.name}", request)
    return model_detail(db, version)


@router.post("/models/{version_id}/retire", response_model=ModelDetail)
def retire_model(version_id: int, request: Request, db: SessionDep, principal: AdminApi):
    """Retires a ready version; 409 for the promoted one or one that is not ready."""
    version = get_version_or_404(db, version_id)
    registry.retire(db, version)
    audit.record(db, principal.user, "model.retired", f"model {version.id} {version.name}", request)
    return model_detail(db, version)
