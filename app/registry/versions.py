"""The model registry: which model versions exist, where they came from, and which one samples.

A version is registered `training` when its run starts, becomes `ready`
when its artifact is in place, and at most one version per kind is
`promoted` (enforced by a partial unique index). The policy that samples a
batch is the batch's own choice, else the promoted policy, else the newest
usable SFT or base model, so a fresh install can sample from its base model.
Admins promote, roll back to the previously promoted version, or retire a
version; `lineage` answers where a version came from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app import events, runs
from app.config import get_settings
from app.errors import AppError, Invalid
from app.models import MODEL_KINDS, Evaluation, ModelVersion, TrainingRun, promoted_version, utcnow
from app.quality import evaluations
from app.vocabulary import USABLE_STATUSES

# The registry's name for it; `promoted_version` lives with the table so earlier stages can ask too.
promoted = promoted_version


class RegistryError(AppError):
    """A user-caused registry problem, 409 unless told otherwise (the version's state forbids it)."""

    status = 409


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
        raise RegistryError("name", f"a model version called '{name}' already exists")
    version = ModelVersion(
        kind=kind,
        name=name,
        artifact_path=artifact_path,
        status=status,
        parent_id=parent_id,
        metrics=metrics or {},
        data_snapshot=data_snapshot or {},
        lineage=lineage or {},
        training_run_id=training_run_id,
    )
    db.add(version)
    db.flush()
    if status == "ready":
        _announce(db, "model_version.registered", version)
    return version


def _announce(db: Session, event: str, version: ModelVersion) -> None:
    events.emit(
        db,
        event,
        {
            "model_version_id": version.id,
            "name": version.name,
            "kind": version.kind,
            "status": version.status,
            "parent_id": version.parent_id,
        },
    )


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


# A hub id: "name" or "owner/name" (letters, digits, '-', '_', '.'), as the Hugging Face Hub spells them.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _where(source: str) -> str:
    """The absolute folder or the hub id a source names; 422 when it is neither."""
    path = Path(source).expanduser()
    looks_local = source.startswith(("/", ".", "~")) or path.exists()
    if looks_local and not path.is_dir():
        what = "is a file, not a model folder" if path.exists() else "does not exist"
        raise Invalid("source", f"{source} {what}")
    if not looks_local and not HUB_ID.match(source):
        raise Invalid("source", f"{source} is neither an existing folder nor a hub id like 'owner/name'")
    return str(path.resolve()) if looks_local else source


def ensure_configured_base_model(db: Session, source: str) -> tuple[ModelVersion, bool]:
    """Registers and promotes the deployment's base model (INSTRUCTLOOP_BASE_MODEL) once; (version, whether new)."""
    where = _where(source.strip())
    existing = db.scalar(
        select(ModelVersion)
        .where(ModelVersion.kind == "base", (ModelVersion.source == where) | (ModelVersion.artifact_path == where))
        .order_by(ModelVersion.id)
        .limit(1)
    )
    if existing is not None:
        return existing, False
    stem = re.sub(r"[^\w.-]+", "-", where.rstrip("/").rsplit("/", 1)[-1]).strip("-") or "model"
    name, n = f"base-{stem}"[:120], 1
    while db.scalar(select(ModelVersion.id).where(ModelVersion.name == name)) is not None:
        n += 1
        name = f"base-{stem}"[:120] + f"-{n}"
    return register_model(db, where, name, kind="base", promote=True), True


def register_model(
    db: Session,
    source: str,
    name: str,
    kind: str = "base",
    revision: str | None = None,
    promote: bool = False,
) -> ModelVersion:
    """Registers a model from a folder or hub id as `validating` and queues the worker job that validates it."""
    source = (source or "").strip()
    name = (name or "").strip()
    revision = (revision or "").strip() or None
    if not source:
        raise Invalid("source", "give a local folder or a Hugging Face hub id")
    if not name:
        raise Invalid("name", "give the version a name")
    if len(name) > 128:
        raise Invalid("name", "at most 128 characters")
    if kind not in MODEL_KINDS:
        raise Invalid("kind", f"must be one of {', '.join(MODEL_KINDS)}")
    artifact = _where(source)
    # Checked here too (register_version checks again) so a duplicate name never queues a job.
    if db.scalar(select(ModelVersion.id).where(ModelVersion.name == name)) is not None:
        raise RegistryError("name", f"a model version called '{name}' already exists")
    version = register_version(db, kind=kind, name=name, artifact_path=artifact, status="validating")
    version.source, version.revision = artifact, revision
    run = runs.start_run(
        db,
        "validate",
        params={"version_id": version.id, "promote": bool(promote)},
        triggered_by="registration",
    )
    version.training_run_id = run.id
    db.flush()
    return version


def record_facts(db: Session, version_id: int, facts: dict[str, Any], artifact_path: str | None = None) -> ModelVersion:
    """Stores what validation found on a version (the worker calls this before the run finishes).

    artifact_path, when given, is where the validated files now lie (a hub model pinned to the revision
    that was validated), and what sampling and training load from then on.
    """
    version = db.get(ModelVersion, version_id)
    if version is None:
        raise RegistryError("version_id", f"no model version {version_id}", status=404)
    version.facts = facts
    if artifact_path is not None:
        version.artifact_path = artifact_path
    db.flush()
    return version


def _promotion_asked(db: Session, version: ModelVersion) -> bool:
    run = db.get(TrainingRun, version.training_run_id) if version.training_run_id is not None else None
    return run is not None and run.kind == "validate" and bool((run.params or {}).get("promote"))


def mark_ready(db: Session, version_id: int, metrics: dict[str, Any] | None = None) -> ModelVersion:
    """Records a finished model's metrics and makes it usable; the first of its kind is promoted.

    A registered model (validated, not trained) is also promoted when its registration asked for it.
    """
    version = db.get(ModelVersion, version_id)
    if version is None:
        raise RegistryError("version_id", f"no model version {version_id}", status=404)
    if metrics is not None:
        version.metrics = metrics
    if version.status == "validating":
        version.status, version.error = "ready", None
        db.flush()
        _announce(db, "model_version.registered", version)
        if promoted(db, version.kind) is None:
            promote(db, version)
        elif _promotion_asked(db, version):
            try:
                with db.begin_nested():
                    promote(db, version)
            except RegistryError as exc:  # e.g. the blind-evaluation gate: the version stays ready, and says why
                version.facts = {**(version.facts or {}), "promotion_refused": exc.message}
        return version
    if version.status == "training":
        version.status = "ready"
        db.flush()
        _announce(db, "model_version.registered", version)
        if promoted(db, version.kind) is None:
            promote(db, version)
        elif version.kind == "policy":
            # A new policy is judged by people, blind, against the one in use (when the settings ask).
            evaluations.schedule_after_policy(db, version)
    return version


def promote(db: Session, version: ModelVersion, *, gated: bool = True) -> ModelVersion:
    """Makes a version the promoted one of its kind; the previous one goes back to `ready`.

    With `Settings.promotion_requires_eval_win`, a policy must first win a blind evaluation against the
    promoted one (`gated=False` skips that, for rollbacks to a version that was promoted before).
    """
    if version.status not in USABLE_STATUSES:
        raise RegistryError("status", f"only a ready model can be promoted; {version.name} is {version.status}")
    if gated and (why := evaluations.promotion_block(db, version)) is not None:
        raise RegistryError("status", why)
    db.execute(
        update(ModelVersion)
        .where(ModelVersion.kind == version.kind, ModelVersion.status == "promoted", ModelVersion.id != version.id)
        .values(status="ready")
    )
    db.flush()
    version.status = "promoted"
    version.promoted_at = utcnow()
    db.flush()
    _announce(db, "model_version.promoted", version)
    return version


def rollback_target(db: Session, kind: str) -> ModelVersion | None:
    """Returns the version a rollback of `kind` would promote: the one promoted before the current one."""
    current = promoted(db, kind)
    query = select(ModelVersion).where(
        ModelVersion.kind == kind, ModelVersion.status == "ready", ModelVersion.promoted_at.is_not(None)
    )
    if current is not None and current.promoted_at is not None:
        query = query.where(ModelVersion.promoted_at < current.promoted_at)
    return db.scalar(query.order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc()).limit(1))


