"""Admin pages for people and access: users (add, role, password, deactivate), API tokens and the audit log.

Every form carries the session's CSRF token (checked by the page dependency); secrets (a generated password,
a new token) are shown once, in the answer to the form that made them, and never stored in plain text.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import audit
from app.accounts import users as people
from app.deps import AdminPage, Principal, SessionDep
from app.errors import AppError, FieldError, NotFound, renders_on_error
from app.models import ROLES, ApiToken, User, utcnow
from app.security import create_api_token, parse_scopes, revoke_api_token
from app.templating import render
from app.vocabulary import TOKEN_SCOPES

router = APIRouter(include_in_schema=False)

MAX_TOKEN_DAYS = 3650


# --- users -------------------------------------------------------------------------------------


def _users_page(
    request: Request, principal: Principal, db: Session, status_code: int = 200, **context: Any
) -> Response:
    return render(
        request,
        "accounts/users.html",
        principal,
        status_code=status_code,
        rows=people.list_users(db),
        roles=ROLES,
        me=principal.user.id,
        **context,
    )


@router.get("/admin/users")
def users_page(request: Request, principal: AdminPage, db: SessionDep) -> Response:
    """Lists every account with its role, state and last login."""
    return _users_page(request, principal, db)


def _users_again(exc: AppError, request: Request, principal: Principal, db: Session, **_: Any) -> Response:
    return _users_page(request, principal, db, status_code=exc.status, error=str(exc))


@router.post("/admin/users")
@renders_on_error(_users_again)
def add_user_form(
    request: Request,
    principal: AdminPage,
    db: SessionDep,
    username: Annotated[str, Form(max_length=64)],
    role: Annotated[str, Form()] = "labeler",
    password: Annotated[str, Form(max_length=1024)] = "",
) -> Response:
    """Adds a labeler or admin; with no password, one is generated and shown once."""
    user, generated = people.add_user(db, principal.user, username, role, password or None, request)
    return _users_page(
        request,
        principal,
        db,
        status_code=201,
        flash=f"Added {user.role} {user.username}.",
        secret=generated,
        secret_for=user.username,
    )


@router.post("/admin/users/{user_id}/role")
@renders_on_error(_users_again)
def change_role_form(
    user_id: int, request: Request, principal: AdminPage, db: SessionDep, role: Annotated[str, Form()]
) -> Response:
    """Changes a user's role; their sessions end."""
    user = people.change_role(db, principal.user, user_id, role, request)
    return _users_page(request, principal, db, flash=f"{user.username} is now {user.role}; their sessions ended.")


@router.post("/admin/users/{user_id}/password")
@renders_on_error(_users_again)
def reset_password_form(
    user_id: int,
    request: Request,
    principal: AdminPage,
    db: SessionDep,
    password: Annotated[str, Form(max_length=1024)] = "",
) -> Response:
    """Sets a new password, or generates a one-time one shown once; the user's other sessions end."""
    generated = people.reset_password(db, principal.user, user_id, password or None, request, principal.session)
    user = people.get_user(db, user_id)
    return _users_page(
        request,
        principal,
        db,
        flash=f"New password set for {user.username}.",
        secret=generated,
        secret_for=user.username,
    )


@router.post("/admin/users/{user_id}/active")
@renders_on_error(_users_again)
def set_active_form(
    user_id: int, request: Request, principal: AdminPage, db: SessionDep, active: Annotated[bool, Form()]
) -> Response:
    """Deactivates (or reactivates) a user: sessions end, leases return to the pool, labels stay."""
    user = people.set_active(db, principal.user, user_id, active, request)
    state = "reactivated" if user.is_active else "deactivated; their sessions ended and their leases went back"
    return _users_page(request, principal, db, flash=f"{user.username} {state}.")


# --- tokens ------------------------------------------------------------------------------------


def _tokens_page(
    request: Request, principal: Principal, db: Session, status_code: int = 200, **context: Any
) -> Response:
    rows = db.execute(
        select(ApiToken, User.username).join(User, User.id == ApiToken.user_id).order_by(ApiToken.id.desc())
    ).all()
    owners = db.scalars(select(User).where(User.is_active).order_by(User.username)).all()
    return render(
        request,
        "accounts/tokens.html",
        principal,
        status_code=status_code,
        rows=rows,
        owners=owners,
        scopes=TOKEN_SCOPES,
        now=utcnow(),
        me=principal.user.id,
        **context,
    )


@router.get("/admin/tokens")
def tokens_page(request: Request, principal: AdminPage, db: SessionDep) -> Response:
    """Lists every API token (never its secret) with its owner, scopes, expiry and last use."""
    return _tokens_page(request, principal, db)


def _tokens_again(exc: AppError, request: Request, principal: Principal, db: Session, **_: Any) -> Response:
    return _tokens_page(request, principal, db, status_code=exc.status, error=str(exc))


@router.post("/admin/tokens")
@renders_on_error(_tokens_again)
def create_token_form(
    request: Request,
    principal: AdminPage,
    db: SessionDep,
    scopes: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI form default
    name: Annotated[str, Form(max_length=128)] = "",
    owner_id: Annotated[int | None, Form()] = None,
    expires_days: Annotated[str, Form(max_length=8)] = "",
) -> Response:
    """Creates a token for an active user (the caller by default) with scopes and an optional expiry."""
    owner = principal.user if owner_id is None else db.get(User, owner_id)
    if owner is None or not owner.is_active:
        raise NotFound("owner_id", f"no active user {owner_id}")
    expires_at = None
    if expires_days.strip():
        if not expires_days.strip().isdigit() or not 1 <= int(expires_days) <= MAX_TOKEN_DAYS:
            raise FieldError(
                "expires_days", f"give a whole number of days from 1 to {MAX_TOKEN_DAYS}, or leave it empty"
            )
        expires_at = utcnow() + timedelta(days=int(expires_days))
    raw, token = create_api_token(db, owner, parse_scopes(scopes), name, expires_at)
    audit.record(
        db, principal.user, "token.created", f"token {token.id} of {owner.username}", request, scopes=token.scopes
    )
    return _tokens_page(request, principal, db, status_code=201, created=token, secret=raw, owner=owner.username)


@router.post("/admin/tokens/{token_id}/revoke")
def revoke_token_form(token_id: int, request: Request, principal: AdminPage, db: SessionDep) -> Response:
    """Revokes any user's token."""
    if not revoke_api_token(db, token_id):
        raise NotFound("token_id", f"no active token {token_id}")
    audit.record(db, principal.user, "token.revoked", f"token {token_id}", request)
    return RedirectResponse("/admin/tokens", status_code=303)


# --- audit log ---------------------------------------------------------------------------------


@router.get("/admin/audit")
def audit_page(
    request: Request,
    principal: AdminPage,
    db: SessionDep,
    action: Annotated[str, Query(max_length=64)] = "",
    before: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    """The audit log of admin actions, newest first, filtered by action."""
    entries = audit.list_entries(db, action or None, before, limit=100)
    return render(
        request,
        "accounts/audit.html",
        principal,
        entries=entries,
        actions=audit.actions(db),
        action=action,
        older=entries[-1].id if len(entries) == 100 else None,
    )
