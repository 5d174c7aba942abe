"""People: admins add labelers and admins, change roles, reset passwords and deactivate accounts.

A change that takes access away ends the user's other sessions at once (a role change, a new password,
deactivation); a deactivated user's tokens stop working (checked at every request), their open leases go
back to the pool and their labels stay. Every change is written to the audit log. Services never commit.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import audit
from app.errors import Conflict, FieldError, NotFound
from app.labeling.leases import release_leases
from app.models import ROLES, ApiToken, User, UserSession
from app.security import create_user, end_user_sessions, set_password

GENERATED_PASSWORD_BYTES = 12  # 16 URL-safe characters


@dataclass
class UserRow:
    """A user as the admin's list shows them."""

    user: User
    live_tokens: int


def list_users(db: Session) -> list[UserRow]:
    """Lists every account with how many live tokens it holds, admins first, then by name."""
    tokens = (
        select(ApiToken.user_id, func.count().label("n"))
        .where(ApiToken.revoked_at.is_(None))
        .group_by(ApiToken.user_id)
        .subquery()
    )
    rows = db.execute(
        select(User, func.coalesce(tokens.c.n, 0))
        .outerjoin(tokens, tokens.c.user_id == User.id)
        .order_by(User.role, User.username)
    ).all()
    return [UserRow(user, int(n)) for user, n in rows]


def get_user(db: Session, user_id: int) -> User:
    """Gets a user by id, locked for the change that follows."""
    user = db.scalar(select(User).where(User.id == user_id).with_for_update())
    if user is None:
        raise NotFound("user_id", f"no user {user_id}")
    return user


def generated_password() -> str:
    """A random one-time password for an admin to hand over."""
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)


def add_user(
    db: Session, actor: User, username: str, role: str, password: str | None, request: Request | None = None
) -> tuple[User, str | None]:
    """Creates an account; with no password, generates one and returns it (shown once)."""
    generated = generated_password() if not password else None
    user = create_user(db, username.strip(), role, password or generated or "")
    user.must_change_password = generated is not None
    audit.record(db, actor, "user.created", f"user {user.id} {user.username}", request, role=role)
    return user, generated


def _not_yourself(actor: User, user: User, what: str) -> None:
    # An admin who demotes or deactivates themselves could leave nobody able to undo it.
    if actor.id == user.id:
        raise Conflict("user_id", f"you cannot {what} your own account; ask another admin")


def change_role(db: Session, actor: User, user_id: int, role: str, request: Request | None = None) -> User:
    """Changes a user's role and ends their sessions; their tokens' scopes shrink with it at once."""
    if role not in ROLES:
        raise FieldError("role", f"must be one of {', '.join(ROLES)}")
    user = get_user(db, user_id)
    if user.role == role:
        return user
    _not_yourself(actor, user, "change the role of")
    old, user.role = user.role, role
    end_user_sessions(db, user.id)
    audit.record(db, actor, "user.role_changed", f"user {user.id} {user.username}", request, old=old, new=role)
    return user


def reset_password(
    db: Session,
    actor: User,
    user_id: int,
    password: str | None,
    request: Request | None = None,
    keep: UserSession | None = None,
) -> str | None:
    """Sets a new password (or a generated one, returned to show once) and ends the user's other sessions."""
    user = get_user(db, user_id)
    generated = generated_password() if not password else None
    set_password(db, user, password or generated or "", keep if actor.id == user.id else None)
    user.must_change_password = generated is not None  # a one-time password: replaced at the next login
    audit.record(
        db, actor, "user.password_reset", f"user {user.id} {user.username}", request, generated=bool(generated)
    )
    return generated


def set_active(db: Session, actor: User, user_id: int, active: bool, request: Request | None = None) -> User:
    """Deactivates (sessions end, leases return to the pool, labels stay) or reactivates a user."""
    user = get_user(db, user_id)
    if user.is_active == active:
        return user
    if not active:
        _not_yourself(actor, user, "deactivate")
        ended = end_user_sessions(db, user.id)
        released = release_leases(db, user)
        user.is_active = False
        audit.record(
            db, actor, "user.deactivated", f"user {user.id} {user.username}", request, sessions=ended, leases=released
        )
    else:
        user.is_active = True
        audit.record(db, actor, "user.reactivated", f"user {user.id} {user.username}", request)
    return user