def rollback(db: Session, kind: str) -> ModelVersion:
    """Promotes the version of `kind` that was promoted before the current one; returns it.

    `promoted_at` records each version's latest promotion, so the versions
    with one, in that order, are the promotion history. The version rolled
    back from leaves that history (its `promoted_at` is cleared): a second
    rollback goes one step further back instead of toggling between two.
    """
    target = rollback_target(db, kind)
    if target is None:
        raise RegistryError("kind", f"no earlier promoted {kind} model to roll back to")
    current = promoted(db, kind)
    promote(db, target, gated=False)
    if current is not None:
        current.promoted_at = None
    db.flush()
    return target


def retire(db: Session, version: ModelVersion) -> ModelVersion:
    """Retires a ready version so that it is neither promoted nor sampled from again."""
    if version.status == "promoted":
        raise RegistryError("status", f"{version.name} is promoted; promote another {version.kind} model first")
    if version.status != "ready":
        raise RegistryError("status", f"only a ready model can be retired; {version.name} is {version.status}")
    version.status = "retired"
    db.flush()
    return version


# What to compare versions of a kind by, as (path into metrics, label).
KEY_METRICS: dict[str, list[tuple[str, str]]] = {
    "base": [("final_held_out_loss", "held-out loss"), ("parameters", "parameters")],
    "sft": [("valid_loss", "valid loss"), ("train_loss", "train loss")],
    "rm": [("valid_accuracy", "valid accuracy"), ("valid_loss", "valid loss")],
    "policy": [("eval.reward", "eval reward"), ("eval.kl", "KL to SFT")],
}


