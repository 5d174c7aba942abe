"""The audit log: who changed what, when and from which address.

Every admin action that changes the loop or its people (batch changes and imports, promotions, runs started
or cancelled, users and tokens changed, exports) calls `record` in the same transaction as the change, so an
entry exists exactly when the change was committed. Read back by the admin audit page and `GET /api/v1/audit`.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from sqlalchemy import Update, event, select
from sqlalchemy.orm import ORMExecuteState, Session

from app.models import AuditEntry, TrainingRun, User

MAX_LIST = 500


def client_address(request: Request | None) -> str:
    """The caller's address as uvicorn sees it (after the trusted proxies' X-Forwarded-For)."""
    if request is None or request.client is None:
        return ""
    return request.client.host[:64]


def record(
    db: Session,
    actor: User | None,
    action: str,
    target: str = "",
    request: Request | None = None,
    **details: Any,
) -> AuditEntry:
    """Adds one entry to the audit log in the caller's transaction."""
    entry = AuditEntry(
        actor_id=actor.id if actor is not None else None,
        actor=actor.username if actor is not None else "",
        action=action[:64],
        target=target[:200],
        ip=client_address(request),
        details=details,
    )
    db.add(entry)
    return entry


# --- training runs ---------------------------------------------------------------------------
#
# Runs are started and cancelled by the training stage's routes and by batch starts (a sampling run). Rather than
# each of those call sites, the session notices: a request's session knows who is asking (`remember_actor`, from
# `app.deps`), and a run inserted or cancelled in it is recorded as that person's action. Runs the scheduler starts
# (no person behind the session) are not admin actions and are not recorded.

ACTOR_KEY = "audit_actor"


def remember_actor(db: Session, user: User, request: Request | None) -> None:
    """Tells a request's session who is asking, for the entries its listeners write."""
    db.info[ACTOR_KEY] = (user.id, user.username, client_address(request))


def _entry_for(db: Session, action: str, target: str, **details: Any) -> None:
    actor_id, username, ip = db.info[ACTOR_KEY]
    db.add(AuditEntry(actor_id=actor_id, actor=username, action=action, target=target, ip=ip, details=details))


@event.listens_for(Session, "after_flush")
def _runs_started(db: Session, _flush: Any) -> None:
    if ACTOR_KEY not in db.info:
        return
    for obj in db.new:
        if isinstance(obj, TrainingRun):
            _entry_for(db, "run.started", f"run {obj.id} {obj.kind}", batch_id=obj.batch_id)


@event.listens_for(Session, "do_orm_execute")
def _runs_cancelled(state: ORMExecuteState) -> None:
    # The training stage cancels with one conditional UPDATE ... SET status='cancelled' WHERE id = :id.
    if not state.is_update or ACTOR_KEY not in state.session.info:
        return
    statement = state.statement
    if not isinstance(statement, Update) or state.bind_mapper is not TrainingRun.__mapper__:
        return
    params = statement.compile().params
    if params.get("status") != "cancelled":
        return
    run_ids = [v for k, v in params.items() if k.startswith("id_") and isinstance(v, int)]
    _entry_for(state.session, "run.cancelled", " ".join(f"run {i}" for i in run_ids) or "run")


def list_entries(
    db: Session, action: str | None = None, before_id: int | None = None, limit: int = 100
) -> list[AuditEntry]:
    """Lists entries newest first, optionally of one action (or a prefix ending in '.') and before an id."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(max(1, min(limit, MAX_LIST)))
    if action:
        if action.endswith("."):
            query = query.where(AuditEntry.action.startswith(action, autoescape=True))
        else:
            query = query.where(AuditEntry.action == action)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    return list(db.scalars(query))


def actions(db: Session) -> list[str]:
    """The action names recorded so far, for the page's filter."""
    return list(db.scalars(select(AuditEntry.action).distinct().order_by(AuditEntry.action)))
