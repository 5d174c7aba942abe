"""The model registry: which model versions exist, where they came from, and which one samples.

A version is registered `training` when its run starts, becomes `ready`
when its artifact is in place, and at most one version per kind is
`promoted` (enforced by a partial unique index). The policy that samples a
batch is the batch's own choice, else the promoted policy, else the newest
usable SFT or base model, so a fresh install can sample from its base model.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import ModelVersion, utcnow

USABLE = ("ready", "promoted")


class RegistryError(ValueError):
    """A user-caused registry problem; the message is safe to show."""


def register_version(
    db: Session,
    *,
    kind: str,
    name: str,
    artifact_path: str,
    status: str = "ready",
    parent_id: int | None = None,
    metrics: dict[str, Any] | None = None,
    data_snapshot: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
    training_run_id: int | None = None,
) -> ModelVersion:
    """Adds a model version."""
    if db.scalar(select(ModelVersion.id).where(ModelVersion.name == name)) is not None:
        raise RegistryError(f"name: a model version called '{name}' already exists")
    version = ModelVersion(
        kind=kind, name=name, artifact_path=artifact_path, status=status, parent_id=parent_id,
        metrics=metrics or {}, data_snapshot=data_snapshot or {}, lineage=lineage or {},
        training_run_id=training_run_id,
    )
    db.add(version)
    db.flush()
    return version


def register_base_model(db: Session, artifact_path: str, metrics: dict[str, Any] | None = None) -> ModelVersion:
    """Registers a base model and promotes it when no base is promoted yet; idempotent per path."""
    existing = db.scalar(
        select(ModelVersion).where(ModelVersion.kind == "base", ModelVersion.artifact_path == artifact_path)
    )
    if existing is not None:
        if metrics:
            existing.metrics = metrics
        return existing
    count = len(db.scalars(select(ModelVersion.id).where(ModelVersion.kind == "base")).all())
    version = register_version(db, kind="base", name=f"base-{count + 1}", artifact_path=artifact_path, metrics=metrics)
    if promoted(db, "base") is None:
        promote(db, version)
    return version


def promoted(db: Session, kind: str) -> ModelVersion | None:
    """Returns the promoted version of a kind, if any."""
    return db.scalar(select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.status == "promoted"))


def promote(db: Session, version: ModelVersion) -> ModelVersion:
    """Makes a version the promoted one of its kind; the previous one goes back to `ready`."""
    if version.status not in USABLE:
        raise RegistryError(f"status: only a ready model can be promoted; {version.name} is {version.status}")
    db.execute(
        update(ModelVersion)
        .where(ModelVersion.kind == version.kind, ModelVersion.status == "promoted", ModelVersion.id != version.id)
        .values(status="ready")
    )
    db.flush()
    version.status = "promoted"
    version.promoted_at = utcnow()
    db.flush()
    return version


def sampling_policy(db: Session, requested_id: int | None = None) -> ModelVersion | None:
    """Returns the model that should sample: the requested one, else the best promoted one."""
    if requested_id is not None:
        version = db.get(ModelVersion, requested_id)
        if version is None or version.status not in USABLE or version.kind == "rm":
            raise RegistryError(f"policy_version_id: {requested_id} is not a usable policy, SFT or base model")
        return version
    for kind in ("policy", "sft", "base"):
        version = promoted(db, kind) or db.scalar(
            select(ModelVersion)
            .where(ModelVersion.kind == kind, ModelVersion.status.in_(USABLE))
            .order_by(ModelVersion.id.desc())
            .limit(1)
        )
        if version is not None:
            return version
    return None
