"""The admin API for people and the audit log: `/api/v1/users` and `/api/v1/audit` (scope `admin`).

The same services as the admin pages (`app.accounts.users`), so a change made here ends the same sessions,
returns the same leases and writes the same audit entries.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from app import audit
from app.accounts import users as people
from app.deps import AdminApi, SessionDep
from app.models import User
from app.vocabulary import MAX_ID

router = APIRouter(prefix="/api/v1")


class UserOut(BaseModel):
    id: int
    username: str
    role: str
    is_active: bool
    held_out: bool
    created_at: datetime
    last_login_at: datetime | None
    live_tokens: int = 0


class UserIn(BaseModel):
    username: str = Field(..., min_length=1, max_length=64)
    role: str = Field("labeler", description="labeler or admin")
    password: str | None = Field(None, max_length=1024, description="Empty: one is generated and returned once")


class NewUserOut(UserOut):
    password: str | None = Field(None, description="The generated password, shown only in this response")


class UserChange(BaseModel):
    role: str | None = Field(None, description="labeler or admin; ends the user's sessions")
    is_active: bool | None = Field(None, description="false deactivates: sessions end, leases return, labels stay")


class PasswordIn(BaseModel):
    password: str | None = Field(None, max_length=1024, description="Empty: one is generated and returned once")


class PasswordOut(BaseModel):
    password: str | None = Field(None, description="The generated password, shown only in this response")


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor_id: int | None
    actor: str
    action: str
    target: str
    ip: str
    details: dict[str, Any]


def _out(user: User, live_tokens: int = 0) -> dict[str, Any]:
    return UserOut.model_validate(user, from_attributes=True).model_dump() | {"live_tokens": live_tokens}


@router.get("/users", response_model=list[UserOut], tags=["admin"])
def list_users(db: SessionDep, principal: AdminApi) -> list[dict[str, Any]]:
    """Lists every account with its role, state, last login and live tokens."""
    return [_out(row.user, row.live_tokens) for row in people.list_users(db)]


@router.post("/users", response_model=NewUserOut, status_code=201, tags=["admin"])
def add_user(body: UserIn, request: Request, db: SessionDep, principal: AdminApi) -> NewUserOut:
    """Adds a labeler or admin; with no password, returns a generated one once."""
    user, generated = people.add_user(db, principal.user, body.username, body.role, body.password, request)
    return NewUserOut(**_out(user), password=generated)


@router.patch("/users/{user_id}", response_model=UserOut, tags=["admin"])
def change_user(
    user_id: int, body: UserChange, request: Request, db: SessionDep, principal: AdminApi
) -> dict[str, Any]:
    """Changes a user's role or active state; either ends their sessions."""
    user = people.get_user(db, user_id)
    if body.role is not None:
        user = people.change_role(db, principal.user, user_id, body.role, request)
    if body.is_active is not None:
        user = people.set_active(db, principal.user, user_id, body.is_active, request)
    return _out(user)


@router.post("/users/{user_id}/password", response_model=PasswordOut, tags=["admin"])
def reset_password(
    user_id: int, body: PasswordIn, request: Request, db: SessionDep, principal: AdminApi
) -> PasswordOut:
    """Sets a new password (or generates one, returned once); the user's other sessions end."""
    generated = people.reset_password(db, principal.user, user_id, body.password, request, principal.session)
    return PasswordOut(password=generated)


@router.get("/audit", response_model=list[AuditOut], tags=["admin"])
def list_audit(
    db: SessionDep,
    principal: AdminApi,
    action: Annotated[str | None, Query(max_length=64, description="An action, or a prefix ending in '.'")] = None,
    before_id: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Entries older than this id")] = None,
    limit: Annotated[int, Query(ge=1, le=audit.MAX_LIST)] = 100,
) -> list[AuditOut]:
    """Lists admin actions newest first: who, what, when and from which address."""
    return [AuditOut.model_validate(e, from_attributes=True) for e in audit.list_entries(db, action, before_id, limit)]