def key_metrics(version: ModelVersion) -> dict[str, Any]:
    """Returns the few metrics that compare versions of this kind, keyed by their dotted path."""
    out: dict[str, Any] = {}
    for path, _ in KEY_METRICS.get(version.kind, []):
        value: Any = version.metrics or {}
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[path] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return out


def _summary(version: ModelVersion) -> dict[str, Any]:
    return {"id": version.id, "name": version.name, "kind": version.kind, "status": version.status}


def base_of(db: Session, version: ModelVersion, max_depth: int = 100) -> ModelVersion | None:
    """The base model a version descends from along its parents (itself if it is one); None if none is found."""
    seen: set[int] = set()
    current: ModelVersion | None = version
    while current is not None and current.kind != "base" and current.id not in seen and len(seen) < max_depth:
        seen.add(current.id)
        current = db.get(ModelVersion, current.parent_id) if current.parent_id is not None else None
    return current


def lineage(db: Session, version: ModelVersion, max_depth: int = 100) -> dict[str, Any]:
    """Returns where a version came from: its parent chain (nearest first), named secondary parents, children."""
    parents: list[dict[str, Any]] = []
    seen = {version.id}
    parent_id = version.parent_id
    while parent_id is not None and parent_id not in seen and len(parents) < max_depth:
        parent = db.get(ModelVersion, parent_id)
        if parent is None:
            break
        parents.append(_summary(parent))
        seen.add(parent.id)
        parent_id = parent.parent_id
    refs = {role: ref for role, ref in (version.lineage or {}).items() if isinstance(ref, int)}
    found = {v.id: v for v in db.scalars(select(ModelVersion).where(ModelVersion.id.in_(list(refs.values()))))}
    named = {
        role: _summary(found[ref]) if ref in found else {"id": ref, "name": None, "kind": None, "status": None}
        for role, ref in refs.items()
    }
    children = db.scalars(select(ModelVersion).where(ModelVersion.parent_id == version.id).order_by(ModelVersion.id))
    return {"parents": parents, "lineage": named, "children": [_summary(c) for c in children]}


@events.on("evaluation.completed")
def promote_if_won(db: Session, event: str, payload: dict[str, Any]) -> None:
    """With the promotion gate on, a scheduled evaluation that the new policy won promotes it."""
    evaluation = db.get(Evaluation, payload["evaluation_id"])
    if not get_settings().promotion_requires_eval_win or evaluation is None or evaluation.triggered_by != "schedule":
        return
    candidate = db.get(ModelVersion, evaluation.model_a_id)
    current = promoted(db, "policy")
    if (
        candidate is None
        or candidate.kind != "policy"
        or candidate.status != "ready"
        or current is None
        or current.id != evaluation.model_b_id
    ):
        return
    if evaluations.has_won(db, candidate.id, current.id):
        promote(db, candidate)
