"""The audit log: who changed what, when and from which address.

Every admin action that changes the loop or its people (batch changes and imports, promotions, runs started
or cancelled, users and tokens changed, exports) calls `record` in the same transaction as the change, so an
entry exists exactly when the change was committed. Read back by the admin audit page and `GET /api/v1/audit`.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import AuditEntry, User

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
